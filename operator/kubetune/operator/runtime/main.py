"""`kubetune operator`: start the HTTP probes, win the Lease, then run Kopf and the passes until stopped.

Kopf watches and queues passes (`handlers`); beside it run threads of the operator's own: the
work queue's workers, the resync and relist loops (`passes`), the progress reader (rank 0's `/progress`,
whose news queues a pass) and the probes, whose `/healthz` watches the passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from typing import Any

import kopf
from kubernetes import client

from kubetune.operator.runtime.handlers import build_registry
from kubetune.operator.runtime.kube import KubeApi, load_configuration
from kubetune.operator.runtime.kube_cluster import KubeCluster
from kubetune.operator.runtime.leader import LeaderElector
from kubetune.operator.runtime.liveness import stuck_reason
from kubetune.operator.runtime.metrics import OperatorMetrics
from kubetune.operator.runtime.passes import Controller
from kubetune.operator.runtime.probes import serve_probes
from kubetune.operator.runtime.progress_reader import ProgressReader
from kubetune.operator.runtime.watching import Caches
from kubetune.operator.runtime.workqueue import ROUTINE_AT_ONCE, WorkQueue
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


def _lead(api: KubeApi, identity: str | None, lease: tuple[str, str] | None, lease_seconds: int,
          stop: threading.Event, lost: threading.Event) -> bool:
    """Wait for the Lease (False if stopped first), then keep renewing it in the background."""
    lease_ns, lease_name = lease or (lease_namespace(), LEASE_NAME)
    elector = LeaderElector(api, lease_ns, lease_name, identity or default_identity(), lease_seconds,
                            retry_seconds=max(0.5, lease_seconds / 5))
    if not elector.wait_until_leader(stop):
        return False
    renew = threading.Thread(target=elector.keep_renewing, args=(stop, lost), name="kubetune-lease")
    renew.daemon = True
    renew.start()
    return True


async def _operate(stop: threading.Event, queue: WorkQueue, **kwargs: Any) -> None:
    """Kopf until `stop` is set (or a signal arrives), with an asyncio flag bridged from `stop`.

    Kopf would wait for a threading flag in one of its executor threads, and stopping on
    SIGTERM would then hang while asyncio joins that thread. The queue closes at once: once the
    Lease is lost, no pass may start while Kopf winds down.
    """
    loop, flag = asyncio.get_running_loop(), asyncio.Event()

    def relay() -> None:
        stop.wait()
        queue.close()
        with contextlib.suppress(RuntimeError):  # the loop has already closed
            loop.call_soon_threadsafe(flag.set)

    threading.Thread(target=relay, name="kubetune-stop", daemon=True).start()
    await kopf.operator(stop_flag=flag, **kwargs)


def run(
    namespaces: list[str] | None = None,
    *,
    settings: OperatorSettings | None = None,
    kubeconfig: str | None = None,
    configuration: client.Configuration | None = None,
    http_port: int = 8080,
    leader_election: bool = True,
    identity: str | None = None,
    lease: tuple[str, str] | None = None,
    lease_seconds: int = 15,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
) -> int:
    """Run the operator over `namespaces` (None: cluster-wide) until `stop` is set.

    Credentials come from `configuration`, else in-cluster, else `kubeconfig`. `lease` is the
    (namespace, name) of the leader-election Lease; by default the operator's own namespace.
    Returns 1 when the Lease was lost (so the pod restarts as a standby), else 0.
    """
    settings = settings or OperatorSettings.from_env()
    stop = stop or threading.Event()
    leading, lost = threading.Event(), threading.Event()
    configuration = configuration or load_configuration(kubeconfig)
    api, caches = KubeApi(configuration), Caches()
    queue = WorkQueue(routine_at_once=min(ROUTINE_AT_ONCE, settings.pass_workers - 1))  # a worker for new jobs
    reader = ProgressReader.from_settings(settings, on_news=lambda key: controller.enqueue(key))
    cluster = KubeCluster(api, caches, reader, queue)
    controller = Controller(cluster, settings, OperatorMetrics(), caches, queue, progress=reader,
                            relist=lambda: cluster.relist(namespaces or ()))
    server = serve_probes(controller.metrics.registry, http_port, leading.is_set,
                          stuck=lambda: stuck_reason(controller.passes, queue, settings.stuck_pass_seconds))
    try:
        if leader_election and not _lead(api, identity, lease, lease_seconds, stop, lost):
            return 0
        leading.set()
        controller.start(stop)
        asyncio.run(_operate(stop, queue, registry=build_registry(configuration, controller), standalone=True,
                             clusterwide=not namespaces, namespaces=namespaces or (), ready_flag=ready))
    finally:
        stop.set()  # Kopf may have stopped on a signal: the pass and Lease threads stop with it
        queue.close()
        leading.clear()
        server.shutdown()
        server.server_close()
        cluster.close()
        reader.close()
        api.close()
    return EXIT_LOST_LEASE if lost.is_set() else 0
