"""The operator on a real control plane: real API server, Job controller, scheduler, kwok nodes.

The operator runs in a thread under a ServiceAccount bound to exactly
`kubetune.operator.permissions`, so a missing permission fails here. Pods are driven to
their end with `fakegpu.finish_pod`, the way a trainer would end them.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fakegpu
import pytest
from kubernetes import client

from kubetune.operator.main import run
from kubetune.operator.permissions import CLUSTER_RULES, LEASE_RULES, SECRET_CHECK_RULES
from kubetune.operator.settings import OperatorSettings

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
LEASE = "kubetune-operator"
TIMEOUT = 60


@dataclass
class RunningOperator:
    identity: str
    thread: threading.Thread
    stop: threading.Event
    ready: threading.Event
    port: int
    exit_code: list[int]

    def get(self, path: str) -> tuple[int, str]:
        """Status and body of the operator's HTTP endpoint; 0 while it is not listening yet."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except urllib.error.URLError:
            return 0, ""

    def halt(self) -> None:
        """Stop the operator; collect what Kopf's stopped event loop leaves to the garbage collector.

        Kopf closes its HTTP sessions on the way out, but transports of watch streams cancelled
        mid-read are only reclaimed by the collector, with a ResourceWarning; collect them here,
        where that is expected, instead of in whichever test happens to run next.
        """
        self.stop.set()
        self.thread.join(timeout=30)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _grant_operator_rights(api: client.ApiClient, namespace: str) -> None:
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    name = f"kubetune-operator-{namespace}"
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "kubetune-operator"}})
    subject = [{"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": namespace}]
    rbac.create_cluster_role({"metadata": {"name": name}, "rules": [*CLUSTER_RULES, *SECRET_CHECK_RULES]})
    rbac.create_cluster_role_binding({"metadata": {"name": name}, "subjects": subject, "roleRef": {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}})
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "kubetune-lease"}, "rules": list(LEASE_RULES)})
    rbac.create_namespaced_role_binding(namespace, {"metadata": {"name": "kubetune-lease"}, "subjects": subject,
                                                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                                                "kind": "Role", "name": "kubetune-lease"}})


def _revoke_operator_rights(api: client.ApiClient, namespace: str) -> None:
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.delete_cluster_role_binding(f"kubetune-operator-{namespace}")
    rbac.delete_cluster_role(f"kubetune-operator-{namespace}")


@pytest.fixture
def start_operator(kube_admin: client.ApiClient, namespace: str, finetunejob_crd: str,
                   service_account_client: Callable[[str, str], client.ApiClient]
                   ) -> Iterator[Callable[..., RunningOperator]]:
    """`start(identity)`: an operator watching the test namespace, as its own ServiceAccount."""
    _grant_operator_rights(kube_admin, namespace)
    operator_api = service_account_client(namespace, "kubetune-operator")
    fakegpu.wait_for(lambda: _can_list_jobs(operator_api, namespace), what="the operator's RBAC")
    started: list[RunningOperator] = []

    def start(identity: str = "op-a", lease_seconds: int = 15) -> RunningOperator:
        stop, ready, exit_code = threading.Event(), threading.Event(), []
        settings = OperatorSettings(default_image="registry.invalid/kubetune:test", resync_seconds=1.0,
                                    progress_timeout_seconds=0.2)
        port = _free_port()
        kwargs = {"settings": settings, "configuration": operator_api.configuration, "http_port": port,
                  "identity": identity, "lease": (namespace, LEASE), "lease_seconds": lease_seconds,
                  "stop": stop, "ready": ready}
        thread = threading.Thread(target=lambda: exit_code.append(run([namespace], **kwargs)), daemon=True)
        thread.start()
        started.append(RunningOperator(identity, thread, stop, ready, port, exit_code))
        return started[-1]

    yield start
    for operator in started:
        operator.halt()
    _revoke_operator_rights(kube_admin, namespace)


def _can_list_jobs(api: client.ApiClient, namespace: str) -> bool:
    try:
        client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    except client.ApiException:
        return False
    return True


def ftj(namespace: str, name: str = "corgi", nodes: int = 1, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": "s3://models/sd15/"}, "method": {"type": "lora"},
            "data": {"uri": "s3://datasets/corgis/"}, "output": {"uri": f"s3://outputs/{name}/"},
            "training": {"maxSteps": 100},
            "resources": {"nodes": nodes, "gpusPerNode": 8, "cpu": "8", "memory": "64Gi"},
            "runPolicy": {"backoffLimit": 2},
        },
    }
    body["spec"].update(spec)
    return body


def create(api: client.ApiClient, body: dict[str, Any]) -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, body["metadata"]["namespace"], PLURAL, body)


def read(api: client.ApiClient, namespace: str, name: str = "corgi") -> dict[str, Any]:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def wait_phase(api: client.ApiClient, namespace: str, phase: str, name: str = "corgi",
               timeout: float = TIMEOUT) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj = read(api, namespace, name)
        return obj if (obj.get("status") or {}).get("phase") == phase else None

    return fakegpu.wait_for(reached, timeout=timeout, what=f"FineTuneJob {namespace}/{name} to be {phase}")


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def running_pods(api: client.ApiClient, namespace: str, count: int, job_uid: str | None = None,
                 exclude: str = "") -> list[Any]:
    core = client.CoreV1Api(api)

    def wanted(pod: Any) -> bool:
        owner_ok = job_uid is None or pod.metadata.owner_references[0].uid == job_uid
        return pod.status.phase == "Running" and owner_ok and pod.metadata.name != exclude

    def ready() -> list[Any] | None:
        pods = core.list_namespaced_pod(namespace, label_selector="kubetune.io/job-name=corgi").items
        running = [p for p in pods if wanted(p)]
        return running if len(running) == count else None

    return fakegpu.wait_for(ready, timeout=TIMEOUT, what=f"{count} running trainer pods")


def batch_job(api: client.ApiClient, namespace: str, name: str = "corgi") -> Any:
    return client.BatchV1Api(api).read_namespaced_job(name, namespace)


def event_reasons(api: client.ApiClient, namespace: str, name: str = "corgi") -> list[str]:
    events = client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob").items
    return [e.reason for e in sorted(events, key=lambda e: e.metadata.creation_timestamp)]


def test_job_runs_on_wired_pods_and_succeeds_with_outputs(kube_admin, namespace, start_operator) -> None:
    operator = start_operator()
    create(kube_admin, ftj(namespace, nodes=2))
    pods = running_pods(kube_admin, namespace, 2)
    job = batch_job(kube_admin, namespace)
    assert job.spec.completion_mode == "Indexed" and job.spec.completions == 2
    assert job.metadata.owner_references[0].kind == "FineTuneJob"
    service = client.CoreV1Api(kube_admin).read_namespaced_service("corgi", namespace)
    assert service.spec.cluster_ip == "None"
    env = {e.name: e.value for e in pods[0].spec.containers[0].env}
    assert env["PET_MASTER_ADDR"] == "corgi-0.corgi" and env["PET_NNODES"] == "2"
    assert {p.spec.hostname for p in pods} == {"corgi-0", "corgi-1"}
    staging = wait_phase(kube_admin, namespace, "Staging")
    assert staging["status"]["workers"]["active"] == 2

    result = {"phase": "Succeeded", "exitCode": 0, "reason": "Completed", "message": "training finished",
              "step": 100, "totalSteps": 100, "checkpoints": [{"step": 100, "uri": "s3://outputs/corgi/ckpt/100/",
                                                                "createdAt": "2026-11-21T12:00:00Z"}],
              "outputs": {"uri": "s3://outputs/corgi/final/"}}
    for pod in sorted(pods, key=lambda p: p.metadata.annotations["batch.kubernetes.io/job-completion-index"]):
        fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 0, message=json.dumps(result))
    done = wait_phase(kube_admin, namespace, "Succeeded")
    assert done["status"]["outputs"]["uri"] == "s3://outputs/corgi/final/"
    assert done["status"]["progress"]["percent"] == 100
    assert condition(done, "Succeeded")["status"] == "True"
    reasons = fakegpu.wait_for(lambda: (r := event_reasons(kube_admin, namespace)) and "Succeeded" in r and r,
                               what="the Succeeded event")
    assert {"Creating", "ChildrenCreated", "Staging"} <= set(reasons)
    code, text = operator.get("/metrics")
    assert code == 200 and f'kubetune_operator_jobs_succeeded_total{{namespace="{namespace}"}} 1.0' in text


def test_failed_attempt_restarts_on_a_new_job(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace))
    [pod] = running_pods(kube_admin, namespace, 1)
    first_uid = batch_job(kube_admin, namespace).metadata.uid
    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 1, message="CUDA error: an illegal memory access")
    restarting = wait_phase(kube_admin, namespace, "Restarting")
    assert restarting["status"]["restarts"] == 1
    assert "illegal memory access" in condition(restarting, "Restarting")["message"]
    new = fakegpu.wait_for(lambda: (j := _job_or_none(kube_admin, namespace)) and j.metadata.uid != first_uid and j,
                           timeout=TIMEOUT, what="a new Job for the next attempt")
    assert new.metadata.annotations["kubetune.io/restarts"] == "1"
    running_pods(kube_admin, namespace, 1, job_uid=new.metadata.uid)
    staged = wait_phase(kube_admin, namespace, "Staging")
    assert staged["status"]["restarts"] == 1


def _job_or_none(api: client.ApiClient, namespace: str) -> Any:
    try:
        return batch_job(api, namespace)
    except client.ApiException:
        return None


def test_config_error_fails_at_once(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace))
    [pod] = running_pods(kube_admin, namespace, 1)
    message = json.dumps({"phase": "Failed", "exitCode": 78, "reason": "ConfigError",
                          "message": "model.uri: no model_index.json under s3://models/sd15/"})
    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 78, message=message)
    failed = wait_phase(kube_admin, namespace, "Failed")
    assert condition(failed, "Failed")["reason"] == "ConfigError"
    assert "no model_index.json" in failed["status"]["message"] and failed["status"]["restarts"] == 0


def test_node_disruption_is_not_counted(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace))
    [pod] = running_pods(kube_admin, namespace, 1)
    fakegpu.add_disruption_target(kube_admin, namespace, pod.metadata.name)
    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 137)
    [replacement] = running_pods(kube_admin, namespace, 1, exclude=pod.metadata.name)
    assert replacement.metadata.annotations["batch.kubernetes.io/job-completion-index"] == "0"
    obj = wait_phase(kube_admin, namespace, "Staging")
    assert obj["status"]["restarts"] == 0


def test_missing_secret_then_created(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, storage={"secretRef": {"name": "s3-credentials"}}))
    pending = fakegpu.wait_for(lambda: (o := read(kube_admin, namespace)).get("status", {}).get("message", "")
                               .startswith("Secret s3-credentials") and o, timeout=TIMEOUT, what="SecretNotFound")
    assert condition(pending, "Running")["reason"] == "SecretNotFound"
    assert _job_or_none(kube_admin, namespace) is None
    client.CoreV1Api(kube_admin).create_namespaced_secret(namespace, {
        "metadata": {"name": "s3-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}})
    [pod] = running_pods(kube_admin, namespace, 1)
    refs = {e.name: e.value_from.secret_key_ref.name for e in pod.spec.containers[0].env
            if e.value_from and e.value_from.secret_key_ref}
    assert refs == {"AWS_ACCESS_KEY_ID": "s3-credentials", "AWS_SECRET_ACCESS_KEY": "s3-credentials",
                    "AWS_SESSION_TOKEN": "s3-credentials"}
    configmap = client.CoreV1Api(kube_admin).read_namespaced_config_map("corgi-config", namespace)
    assert "secret" not in configmap.data["job.yaml"].replace("secretRef", "")
    assert "SecretNotFound" in event_reasons(kube_admin, namespace)


def test_spec_the_api_server_accepts_but_the_operator_rejects(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, output={"uri": "s3://datasets/corgis/out/"}))
    failed = wait_phase(kube_admin, namespace, "Failed")
    assert condition(failed, "Failed")["reason"] == "InvalidSpec"
    assert "spec.output.uri" in failed["status"]["message"]
    assert _job_or_none(kube_admin, namespace) is None


def test_suspend_and_resume(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, runPolicy={"suspend": True}))
    wait_phase(kube_admin, namespace, "Suspended")
    assert batch_job(kube_admin, namespace).spec.suspend is True
    client.CustomObjectsApi(kube_admin).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "corgi", {"spec": {"runPolicy": {"suspend": False}}})
    running_pods(kube_admin, namespace, 1)
    wait_phase(kube_admin, namespace, "Staging")


def test_kueue_queue_creates_the_job_suspended(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, scheduling={"queueName": "team-a-gpus"}))
    queued = wait_phase(kube_admin, namespace, "Suspended")
    assert condition(queued, "Suspended")["reason"] == "Queued"
    job = batch_job(kube_admin, namespace)
    assert job.spec.suspend is True and job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    client.BatchV1Api(kube_admin).patch_namespaced_job("corgi", namespace, {"spec": {"suspend": False}})
    running_pods(kube_admin, namespace, 1)
    wait_phase(kube_admin, namespace, "Staging")


def test_two_replicas_only_one_acts(kube_admin, namespace, start_operator) -> None:
    first = start_operator("op-a", lease_seconds=4)
    fakegpu.wait_for(lambda: first.get("/readyz")[0] == 200, timeout=TIMEOUT, what="op-a to lead")
    second = start_operator("op-b", lease_seconds=4)
    fakegpu.wait_for(lambda: second.get("/healthz")[0] == 200, what="op-b to be alive")
    create(kube_admin, ftj(namespace))
    running_pods(kube_admin, namespace, 1)
    assert second.get("/readyz")[0] == 503
    lease = client.CoordinationV1Api(kube_admin).read_namespaced_lease(LEASE, namespace)
    assert lease.spec.holder_identity == "op-a"
    first.halt()
    fakegpu.wait_for(lambda: second.get("/readyz")[0] == 200, timeout=TIMEOUT, what="op-b to take over")
    client.CustomObjectsApi(kube_admin).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "corgi", {"spec": {"runPolicy": {"suspend": True}}})
    wait_phase(kube_admin, namespace, "Suspended")


def test_pods_that_fit_no_node_are_reported(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, nodes=3))  # two untainted 8-GPU nodes
    pending = fakegpu.wait_for(
        lambda: (o := read(kube_admin, namespace)).get("status", {}).get("conditions") and
        condition(o, "Running")["reason"] == "Unschedulable" and o, timeout=TIMEOUT, what="Unschedulable")
    assert pending["status"]["phase"] == "Pending" and "nvidia.com/gpu" in pending["status"]["message"]


def test_deadline_fails_the_job(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, runPolicy={"activeDeadlineSeconds": 2}))
    failed = wait_phase(kube_admin, namespace, "Failed")
    assert condition(failed, "Failed")["reason"] == "DeadlineExceeded" and failed["status"]["restarts"] == 0


def test_ttl_deletes_the_finished_job(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, runPolicy={"ttlSecondsAfterFinished": 1}))
    [pod] = running_pods(kube_admin, namespace, 1)
    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 0, message='{"phase": "Succeeded"}')
    fakegpu.wait_for(lambda: not client.CustomObjectsApi(kube_admin).list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL)["items"], timeout=TIMEOUT, what="the TTL to delete the FineTuneJob")


def test_a_restarted_operator_adopts_what_it_finds(kube_admin, namespace, start_operator) -> None:
    client.CoreV1Api(kube_admin).create_namespaced_config_map(namespace, {
        "metadata": {"name": "corgi-config"}, "data": {"job.yaml": "stale"}})
    first = start_operator("op-a", lease_seconds=2)
    create(kube_admin, ftj(namespace))
    [pod] = running_pods(kube_admin, namespace, 1)
    wait_phase(kube_admin, namespace, "Staging")
    configmap = client.CoreV1Api(kube_admin).read_namespaced_config_map("corgi-config", namespace)
    assert configmap.metadata.owner_references[0].kind == "FineTuneJob"
    assert configmap.data["job.yaml"].startswith("apiVersion: kubetune.io/v1alpha1")
    job_uid = batch_job(kube_admin, namespace).metadata.uid
    first.halt()
    assert first.exit_code == [0]
    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 0,
                       message='{"phase": "Succeeded", "outputs": {"uri": "s3://outputs/corgi/final/"}}')
    start_operator("op-b", lease_seconds=2)
    done = wait_phase(kube_admin, namespace, "Succeeded")
    assert batch_job(kube_admin, namespace).metadata.uid == job_uid
    assert done["status"]["outputs"]["uri"] == "s3://outputs/corgi/final/"


def test_kubetune_operator_command_runs_and_stops_on_sigterm(kube_cluster, kube_admin, namespace,
                                                            finetunejob_crd) -> None:
    port = _free_port()
    env = dict(os.environ, POD_NAMESPACE=namespace, POD_NAME="op-cli", KUBETUNE_RESYNC_SECONDS="1")
    command = [sys.executable, "-m", "kubetune.cli", "operator", "-n", namespace, "--http-port", str(port),
               "--kubeconfig", str(kube_cluster.kubeconfig), "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        probe = RunningOperator("op-cli", threading.Thread(), threading.Event(), threading.Event(), port, [])
        fakegpu.wait_for(lambda: probe.get("/readyz")[0] == 200, timeout=TIMEOUT, what="the operator to lead")
        create(kube_admin, ftj(namespace))
        fakegpu.wait_for(lambda: _job_or_none(kube_admin, namespace), timeout=TIMEOUT, what="the Job")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "Traceback" not in output, output
