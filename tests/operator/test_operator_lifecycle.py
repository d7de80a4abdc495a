"""Phase and condition transitions on the real control plane, one test per path through them.

`docs/operator.md` has the table of transitions and names the test that walks each one.
Conditions are checked for the rule users build on: `lastTransitionTime` moves only when a
condition's status flips.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import fakegpu
import pytest
from cluster_support import (
    GROUP,
    PLURAL,
    TIMEOUT,
    VERSION,
    batch_job,
    condition,
    create,
    event_reasons,
    ftj,
    job_or_none,
    patch_spec,
    read,
    result_message,
    running_pods,
    wait_phase,
)
from kubernetes import client

pytestmark = pytest.mark.integration


def _stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj["status"]["conditions"]}


def _new_job(api: client.ApiClient, namespace: str, old_uid: str) -> Any:
    return fakegpu.wait_for(lambda: (j := job_or_none(api, namespace)) and j.metadata.uid != old_uid and j,
                            timeout=TIMEOUT, what="a new Job for the next attempt")


def test_conditions_through_failure_backoff_retry_and_success(kube_admin, namespace, start_operator) -> None:
    """Pending -> Staging -> Restarting (backing off) -> Staging -> Succeeded."""
    start_operator(restart_backoff_seconds=3.0)
    create(kube_admin, ftj(namespace))
    [pod] = running_pods(kube_admin, namespace, 1)
    staging = wait_phase(kube_admin, namespace, "Staging")
    first = _conditions(staging)
    assert first["Created"]["status"] == "True" and first["Running"]["status"] == "True"
    assert first["Running"]["reason"] == "Staging"
    assert {first[t]["status"] for t in ("Restarting", "Suspended", "Succeeded", "Failed")} == {"False"}
    assert staging["status"]["observedGeneration"] == staging["metadata"]["generation"]
    assert staging["status"]["startTime"]

    old_uid = batch_job(kube_admin, namespace).metadata.uid
    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 1, message="NCCL error: unhandled system error")
    restarting = wait_phase(kube_admin, namespace, "Restarting")
    second = _conditions(restarting)
    assert second["Restarting"]["status"] == "True" and "NCCL error" in second["Restarting"]["message"]
    assert second["Running"]["status"] == "False"
    assert second["Created"]["lastTransitionTime"] == first["Created"]["lastTransitionTime"]
    assert restarting["status"]["restarts"] == 1

    new = _new_job(kube_admin, namespace, old_uid)
    waited = (new.metadata.creation_timestamp - _stamp(second["Restarting"]["lastTransitionTime"])).total_seconds()
    assert waited >= 2, f"the next attempt started {waited}s after the failure; the back-off is 3 s"
    [pod] = running_pods(kube_admin, namespace, 1, job_uid=new.metadata.uid)
    third = _conditions(wait_phase(kube_admin, namespace, "Staging"))
    assert third["Restarting"]["status"] == "False" and third["Running"]["status"] == "True"
    assert third["Running"]["lastTransitionTime"] >= second["Restarting"]["lastTransitionTime"]

    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 0,
                       message=result_message(phase="Succeeded", outputs={"uri": "s3://outputs/corgi/final/"}))
    done = wait_phase(kube_admin, namespace, "Succeeded")
    last = _conditions(done)
    assert last["Succeeded"]["status"] == "True" and last["Running"]["status"] == "False"
    assert done["status"]["completionTime"] and done["status"]["restarts"] == 1
    reasons = fakegpu.wait_for(lambda: (r := event_reasons(kube_admin, namespace)) and "Succeeded" in r and r,
                               what="the Succeeded event")
    assert reasons.index("Restarting") < reasons.index("Succeeded")


def test_backoff_limit_exhausted_fails(kube_admin, namespace, start_operator) -> None:
    """Staging -> Restarting -> Staging -> Failed (BackoffLimitExceeded)."""
    start_operator()
    create(kube_admin, ftj(namespace, runPolicy={"backoffLimit": 1}))
    for attempt in range(2):
        [pod] = running_pods(kube_admin, namespace, 1)
        fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 1, message=f"attempt {attempt} crashed")
        if attempt == 0:
            wait_phase(kube_admin, namespace, "Restarting")
            _new_job(kube_admin, namespace, pod.metadata.owner_references[0].uid)
    failed = wait_phase(kube_admin, namespace, "Failed")
    assert condition(failed, "Failed")["reason"] == "BackoffLimitExceeded"
    assert "attempt 1 crashed" in condition(failed, "Failed")["message"]
    assert failed["status"]["restarts"] == 1


def test_suspending_a_running_job_and_resuming_it(kube_admin, namespace, start_operator) -> None:
    """Staging -> Suspended -> Staging, on the same Job, without counting a restart."""
    start_operator()
    create(kube_admin, ftj(namespace))
    running_pods(kube_admin, namespace, 1)
    before = _conditions(wait_phase(kube_admin, namespace, "Staging"))
    uid = batch_job(kube_admin, namespace).metadata.uid
    patch_spec(kube_admin, namespace, {"runPolicy": {"suspend": True}})
    suspended = wait_phase(kube_admin, namespace, "Suspended")
    assert condition(suspended, "Suspended")["status"] == "True"
    assert condition(suspended, "Running")["status"] == "False"
    core = client.CoreV1Api(kube_admin)
    fakegpu.wait_for(lambda: not [p for p in core.list_namespaced_pod(namespace).items
                                  if not p.metadata.deletion_timestamp], timeout=TIMEOUT, what="pods to go")
    patch_spec(kube_admin, namespace, {"runPolicy": {"suspend": False}})
    running_pods(kube_admin, namespace, 1)
    resumed = wait_phase(kube_admin, namespace, "Staging")
    assert batch_job(kube_admin, namespace).metadata.uid == uid and resumed["status"]["restarts"] == 0
    after = _conditions(resumed)
    assert after["Suspended"]["status"] == "False"
    assert after["Running"]["lastTransitionTime"] >= before["Running"]["lastTransitionTime"]
    reasons = fakegpu.wait_for(lambda: (r := event_reasons(kube_admin, namespace)) and "Suspended" in r
                               and "Staging" in r[r.index("Suspended"):] and r, what="events after the resume")
    assert "Staging" in reasons[reasons.index("Suspended"):], reasons


def test_deleting_the_finetunejob_removes_every_child(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, nodes=2))
    running_pods(kube_admin, namespace, 2)
    client.CustomObjectsApi(kube_admin).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "corgi")
    core, batch = client.CoreV1Api(kube_admin), client.BatchV1Api(kube_admin)

    def gone() -> bool:
        selector = "kubetune.io/job-name=corgi"
        left = [*batch.list_namespaced_job(namespace, label_selector=selector).items,
                *core.list_namespaced_config_map(namespace, label_selector=selector).items,
                *core.list_namespaced_service(namespace, label_selector=selector).items,
                *core.list_namespaced_pod(namespace, label_selector=selector).items]
        return not left

    fakegpu.wait_for(gone, timeout=TIMEOUT, what="the garbage collector to delete the Job, pods, ConfigMap, Service")


def _pods(api: client.ApiClient, namespace: str) -> list[Any]:
    return client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="kubetune.io/job-name=corgi").items


def _stuck_waiting(api: client.ApiClient, namespace: str, name: str, reason: str, message: str) -> None:
    """What the kubelet reports for a container it cannot start (kwok plays no image pulls)."""
    status = {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}],
              "containerStatuses": [{"name": "trainer", "image": "x", "imageID": "", "ready": False,
                                     "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}]}
    client.CoreV1Api(api).patch_namespaced_pod_status(name, namespace, {"status": status})


def test_a_bad_image_is_reported_and_never_retried(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, image="registry.invalid/no-such-trainer:1"))
    [pod] = running_pods(kube_admin, namespace, 1)
    uid = batch_job(kube_admin, namespace).metadata.uid
    _stuck_waiting(kube_admin, namespace, pod.metadata.name, "ImagePullBackOff",
                   'Back-off pulling image "registry.invalid/no-such-trainer:1"')
    pending = fakegpu.wait_for(
        lambda: (o := read(kube_admin, namespace))["status"].get("conditions") and
        condition(o, "Running")["reason"] == "ContainerWaiting" and o, timeout=TIMEOUT, what="ContainerWaiting")
    assert pending["status"]["phase"] == "Pending"
    assert "no-such-trainer" in pending["status"]["message"] and "ImagePullBackOff" in pending["status"]["message"]
    fakegpu.wait_for(lambda: "ContainerWaiting" in event_reasons(kube_admin, namespace), what="a warning event")
    time.sleep(3.0)  # three resync periods: the operator must neither restart nor fail the job
    again = read(kube_admin, namespace)
    assert again["status"]["phase"] == "Pending" and again["status"]["restarts"] == 0
    assert batch_job(kube_admin, namespace).metadata.uid == uid and len(_pods(kube_admin, namespace)) == 1


@pytest.mark.parametrize("operator_extra_rules", [[]], ids=["shipped-rbac-only"])
def test_a_missing_secret_without_secret_rights_is_reported_from_the_pod(kube_admin, namespace,
                                                                         start_operator) -> None:
    """With only the shipped RBAC the operator cannot read Secrets; the kubelet's complaint is the news."""
    start_operator()
    create(kube_admin, ftj(namespace, storage={"secretRef": {"name": "s3-credentials"}}))
    [pod] = running_pods(kube_admin, namespace, 1)
    _stuck_waiting(kube_admin, namespace, pod.metadata.name, "CreateContainerConfigError",
                   'secret "s3-credentials" not found')
    pending = fakegpu.wait_for(
        lambda: (o := read(kube_admin, namespace))["status"].get("conditions") and
        condition(o, "Running")["reason"] == "ContainerWaiting" and o, timeout=TIMEOUT, what="ContainerWaiting")
    assert 'secret "s3-credentials" not found' in pending["status"]["message"]
    assert pending["status"]["restarts"] == 0


def test_an_operator_stopped_mid_batch_leaves_no_duplicates(kube_admin, namespace, start_operator) -> None:
    """Five jobs created at once; the operator is stopped as soon as the first Job exists and a
    second one finishes the work: exactly one ConfigMap, Service and Job per FineTuneJob."""
    names = [f"dog-{i}" for i in range(5)]
    first = start_operator("op-a", lease_seconds=2)
    for name in names:
        create(kube_admin, ftj(namespace, name=name, resources={"gpusPerNode": 1, "cpu": "1", "memory": "1Gi"}))
    batch, core = client.BatchV1Api(kube_admin), client.CoreV1Api(kube_admin)
    fakegpu.wait_for(lambda: batch.list_namespaced_job(namespace).items, timeout=TIMEOUT, what="a first Job")
    first.halt()
    start_operator("op-b", lease_seconds=2)
    for name in names:
        wait_phase(kube_admin, namespace, "Staging", name=name, timeout=2 * TIMEOUT)
    jobs = [j.metadata.name for j in batch.list_namespaced_job(namespace).items]
    maps = [c.metadata.name for c in core.list_namespaced_config_map(namespace).items
            if c.metadata.name != "kube-root-ca.crt"]
    services = [s.metadata.name for s in core.list_namespaced_service(namespace).items]
    assert sorted(jobs) == names and sorted(services) == names
    assert sorted(maps) == [f"{n}-config" for n in names]
