"""A hostile trainer image on the real control plane: rank 0's `/progress` redirects, or drips.

The user picks `spec.image`, so rank 0 may answer the operator's reads with anything. Each
rank 0 here is a loopback server given to its pod as `status.podIP` (as `LocalPodRunner`
does for a real trainer), on the port the operator reads; the pods are ended with
`fakegpu.finish_pod`, as a trainer would end them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import fakegpu
import pytest
from cluster_support import TIMEOUT, create, free_port, ftj, read, running_pods, wait_phase
from kubernetes import client
from rank0_servers import Rank0, drip, rank0_servers, reply

pytestmark = pytest.mark.integration

SMALL = {"gpusPerNode": 1, "cpu": "1", "memory": "1Gi"}
PROGRESS = json.dumps({"phase": "Training", "step": 5, "totalSteps": 100}).encode()
DONE = json.dumps({"phase": "Succeeded", "exitCode": 0, "reason": "Completed", "message": "training finished",
                   "outputs": {"uri": "s3://outputs/x/final/"}})
DRIP_SECONDS = 2.0
READ_DEADLINE = 3.0
"""The operator's default: longer than a drip's gap, so only an overall deadline ends such a read."""


@pytest.fixture
def serve() -> Iterator[Callable[..., Rank0]]:
    with rank0_servers() as start:
        yield start


def give_address(api: client.ApiClient, namespace: str, pod: str, address: str) -> None:
    """The pod's IP, as the CNI plugin would set it: where the operator reads `/progress`."""
    client.CoreV1Api(api).patch_namespaced_pod_status(pod, namespace, [
        {"op": "replace", "path": "/status/podIP", "value": address},
        {"op": "replace", "path": "/status/podIPs", "value": [{"ip": address}]}])


def start_rank0(api: client.ApiClient, namespace: str, name: str, rank0: Rank0) -> str:
    """The job's one pod, running, with `rank0` serving its `/progress`; returns the pod's name."""
    [pod] = running_pods(api, namespace, 1, name=name)
    give_address(api, namespace, pod.metadata.name, rank0.ip)
    return pod.metadata.name


def test_a_progress_redirect_is_not_followed(kube_admin, namespace, start_operator, serve) -> None:
    port = free_port()
    target = serve(reply(b'{"phase": "Training", "step": 99, "internal": "secret"}'))
    rank0 = serve(reply(b"", 302, {"Location": f"http://127.0.0.1:{target.port}/internal"}), port=port)
    start_operator(metrics_port=port, progress_timeout_seconds=READ_DEADLINE)
    create(kube_admin, ftj(namespace, resources=SMALL))
    start_rank0(kube_admin, namespace, "corgi", rank0)
    fakegpu.wait_for(lambda: len(rank0.requests) >= 3, timeout=TIMEOUT, what="three reads of the redirecting pod")
    assert target.requests == [], "the redirect's target got a request"
    status = read(kube_admin, namespace)["status"]
    assert status["phase"] == "Staging" and "step" not in (status.get("progress") or {})
    assert "secret" not in json.dumps(status)


def _succeed_and_time(api: client.ApiClient, namespace: str, name: str, rank0: Rank0) -> float:
    """Seconds from the pod's successful end to the FineTuneJob's Succeeded, once it has been seen Running."""
    pod = start_rank0(api, namespace, name, rank0)
    wait_phase(api, namespace, "Running", name=name)
    began = time.monotonic()
    fakegpu.finish_pod(api, namespace, pod, 0, message=DONE)
    wait_phase(api, namespace, "Succeeded", name=name)
    return time.monotonic() - began


def test_pods_that_drip_their_progress_do_not_delay_another_jobs_status(kube_admin, namespace, start_operator,
                                                                        serve) -> None:
    """8 jobs whose `/progress` drips one byte every 2 s, never finishing, beside one well-behaved job:
    its Succeeded comes at most 5 s later than when it runs alone (the operator has 8 queue workers)."""
    port = free_port()
    start_operator(metrics_port=port, progress_timeout_seconds=READ_DEADLINE)
    create(kube_admin, ftj(namespace, name="alone", resources=SMALL))
    alone = _succeed_and_time(kube_admin, namespace, "alone", serve(reply(PROGRESS), port=port))

    drippers: list[Rank0] = []
    for n in range(8):
        create(kube_admin, ftj(namespace, name=f"drip-{n}", resources=SMALL))
    for n in range(8):
        drippers.append(serve(drip(DRIP_SECONDS), port=port))
        start_rank0(kube_admin, namespace, f"drip-{n}", drippers[-1])
    fakegpu.wait_for(lambda: all(d.requests for d in drippers), timeout=TIMEOUT, what="reads of every dripping pod")
    create(kube_admin, ftj(namespace, name="ninth", resources=SMALL))
    beside = _succeed_and_time(kube_admin, namespace, "ninth", serve(reply(PROGRESS), port=port))

    reads = sum(len(d.requests) for d in drippers)
    print(f"\nSucceeded after the pod's end: alone {alone:.2f}s, beside 8 dripping pods {beside:.2f}s "
          f"({reads} reads of the dripping pods meanwhile)")
    assert beside <= alone + 5.0, f"alone {alone:.2f}s, beside 8 dripping pods {beside:.2f}s"
    statuses: list[dict[str, Any]] = [read(kube_admin, namespace, f"drip-{n}")["status"] for n in range(8)]
    assert {s["phase"] for s in statuses} == {"Staging"}
