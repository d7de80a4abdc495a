"""FineTuneJobs on a real Kueue: its manager (built from its Go module) admits, holds and orders the operator's
Jobs on the local control plane; pods run on the fake GPU nodes and are ended the way a trainer ends them.

The queue has the GPUs of one node (8); each job asks for all of them, so one runs while the other is held. In the
end-to-end test the queue has one GPU and a higher-priority job preempts a lower one that this host trains
(`LocalPodRunner`): the low job checkpoints on its way out, waits in the queue, and resumes from that checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakegpu
import pytest
from cluster_support import TIMEOUT, condition, create, free_port, ftj, read, running_pods, wait_phase
from e2e_support import DATA_URI, MODEL_URI, SECRET_NAME, complete_checkpoints, create_credentials
from kubernetes import client
from kueue_runner import GpuQueue, Kueue
from podrunner import LocalPodRunner

from kubetune_trainer.trace import TRACE_ENV

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kueue(kube_cluster: Any) -> Iterator[Kueue]:
    """Kueue for this module only: a running Kueue suspends again any Job with a queue label that it has not
    admitted, so the other tests, which play the queue by hand, run without it."""
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



def test_a_restarted_attempt_waits_behind_the_jobs_queued_before_it(
        kueue: Kueue, kube_admin: client.ApiClient, namespace: str, start_operator: Any) -> None:
    """The operator restarts a failed attempt with a new Job, so Kueue sees a new Workload, ordered by its creation
    behind every job of its priority already waiting: a failed attempt gives its quota back, as a finished one does
    (docs/operator.md, Kueue). StrictFIFO makes that order certain; under BestEffortFIFO a new Workload may also be
    admitted before an older one Kueue has set aside as inadmissible (seen once in CI)."""
    queue = GpuQueue.create(kube_admin, namespace, gpus=8, strategy="StrictFIFO")
    start_operator()
    create(kube_admin, _queued(namespace, "first"))
    first_pod = _pod_of(kube_admin, namespace, "first")
    wait_phase(kube_admin, namespace, "Staging", name="first")
    create(kube_admin, _queued(namespace, "second"))
    wait_phase(kube_admin, namespace, "Suspended", name="second")

    fakegpu.finish_pod(kube_admin, namespace, first_pod.metadata.name, 1, message="NCCL error: unhandled system error")
    second_pod = _pod_of(kube_admin, namespace, "second")  # admitted: the failed attempt's quota went to it
    requeued = fakegpu.wait_for(lambda: (o := read(kube_admin, namespace, "first"))["status"].get("phase")
                                == "Suspended" and o, timeout=TIMEOUT, what="the restart to wait in the queue")
    assert requeued["status"]["restarts"] == 1 and condition(requeued, "Suspended")["reason"] == "Queued"
    fakegpu.wait_for(lambda: len(queue.workloads(kube_admin)) == 2, timeout=TIMEOUT,
                     what="the first attempt's Workload to go with its Job")

    fakegpu.finish_pod(kube_admin, namespace, second_pod.metadata.name, 0, message='{"phase": "Succeeded"}')
    wait_phase(kube_admin, namespace, "Succeeded", name="second")
    again = _pod_of(kube_admin, namespace, "first")
    fakegpu.finish_pod(kube_admin, namespace, again.metadata.name, 0, message='{"phase": "Succeeded"}')
    done = wait_phase(kube_admin, namespace, "Succeeded", name="first")
    assert done["status"]["restarts"] == 1
MAX_STEPS = 40


def _trained(namespace: str, name: str, endpoint: str, priority: str) -> dict[str, Any]:
    """A tiny LoRA job the host trains; its only checkpoint is the one it writes when it is stopped."""
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": MODEL_URI}, "method": {"type": "lora", "lora": {"rank": 4, "alpha": 8}},
            "data": {"uri": DATA_URI, "resolution": 64},
            "output": {"uri": f"s3://outputs/{namespace}-{name}/", "checkpointEvery": 1000, "keepCheckpoints": 2},
            "training": {"maxSteps": MAX_STEPS, "batchSize": 2, "learningRate": 1.0e-3, "seed": 7},
            "storage": {"endpoint": endpoint, "secretRef": {"name": SECRET_NAME}},
            "resources": {"nodes": 1, "gpusPerNode": 1, "cpu": "2", "memory": "4Gi"},
            "scheduling": {"queueName": "gpus", "priorityClassName": priority},
            "runPolicy": {"backoffLimit": 0, "terminationGracePeriodSeconds": 60},
        },
    }


def _steps(trace: Path) -> list[int]:
    path = trace / "rank-0.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r["step"] for r in map(json.loads, lines) if r["event"] == "step"]


def _priority_class(api: client.ApiClient, name: str, value: int) -> str:
    client.SchedulingV1Api(api).create_priority_class({"metadata": {"name": name}, "value": value})
    return name


@pytest.mark.e2e
def test_a_higher_priority_job_preempts_a_running_one_which_checkpoints_resumes_and_finishes(
        kueue: Kueue, kube_admin: client.ApiClient, namespace: str, start_operator: Any, s3: Any,
        tmp_path: Path) -> None:
    GpuQueue.create(kube_admin, namespace, gpus=1)
    low = _priority_class(kube_admin, f"low-{namespace}", 100)
    high = _priority_class(kube_admin, f"high-{namespace}", 1000)
    create_credentials(kube_admin, namespace)
    start_operator(metrics_port=free_port(), master_port=free_port(), progress_timeout_seconds=1.0)
    output = f"s3://outputs/{namespace}-corgi/"
    create(kube_admin, _trained(namespace, "corgi", s3.endpoint, low))
    [pod] = running_pods(kube_admin, namespace, 1, name="corgi")
    runners = [LocalPodRunner(kube_admin, tmp_path / "first", extra_env={TRACE_ENV: str(tmp_path / "trace-1")})]
    try:
        first = runners[0].start(namespace, pod.metadata.name)
        fakegpu.wait_for(lambda: len(_steps(tmp_path / "trace-1")) >= 3 or first.done.is_set(), timeout=300,
                         interval=0.05, what="three steps of the low-priority job")
        assert not first.done.is_set(), first.output()[-3000:]

        create(kube_admin, ftj(namespace, "urgent", scheduling={"queueName": "gpus", "priorityClassName": high},
                               resources={"nodes": 1, "gpusPerNode": 1, "cpu": "2", "memory": "4Gi"}))
        stopped = first.wait(timeout=180)  # Kueue suspends its Job; the Job controller deletes the pod: SIGTERM
        assert stopped.exit_code == 143, stopped.output[-3000:]
        [checkpoint] = complete_checkpoints(s3, output)
        assert checkpoint == _steps(tmp_path / "trace-1")[-1] < MAX_STEPS, "checkpointed at the step it stopped"
        held = wait_phase(kube_admin, namespace, "Suspended", name="corgi")
        assert condition(held, "Suspended")["reason"] == "Queued"

        [urgent] = running_pods(kube_admin, namespace, 1, name="urgent")
        fakegpu.finish_pod(kube_admin, namespace, urgent.metadata.name, 0,
                           message='{"phase": "Succeeded", "outputs": {"uri": "s3://outputs/urgent/final/"}}')
        wait_phase(kube_admin, namespace, "Succeeded", name="urgent")

        [again] = running_pods(kube_admin, namespace, 1, name="corgi", exclude=pod.metadata.name)
        trace = {TRACE_ENV: str(tmp_path / "trace-2")}
        runners.append(LocalPodRunner(kube_admin, tmp_path / "second", extra_env=trace))
        second = runners[1].run(namespace, again.metadata.name)
        assert second.exit_code == 0, second.output[-3000:]
    finally:
        for runner in runners:
            runner.close()
    done = wait_phase(kube_admin, namespace, "Succeeded", name="corgi", timeout=120)
    assert _steps(tmp_path / "trace-2") == list(range(checkpoint + 1, MAX_STEPS + 1)), "resumed from its checkpoint"
    assert done["status"]["progress"]["step"] == MAX_STEPS and done["status"]["restarts"] == 0
    assert condition(done, "Suspended")["reason"] == "Admitted"
    print(f"\n[e2e] preempted after step {checkpoint}, resumed, {MAX_STEPS} steps in all")
