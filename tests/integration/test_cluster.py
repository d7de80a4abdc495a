"""Prove the test control plane is the real thing, before the operator relies on it.

Each test exercises behaviour a mock would fake: API-server validation of the CRD
(OpenAPI schema and CEL), printer columns through kubectl, RBAC on ServiceAccount
tokens, the Job controller and scheduler placing Indexed Job pods on fake GPU
nodes, exit codes and DisruptionTarget seen by podFailurePolicy (also after the
taint-eviction controller empties a failed node), the garbage collector and the
TTL-after-finished controller.
"""

from __future__ import annotations

import copy
from pathlib import Path

import fakegpu
import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "lora-sd15.yaml"
GPU_NODES = {spec.name for spec in fakegpu.DEFAULT_NODES if spec.gpus}


def trainer_job(name: str, completions: int = 1, **spec: object) -> dict:
    """An Indexed Job shaped like the operator's: one 8-GPU pod per completion index."""
    container = {"name": "trainer", "image": "registry.invalid/kubetune-trainer:test",
                 "resources": {"limits": {"nvidia.com/gpu": "8"}}}
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed", "completions": completions,
            "parallelism": completions, "backoffLimit": 0, **spec,
            "template": {"spec": {
                "restartPolicy": "Never", "containers": [container],
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "automountServiceAccountToken": False,
            }},
        },
    }


def job_pods(api: client.ApiClient, namespace: str, job: str,
             phase: str | None = None) -> list[client.V1Pod]:
    pods = client.CoreV1Api(api).list_namespaced_pod(
        namespace, label_selector=f"batch.kubernetes.io/job-name={job}").items
    return [p for p in pods if phase is None or p.status.phase == phase]


def wait_job_pods(api: client.ApiClient, namespace: str, job: str, count: int,
                  phase: str = "Running") -> list[client.V1Pod]:
    return fakegpu.wait_for(
        lambda: (lambda pods: pods if len(pods) == count else None)(
            job_pods(api, namespace, job, phase)),
        timeout=60, what=f"{count} {phase} pods of job {namespace}/{job}")


def job_condition(api: client.ApiClient, namespace: str, job: str,
                  kind: str) -> client.V1JobCondition | None:
    status = client.BatchV1Api(api).read_namespaced_job_status(job, namespace).status
    return next((c for c in status.conditions or []
                 if c.type == kind and c.status == "True"), None)


def example_ftj(namespace: str, name: str = "corgi-lora") -> dict:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"] = {"name": name, "namespace": namespace}
    return manifest


def create_ftj(api: client.ApiClient, manifest: dict) -> dict:
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kubetune.io", "v1alpha1", manifest["metadata"]["namespace"], "finetunejobs",
        manifest)


IGNORE_DISRUPTION = {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
"""A node lost or drained does not count against the Job's backoffLimit."""

def test_service_account_token_is_bound_by_rbac(kube_admin, namespace,
                                               service_account_client) -> None:
    core, rbac = client.CoreV1Api(kube_admin), client.RbacAuthorizationV1Api(kube_admin)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    reader = client.CoreV1Api(service_account_client(namespace, "reader"))
    with pytest.raises(ApiException) as denied:
        reader.list_namespaced_pod(namespace)
    assert denied.value.status == 403

    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "pod-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})
    fakegpu.wait_for(lambda: _can_list_pods(reader, namespace), what="RBAC to allow list")
    with pytest.raises(ApiException) as still_denied:
        reader.list_namespaced_secret(namespace)
    assert still_denied.value.status == 403


def _can_list_pods(core: client.CoreV1Api, namespace: str) -> bool:
    try:
        core.list_namespaced_pod(namespace)
    except ApiException:
        return False
    return True


@pytest.mark.parametrize(("mutate", "expected"), [
    pytest.param(lambda s: s["method"].update(type="bogus"), "Unsupported value",
                 id="schema-enum"),
    pytest.param(lambda s: s["data"].update(resolution=500), "multiple of 8", id="cel-rule"),
    pytest.param(lambda s: s.pop("model"), "spec.model", id="schema-required"),
])
def test_api_server_rejects_bad_finetunejob(kube_admin, namespace, finetunejob_crd,
                                            mutate, expected) -> None:
    manifest = example_ftj(namespace)
    mutate(manifest["spec"])
    with pytest.raises(ApiException) as rejected:
        create_ftj(kube_admin, manifest)
    assert rejected.value.status == 422, rejected.value.body
    assert expected in rejected.value.body


def test_kubectl_apply_example_shows_printer_columns(kube_admin, kubectl,
                                                     finetunejob_crd) -> None:
    namespace = yaml.safe_load(EXAMPLE.read_text())["metadata"]["namespace"]
    kubectl("wait", "--for=delete", f"namespace/{namespace}", "--timeout=60s")  # a rerun
    kubectl("create", "namespace", namespace)
    try:
        applied = kubectl("apply", "-f", str(EXAMPLE))
        assert applied.returncode == 0, applied.stderr
        table = kubectl("get", "ftj", "-n", namespace)
        assert table.returncode == 0, table.stderr
        header = table.stdout.splitlines()[0].split()
        assert header == ["NAME", "PHASE", "PROGRESS", "STEP", "LOSS", "AGE"]
        assert table.stdout.splitlines()[1].split()[0] == "corgi-lora"
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false")


def test_status_subresource_ignores_spec_changes(kube_admin, namespace,
                                                 finetunejob_crd) -> None:
    custom = client.CustomObjectsApi(kube_admin)
    created = create_ftj(kube_admin, example_ftj(namespace))
    changed = copy.deepcopy(created)
    changed["spec"]["training"]["maxSteps"] = 7
    changed["status"] = {"phase": "Running"}
    after = custom.replace_namespaced_custom_object_status(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", "corgi-lora", changed)
    assert after["status"]["phase"] == "Running"
    assert after["spec"]["training"]["maxSteps"] == created["spec"]["training"]["maxSteps"]


def test_indexed_job_pods_run_on_fake_gpu_nodes(kube_admin, namespace) -> None:
    client.BatchV1Api(kube_admin).create_namespaced_job(namespace, trainer_job("train", 2))
    pods = wait_job_pods(kube_admin, namespace, "train", 2)
    indexes = sorted(p.metadata.annotations["batch.kubernetes.io/job-completion-index"]
                     for p in pods)
    assert indexes == ["0", "1"]
    assert {p.spec.node_name for p in pods} <= GPU_NODES
    assert len({p.spec.node_name for p in pods}) == 2  # 8 GPUs each: one pod per node

    for pod in pods:
        fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 0)
    fakegpu.wait_for(lambda: job_condition(kube_admin, namespace, "train", "Complete"),
                     what="the Job controller to mark the job Complete")


def test_pod_failure_with_chosen_exit_code_fails_job(kube_admin, namespace) -> None:
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {
        "containerName": "trainer", "operator": "In", "values": [3]}}]}
    job = trainer_job("bad-config", backoffLimit=5, podFailurePolicy=policy)
    client.BatchV1Api(kube_admin).create_namespaced_job(namespace, job)
    [pod] = wait_job_pods(kube_admin, namespace, "bad-config", 1)

    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 3, message="bad dataset")
    failed = fakegpu.wait_for_pod_phase(kube_admin, namespace, pod.metadata.name, "Failed")
    terminated = failed.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.message) == (3, "bad dataset")
    condition = fakegpu.wait_for(
        lambda: job_condition(kube_admin, namespace, "bad-config", "Failed"),
        what="the Job controller to fail the job")
    assert condition.reason == "PodFailurePolicy"


def test_disruption_target_is_not_counted_against_backoff(kube_admin, namespace) -> None:
    job = trainer_job("preempted", backoffLimit=0, podFailurePolicy=IGNORE_DISRUPTION)
    client.BatchV1Api(kube_admin).create_namespaced_job(namespace, job)
    [first] = wait_job_pods(kube_admin, namespace, "preempted", 1)

    fakegpu.add_disruption_target(kube_admin, namespace, first.metadata.name)
    fakegpu.finish_pod(kube_admin, namespace, first.metadata.name, 137)
    failed = fakegpu.wait_for_pod_phase(kube_admin, namespace, first.metadata.name, "Failed")
    assert any(c.type == "DisruptionTarget" for c in failed.status.conditions)
    [second] = wait_job_pods(kube_admin, namespace, "preempted", 1)
    assert second.metadata.name != first.metadata.name
    assert job_condition(kube_admin, namespace, "preempted", "Failed") is None


def test_node_failure_evicts_pod_and_job_replaces_it(kube_admin, namespace) -> None:
    job = trainer_job("node-loss", backoffLimit=0, podFailurePolicy=IGNORE_DISRUPTION)
    client.BatchV1Api(kube_admin).create_namespaced_job(namespace, job)
    [first] = wait_job_pods(kube_admin, namespace, "node-loss", 1)
    node = first.spec.node_name
    try:
        fakegpu.fail_node(kube_admin, node)
        [second] = fakegpu.wait_for(
            lambda: [p for p in job_pods(kube_admin, namespace, "node-loss", "Running")
                     if p.metadata.name != first.metadata.name],
            timeout=60, what="the Job to replace the evicted pod")
    finally:
        fakegpu.heal_node(kube_admin, node)
    assert second.spec.node_name != node
    assert job_condition(kube_admin, namespace, "node-loss", "Failed") is None


def test_garbage_collector_deletes_owned_objects(kube_admin, namespace) -> None:
    core, batch = client.CoreV1Api(kube_admin), client.BatchV1Api(kube_admin)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    owned_by = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                 "uid": owner.metadata.uid, "controller": True,
                 "blockOwnerDeletion": True}]
    job = trainer_job("owned")
    job["metadata"]["ownerReferences"] = owned_by
    batch.create_namespaced_job(namespace, job)
    core.create_namespaced_service(namespace, {
        "metadata": {"name": "owned", "ownerReferences": owned_by},
        "spec": {"clusterIP": "None", "selector": {"batch.kubernetes.io/job-name": "owned"}}})
    wait_job_pods(kube_admin, namespace, "owned", 1)

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Foreground")
    fakegpu.wait_for(
        lambda: not (batch.list_namespaced_job(namespace).items
                     or core.list_namespaced_service(namespace).items
                     or job_pods(kube_admin, namespace, "owned")),
        timeout=60, what="the garbage collector to delete the Job, its pods and the Service")


def test_ttl_after_finished_deletes_job(kube_admin, namespace) -> None:
    batch = client.BatchV1Api(kube_admin)
    batch.create_namespaced_job(namespace, trainer_job("short", ttlSecondsAfterFinished=0))
    [pod] = wait_job_pods(kube_admin, namespace, "short", 1)
    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 0)
    fakegpu.wait_for(lambda: not batch.list_namespaced_job(namespace).items, timeout=60,
                     what="the TTL-after-finished controller to delete the Job")
