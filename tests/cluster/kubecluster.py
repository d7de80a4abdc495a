"""A real Kubernetes control plane on loopback, for the operator's integration tests.

An operator tested only against mocks breaks on real clusters: schema and CEL
validation, RBAC, the Job controller, the scheduler and the garbage collector all
have behaviour a mock gets wrong. This module runs the real ones: etcd,
kube-apiserver (RBAC, service-account tokens), kube-controller-manager,
kube-scheduler, and kwok playing the kubelet on fake GPU nodes, each in its own
process group on free loopback ports, built from pinned Go modules
(:mod:`clusterbuild`). It is used by ``make cluster-up``/``cluster-down`` and by
the pytest fixture in ``tests/integration/conftest.py``::

    python tests/cluster/kubecluster.py build|up|down|status
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import clusterbuild
import clusterprocess
import gpunodes
import yaml
from clusterpki import Pki, write_pki

if TYPE_CHECKING:  # the client is imported lazily: up/down/status do not need it
    from kubernetes import client

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "manifests" / "crd"
STAGES_FILE = Path(__file__).resolve().parent / "kwok-pod-stages.yaml"
PORT_NAMES = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")


def default_state_dir() -> Path:
    """Where ``make cluster-up`` keeps the one shared cluster of this machine."""
    return Path(os.environ.get("KUBETUNE_CLUSTER_DIR", clusterbuild.cache_root() / "cluster"))


@dataclass
class ControlPlane:
    """One loopback cluster: its state dir, and the processes this process started."""

    state_dir: Path
    processes: clusterprocess.ProcessSet = field(init=False)

    def __post_init__(self) -> None:
        self.processes = clusterprocess.ProcessSet(self.state_dir)

    @property
    def pki(self) -> Pki:
        return Pki(self.state_dir / "pki")

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.processes.ports()['apiserver']}"

    def is_running(self) -> bool:
        """Every component alive and the API server ready."""
        return (self.kubeconfig.exists() and self.processes.all_alive()
                and clusterprocess.https_ready(f"{self.server}/readyz", self.pki))

    def start(self, tie_to_parent: bool = False) -> None:
        """Start everything; on any failure stop what was started and re-raise.

        Ports are picked free just before use; if another process takes one in between,
        the start is retried once on fresh ports.
        """
        bins = clusterbuild.ensure_binaries()
        try:
            self._start_once(bins, tie_to_parent)
        except clusterprocess.ComponentExited as exc:
            if not exc.port_taken:
                raise
            print("[up] a port was taken meanwhile; retrying on fresh ports", flush=True)
            self._start_once(bins, tie_to_parent)

    def _start_once(self, bins: Path, tie_to_parent: bool) -> None:
        started = self.processes.started_at = time.monotonic()
        print(f"[up] starting a control plane in {self.state_dir}", flush=True)
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        self.state_dir.mkdir(parents=True)
        write_pki(self.state_dir / "pki")
        self.processes.allocate_ports(PORT_NAMES)
        self.processes.tie_to_parent = tie_to_parent
        try:
            self._start_components(bins)
            self._populate()
        except BaseException:
            self.stop()
            raise
        print(f"[up] cluster ready in {time.monotonic() - started:.1f}s", flush=True)

    def _start_components(self, bins: Path) -> None:
        ports, pki = self.processes.ports(), self.pki
        self.processes.start("etcd", [str(bins / "etcd"), *etcd_args(self.state_dir, ports)])
        self.processes.wait_ready("etcd", lambda: clusterprocess.http_ok(
            f"http://127.0.0.1:{ports['etcd']}/health"))
        self.processes.start("kube-apiserver",
                             [str(bins / "kube-apiserver"), *apiserver_args(ports, pki)])
        self.processes.wait_ready("kube-apiserver", lambda: clusterprocess.https_ready(
            f"{self.server}/readyz", pki), timeout=90)
        write_kubeconfig(self.kubeconfig, self.server, pki)
        for name, args in (("kube-controller-manager", controller_manager_args),
                           ("kube-scheduler", scheduler_args)):
            self.processes.start(name, [str(bins / name), *args(ports, pki, self.kubeconfig)])
        # kwok also reads ~/.kwok/kwok.yaml: give it a HOME of its own.
        self.processes.start("kwok", [str(bins / "kwok"), *kwok_args(ports, self.kubeconfig)],
                             env=dict(os.environ, HOME=str(self.state_dir)))
        for name, port in (("kube-controller-manager", "controller-manager"),
                           ("kube-scheduler", "scheduler")):
            self.processes.wait_ready(name, lambda p=port: clusterprocess.https_ok_insecure(
                f"https://127.0.0.1:{ports[p]}/healthz"))
        self.processes.wait_ready("kwok", lambda: clusterprocess.http_ok(
            f"http://127.0.0.1:{ports['kwok']}/healthz"))

    def _populate(self) -> None:
        """Fake GPU nodes Ready, controllers working, project CRDs established.

        Done with kubectl: the Python client's import and first use cost seconds.
        """
        kubectl = self.kubectl_command()
        clusterprocess.run_checked([*kubectl, "apply", "-f", "-"],
                                   stdin=gpunodes.nodes_yaml(clusterbuild.kubernetes_version()))
        clusterprocess.run_checked([*kubectl, "wait", "--for=condition=Ready", "node",
                                    "-l", gpunodes.NODE_LABEL_SELECTOR, "--timeout=60s"])
        names = [spec.name for spec in gpunodes.DEFAULT_NODES]
        print(f"[up] {len(names)} fake nodes Ready: {', '.join(names)}", flush=True)
        # The controller manager is working once it made the default ServiceAccount.
        clusterprocess.run_checked([*kubectl, "wait", "--for=create", "--timeout=60s",
                                    "--namespace=default", "serviceaccount/default"])
        self.apply_crds()

    def apply_crds(self) -> list[Path]:
        """Apply every YAML file in manifests/crd/ and wait until they are Established."""
        files = sorted([*CRD_DIR.glob("*.yaml"), *CRD_DIR.glob("*.yml")])
        if not files:
            print(f"[up] no CRDs in {CRD_DIR} yet: skipping (FineTuneJob tests will skip)",
                  flush=True)
            return []
        kubectl = self.kubectl_command()
        for path in files:
            clusterprocess.run_checked([*kubectl, "apply", "--server-side",
                                        "--force-conflicts", "-f", str(path)])
        # A CRD read before the API server wrote its first status has no conditions at all, and
        # `kubectl wait` fails on that instead of waiting: ask again until the deadline.
        deadline = time.monotonic() + 60
        while True:
            try:
                clusterprocess.run_checked([*kubectl, "wait", "--for=condition=Established",
                                            "--timeout=20s", "crd", "--all"])
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        print(f"[up] applied {len(files)} CRD file(s) from {CRD_DIR}", flush=True)
        return files

    def kubectl_command(self) -> list[str]:
        return [str(clusterbuild.kubectl_path()), f"--kubeconfig={self.kubeconfig}"]

    def stop(self) -> None:
        """Stop every component (by process group) and remove the state dir."""
        self.processes.stop_all()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def admin_client(self) -> client.ApiClient:
        """An API client authenticated as cluster admin (group system:masters)."""
        from kubernetes import client

        return client.ApiClient(self._configuration())

    def service_account_client(self, namespace: str, name: str,
                               expiration_seconds: int = 3600) -> client.ApiClient:
        """A client holding a TokenRequest token for a ServiceAccount: its RBAC only."""
        from kubernetes import client

        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[],
                                           expiration_seconds=expiration_seconds))
        with self.admin_client() as admin:
            token = client.CoreV1Api(admin).create_namespaced_service_account_token(
                name, namespace, request).status.token
        config = self._configuration(with_cert=False)
        config.api_key = {"authorization": token}
        config.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(config)

    def _configuration(self, with_cert: bool = True) -> client.Configuration:
        from kubernetes import client

        config = client.Configuration()
        config.host = self.server
        config.ssl_ca_cert = str(self.pki.ca_cert)
        if with_cert:
            config.cert_file = str(self.pki.admin_cert)
            config.key_file = str(self.pki.admin_key)
        return config


def etcd_args(state_dir: Path, ports: dict[str, int]) -> list[str]:
    client_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    return [
        "--name=kubetune", f"--data-dir={state_dir / 'etcd'}",
        f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=kubetune={peer_url}", "--unsafe-no-fsync",
        "--log-level=warn", "--quota-backend-bytes=2147483648",
    ]


def apiserver_args(ports: dict[str, int], pki: Pki) -> list[str]:
    return [
        f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
        f"--secure-port={ports['apiserver']}",
        f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        "--authorization-mode=RBAC", "--anonymous-auth=true",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        "--service-cluster-ip-range=10.0.0.0/24", "--endpoint-reconciler-type=none",
        "--allow-privileged=true", "--profiling=false",
    ]


def controller_manager_args(ports: dict[str, int], pki: Pki, kubeconfig: Path) -> list[str]:
    return [
        *_component_auth_args(kubeconfig), "--bind-address=127.0.0.1",
        f"--secure-port={ports['controller-manager']}", "--leader-elect=false",
        "--controllers=*", f"--service-account-private-key-file={pki.sa_key}",
        f"--root-ca-file={pki.ca_cert}", f"--cluster-signing-cert-file={pki.ca_cert}",
        f"--cluster-signing-key-file={pki.ca_key}", "--profiling=false",
    ]


def scheduler_args(ports: dict[str, int], pki: Pki, kubeconfig: Path) -> list[str]:
    del pki  # the scheduler needs no keys of its own here
    return [*_component_auth_args(kubeconfig), "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}", "--leader-elect=false",
            "--profiling=false"]


def _component_auth_args(kubeconfig: Path) -> list[str]:
    # Controllers run as cluster admin; RBAC still governs every other identity.
    return [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}"]


def kwok_args(ports: dict[str, int], kubeconfig: Path) -> list[str]:
    return [
        f"--kubeconfig={kubeconfig}", f"--config={STAGES_FILE}",
        "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        "--node-lease-duration-seconds=8", "--cidr=10.244.0.1/16",
        f"--server-address=127.0.0.1:{ports['kwok']}",
    ]


def write_kubeconfig(path: Path, server: str, pki: Pki) -> None:
    """A self-contained admin kubeconfig (certificates embedded)."""
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "kubetune-test",
        "clusters": [{"name": "kubetune-test", "cluster": {
            "server": server, "certificate-authority-data": b64(pki.ca_cert)}}],
        "users": [{"name": "kubetune-admin", "user": {
            "client-certificate-data": b64(pki.admin_cert),
            "client-key-data": b64(pki.admin_key)}}],
        "contexts": [{"name": "kubetune-test", "context": {
            "cluster": "kubetune-test", "user": "kubetune-admin", "namespace": "default"}}],
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


_SESSION: dict = {"plane": None, "users": 0, "owned": False}


@contextlib.contextmanager
def session_cluster(scratch: Path) -> Iterator[ControlPlane]:
    """The cluster for a test session, shared by every fixture that asks for one.

    A cluster started by ``make cluster-up`` is reused and left running; otherwise one
    is started under ``scratch`` (dying with this process if it is killed) and stopped
    when the last user leaves, even when tests fail.
    """
    if _SESSION["users"] == 0:
        shared = ControlPlane(default_state_dir())
        if shared.is_running():
            shared.apply_crds()  # the checkout's CRD may be newer than the running one
            _SESSION.update(plane=shared, owned=False)
        else:
            plane = ControlPlane(scratch)
            plane.start(tie_to_parent=True)
            _SESSION.update(plane=plane, owned=True)
    _SESSION["users"] += 1
    try:
        yield _SESSION["plane"]
    finally:
        _SESSION["users"] -= 1
        if _SESSION["users"] == 0 and _SESSION["owned"]:
            _SESSION["plane"].stop()


def command_up(plane: ControlPlane) -> None:
    if plane.is_running():
        print("[up] cluster already running; reusing it", flush=True)
        plane.apply_crds()
    else:
        plane.processes.stop_all()  # leftovers of a crashed cluster, if any
        plane.start()
    print(plane.kubeconfig, flush=True)


def command_status(plane: ControlPlane) -> int:
    running = plane.is_running()
    for name, alive in plane.processes.liveness().items():
        print(f"{name:<24} {'running' if alive else 'stopped'}")
    print(f"cluster: {'running' if running else 'not running'} ({plane.state_dir})")
    if running:
        print(plane.kubeconfig)
    return 0 if running else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    args = parser.parse_args(argv)
    plane = ControlPlane(args.state_dir)
    if args.command == "build":
        print(clusterbuild.ensure_binaries())
        print(clusterbuild.kubectl_path())
        for server in clusterbuild.SERVERS:  # the servers the integration tests run beside it, built before pytest
            print(clusterbuild.ensure_server(server))
    elif args.command == "up":
        command_up(plane)
    elif args.command == "down":
        plane.stop()
        print(f"[down] stopped; removed {plane.state_dir}")
    else:
        return command_status(plane)
    return 0


if __name__ == "__main__":
    sys.exit(main())
