"""FineTuneJobs on a real Kueue: its manager (built from its Go module) admits, holds and orders the operator's
Jobs on the local control plane; pods run on the fake GPU nodes and are ended the way a trainer ends them.

The queue has the GPUs of one node (8); each job asks for all of them, so one runs while the other is held.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fakegpu
import pytest
from cluster_support import TIMEOUT, condition, create, ftj, read, running_pods, wait_phase
from kubernetes import client
from kueue_runner import GpuQueue, Kueue

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def kueue(kube_cluster: Any) -> Iterator[Kueue]:
    with Kueue(kube_cluster) as running:
        yield running


def _queued(namespace: str, name: str) -> dict[str, Any]:
    return ftj(namespace, name, scheduling={"queueName": "gpus"})


def _pod_of(api: client.ApiClient, namespace: str, name: str) -> Any:
    [pod] = running_pods(api, namespace, 1, name=name)
    assert pod.metadata.labels.get("kubetune.io/job-name") == name, pod.metadata.name
    return pod


def _workload(queue: GpuQueue, api: client.ApiClient, job: str) -> dict[str, Any]:
    found = [w for w in queue.workloads(api)
             if any(o.get("kind") == "Job" and o.get("name") == job for o in w["metadata"].get("ownerReferences", []))]
    assert len(found) == 1, [w["metadata"]["name"] for w in queue.workloads(api)]
    return found[0]


def _workload_condition(workload: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in workload.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def test_two_jobs_that_each_need_the_whole_queue_run_one_after_the_other(
        kueue: Kueue, kube_admin: client.ApiClient, namespace: str, start_operator: Any) -> None:
    queue = GpuQueue.create(kube_admin, namespace, gpus=8)
    start_operator()
    create(kube_admin, _queued(namespace, "first"))
    first_pod = _pod_of(kube_admin, namespace, "first")
    assert first_pod.spec.node_selector.get("nvidia.com/gpu.present") == "true", "the flavor's node labels"
    admitted = wait_phase(kube_admin, namespace, "Staging", name="first")
    assert condition(admitted, "Suspended")["reason"] == "Admitted"
    assert condition(admitted, "Suspended")["message"] == "admitted by Kueue LocalQueue gpus"

    create(kube_admin, _queued(namespace, "second"))
    held = wait_phase(kube_admin, namespace, "Suspended", name="second")
    assert condition(held, "Suspended")["reason"] == "Queued" and "LocalQueue gpus" in held["status"]["message"]
    pending = fakegpu.wait_for(lambda: _workload_condition(_workload(queue, kube_admin, "second"), "QuotaReserved")
                               .get("reason") == "Pending" and _workload(queue, kube_admin, "second"),
                               timeout=TIMEOUT, what="Kueue to hold the second job for quota")
    assert "insufficient unused quota for nvidia.com/gpu" in _workload_condition(pending, "QuotaReserved")["message"]
    assert read(kube_admin, namespace, "second")["status"]["phase"] == "Suspended", "held while the first runs"

    fakegpu.finish_pod(kube_admin, namespace, first_pod.metadata.name, 0,
                       message='{"phase": "Succeeded", "outputs": {"uri": "s3://outputs/first/final/"}}')
    wait_phase(kube_admin, namespace, "Succeeded", name="first")
    second_pod = _pod_of(kube_admin, namespace, "second")
    running = wait_phase(kube_admin, namespace, "Staging", name="second")
    assert condition(running, "Suspended")["reason"] == "Admitted"
    fakegpu.finish_pod(kube_admin, namespace, second_pod.metadata.name, 0,
                       message='{"phase": "Succeeded", "outputs": {"uri": "s3://outputs/second/final/"}}')
    done = wait_phase(kube_admin, namespace, "Succeeded", name="second")
    assert done["status"]["restarts"] == 0 and condition(done, "Suspended")["reason"] == "Admitted"
