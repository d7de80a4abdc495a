"""Prepare the wheel folder a GPU host without a package registry installs from (`make gpu-wheels`).

The GPU host (docs/development.md, GPU tier) has its own Python 3.12 with CUDA torch and many
packages, but reaches no registry. It runs `make gpu-check` on a copy of the working tree plus
this folder, which together must stay under 64 MiB. So the folder holds only what that host
lacks, each at the version uv.lock pins, as cp312 manylinux x86_64 wheels:

- the trainer's own needs the host image does not ship (diffusers, pydantic with its binary
  core, boto3 and botocore, prodigyopt, ...);
- bitsandbytes cut down to the one CUDA build the host's torch loads (torch 2.11+cu130 there:
  `libbitsandbytes_cuda130.so`) plus the small CPU library, about 2 MB instead of 43 MB;
- when diffusers' example LoRA script is at hand (bench/README.md says where it is kept), a
  copy of it and the `datasets` wheels it imports, so that the benchmark can compare with it.

What the host already has comes from `/work/.library/device/KINDS.md`'s package list
(`HOST_HAS`); a package there is used as the host's version and not carried, except the few
whose host version is unknown and too old for our pins would break an import (`ALWAYS_CARRY`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FOLDER = REPO / ".gpu-wheels"

CARRIED = [
    "diffusers", "importlib-metadata", "lazy-importer", "zipp",
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
    "boto3", "botocore", "s3transfer", "jmespath",
    "bitsandbytes", "prodigyopt",
]
"""Everything the trainer and the GPU tier import that the host image lacks (or may hold too old)."""

EXAMPLE_NEEDS = ["datasets", "dill", "multiprocess"]
"""diffusers' example script imports `datasets`; the host has pyarrow, pandas, xxhash and fsspec."""

HOST_HAS = {
    "torch", "accelerate", "transformers", "peft", "safetensors", "huggingface-hub", "tokenizers", "pyyaml",
    "prometheus-client", "numpy", "pillow", "tqdm", "requests", "filelock", "regex", "packaging", "psutil",
    "fsspec", "pytest", "pytest-timeout", "torchvision", "python-dateutil", "urllib3", "six", "pyarrow", "pandas",
    "xxhash",
}
"""Read off KINDS.md's list of the `nvidia-h200` image; never carried (the host's torch must stay)."""

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
LIMIT_BYTES = 64 * 1024 * 1024
EXAMPLE_NAME = "train_text_to_image_lora.py"
EXAMPLE_URL = ("https://raw.githubusercontent.com/huggingface/diffusers/v{version}/"
               "examples/text_to_image/train_text_to_image_lora.py")


def locked_versions(lock: Path = REPO / "uv.lock") -> dict[str, str]:
    with lock.open("rb") as handle:
        return {package["name"]: package["version"] for package in tomllib.load(handle)["package"]}


def download(specs: list[str], folder: Path, python: str, version: str) -> None:
    """`pip download` of exactly these wheels (no dependencies) for CPython `version` on manylinux x86_64."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command = [python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", version, "--implementation", "cp", *platforms,
               "--dest", str(folder), *specs]
    subprocess.run(command, check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def cut_bitsandbytes(wheel: Path, cuda: str) -> Path:
    """Rewrite the wheel keeping only `libbitsandbytes_cuda<cuda>.so` and the CPU library (RECORD updated)."""
    keep = {f"libbitsandbytes_cuda{cuda}.so", "libbitsandbytes_cpu.so"}
    cut = wheel.with_suffix(".cut")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(cut, "w", zipfile.ZIP_DEFLATED) as target:
        names = [n for n in source.namelist()
                 if not (n.startswith("bitsandbytes/libbitsandbytes_") and n.rsplit("/", 1)[-1] not in keep)]
        if not any(n.endswith(f"libbitsandbytes_cuda{cuda}.so") for n in names):
            raise SystemExit(f"{wheel.name} has no libbitsandbytes_cuda{cuda}.so")
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        lines = []
        for name in names:
            if name == record_name:
                continue
            data = source.read(name)
            target.writestr(source.getinfo(name), data)
            lines.append(_record_line(name, data))
        target.writestr(record_name, "\n".join([*lines, f"{record_name},,"]) + "\n")
    cut.replace(wheel)
    return wheel


def find_example(version: str) -> Path | None:
    """diffusers' example LoRA script for `version`, where bench/README.md says to keep it, if present."""
    candidates = [os.environ.get("KUBETUNE_DIFFUSERS_EXAMPLE", ""),
                  str(Path.home() / ".cache/kubetune/diffusers-examples" / version / EXAMPLE_NAME)]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def fetch_example(version: str) -> Path | None:
    """The script from the diffusers repository at the release tag, into the cache bench/README.md names."""
    import urllib.request

    target = Path.home() / ".cache/kubetune/diffusers-examples" / version / EXAMPLE_NAME
    try:
        with urllib.request.urlopen(EXAMPLE_URL.format(version=version), timeout=20) as response:
            body = response.read()
    except OSError as exc:
        print(f"diffusers example: not fetched ({exc}); the GPU benchmark will skip the comparison")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(body)
    return target


def tree_bytes() -> int:
    """Bytes of what the device tool sends: tracked plus untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--cuda", default="130", help="the CUDA build of bitsandbytes to keep (torch.version.cuda "
                                                      "without the dot on the host; 130 for torch 2.11+cu130)")
    parser.add_argument("--python", default=sys.executable, help="the Python whose pip downloads")
    parser.add_argument("--python-version", default="3.12", help="the GPU host's Python (3.12 on nvidia-h200)")
    parser.add_argument("--no-example", action="store_true", help="never fetch diffusers' example script")
    args = parser.parse_args(argv)

    versions = locked_versions()
    shutil.rmtree(args.dest, ignore_errors=True)
    args.dest.mkdir(parents=True)
    example = None if args.no_example else (find_example(versions["diffusers"])
                                            or fetch_example(versions["diffusers"]))
    names = CARRIED + (EXAMPLE_NEEDS if example else [])
    assert not HOST_HAS.intersection(names), HOST_HAS.intersection(names)
    download([f"{name}=={versions[name]}" for name in names], args.dest, args.python, args.python_version)
    cut_bitsandbytes(next(args.dest.glob("bitsandbytes-*.whl")), args.cuda)
    if example:
        copy = args.dest / "examples" / versions["diffusers"] / EXAMPLE_NAME
        copy.parent.mkdir(parents=True)
        shutil.copy2(example, copy)
        print(f"diffusers example: {example} -> {copy.relative_to(REPO) if copy.is_relative_to(REPO) else copy}")
    for wheel in sorted(args.dest.glob("*.whl")):
        print(f"  {wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    wheels, tree = folder_bytes(args.dest), tree_bytes()
    total = wheels + tree
    print(f"wheel folder {args.dest}: {wheels / 2**20:.1f} MiB; working tree {tree / 2**20:.1f} MiB; "
          f"together {total / 2**20:.1f} MiB of the 64 MiB the device tool carries")
    if total > LIMIT_BYTES:
        print("too large for one device call", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
