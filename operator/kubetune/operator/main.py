"""`kubetune operator`: start the HTTP probes, win the Lease, then run Kopf until stopped."""

from __future__ import annotations

import logging
import os
import socket
import threading

import kopf

from kubetune.operator.cluster import KubeCluster
from kubetune.operator.handlers import build_registry
from kubetune.operator.kube import KubeApi, load_configuration
from kubetune.operator.leader import LeaderElector
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.probes import serve_probes
from kubetune.operator.settings import OperatorSettings

LOG = logging.getLogger(__name__)
LEASE_NAME = "kubetune-operator"
EXIT_LOST_LEASE = 1


def default_identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def lease_namespace() -> str:
    """The operator's own namespace in a pod, else `default`."""
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return "default"


def run(
    namespaces: list[str] | None = None,
    *,
    settings: OperatorSettings | None = None,
    kubeconfig: str | None = None,
    http_port: int = 8080,
    leader_election: bool = True,
    identity: str | None = None,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
) -> int:
    """Run the operator over `namespaces` (None: cluster-wide) until `stop` is set."""
    settings = settings or OperatorSettings.from_env()
    stop = stop or threading.Event()
    leading, lost = threading.Event(), threading.Event()
    api = KubeApi(load_configuration(kubeconfig))
    metrics = OperatorMetrics()
    server = serve_probes(metrics.registry, http_port, leading.is_set)
    try:
        if leader_election:
            elector = LeaderElector(api, lease_namespace(), LEASE_NAME, identity or default_identity())
            if not elector.wait_until_leader(stop):
                return 0
            renew = threading.Thread(target=elector.keep_renewing, args=(stop, lost), name="kubetune-lease")
            renew.daemon = True
            renew.start()
        leading.set()
        cluster = KubeCluster(api, settings.metrics_port, settings.progress_timeout_seconds)
        memo = kopf.Memo(cluster=cluster, settings=settings, metrics=metrics, locks={})
        kopf.run(registry=build_registry(settings), memo=memo, standalone=True, clusterwide=not namespaces,
                 namespaces=namespaces or (), stop_flag=stop, ready_flag=ready)
    finally:
        leading.clear()
        server.shutdown()
        server.server_close()
        api.close()
    return EXIT_LOST_LEASE if lost.is_set() else 0
