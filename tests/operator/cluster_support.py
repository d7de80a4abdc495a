"""Helpers for the operator's tests on the real control plane: an in-process operator that
acts as its own ServiceAccount, bound to the RBAC shipped in `manifests/operator.yaml` and under
its admission policy, and small readers for FineTuneJobs, their children and their events.
"""

from __future__ import annotations

import gc
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakegpu
import yaml
from kubernetes import client, watch

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
LEASE = "kubetune-operator"
TIMEOUT = 60
OPERATOR_SA = "kubetune-operator"
MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "operator.yaml"
RBAC = "rbac.authorization.k8s.io"


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shipped_rbac() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ClusterRoles and the leader-election Role that `manifests/operator.yaml` installs."""
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    roles = [d for d in docs if d["kind"] == "Role"]
    assert cluster_roles and roles, f"{MANIFEST} has no ClusterRole or Role"
    return cluster_roles, roles


def shipped_admission_policy(namespace: str) -> list[dict[str, Any]]:
    """The admission policies and bindings `manifests/operator.yaml` installs, for the operator's
    ServiceAccount in `namespace` (named `<name>-<namespace>`)."""
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    shipped = [d for d in docs if d["kind"].startswith("ValidatingAdmissionPolicy")]
    assert shipped, f"{MANIFEST} has no ValidatingAdmissionPolicy"
    text = yaml.safe_dump(shipped).replace(
        f"system:serviceaccount:kubetune-system:{OPERATOR_SA}", f"system:serviceaccount:{namespace}:{OPERATOR_SA}")
    out = yaml.safe_load(text)
    for doc in out:
        doc["metadata"] = {"name": f"{doc['metadata']['name']}-{namespace}"}
        if doc["kind"] == "ValidatingAdmissionPolicyBinding":
            doc["spec"]["policyName"] += f"-{namespace}"
    return out


def _ensure_cluster_role(rbac: client.RbacAuthorizationV1Api, role: dict[str, Any]) -> None:
    body = {"metadata": {"name": role["metadata"]["name"]}, "rules": role["rules"]}
    try:
        rbac.create_cluster_role(body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        rbac.replace_cluster_role(body["metadata"]["name"], body)


def grant_operator_rights(api: client.ApiClient, namespace: str, extra_rules: list[dict[str, Any]]) -> None:
    """Bind a ServiceAccount in `namespace` to the shipped ClusterRoles and Roles, under the
    shipped admission policy.

    `extra_rules` (for example the optional Secret check) go into a ClusterRole of their own,
    so the shipped ones are never widened.
    """
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": OPERATOR_SA}})
    subject = [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": namespace}]
    cluster_roles, roles = shipped_rbac()
    names = []
    for role in cluster_roles:
        _ensure_cluster_role(rbac, role)
        names.append(role["metadata"]["name"])
    if extra_rules:
        names.append(f"kubetune-extra-{namespace}")
        rbac.create_cluster_role({"metadata": {"name": names[-1]}, "rules": extra_rules})
    for name in names:
        rbac.create_cluster_role_binding({
            "metadata": {"name": f"{name}-{namespace}"}, "subjects": subject,
            "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": name}})
    for role in roles:
        name = role["metadata"]["name"]
        rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": role["rules"]})
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": name}, "subjects": subject,
            "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": name}})
    admission = client.AdmissionregistrationV1Api(api)
    for doc in shipped_admission_policy(namespace):
        if doc["kind"] == "ValidatingAdmissionPolicy":
            admission.create_validating_admission_policy(doc)
        else:
            admission.create_validating_admission_policy_binding(doc)


def revoke_operator_rights(api: client.ApiClient, namespace: str) -> None:
    rbac = client.RbacAuthorizationV1Api(api)
    for binding in rbac.list_cluster_role_binding().items:
        if binding.metadata.name.endswith(f"-{namespace}"):
            rbac.delete_cluster_role_binding(binding.metadata.name)
    for role in rbac.list_cluster_role().items:
        if role.metadata.name == f"kubetune-extra-{namespace}":
            rbac.delete_cluster_role(role.metadata.name)
    admission = client.AdmissionregistrationV1Api(api)
    for doc in shipped_admission_policy(namespace):
        if doc["kind"] == "ValidatingAdmissionPolicy":
            admission.delete_validating_admission_policy(doc["metadata"]["name"])
        else:
            admission.delete_validating_admission_policy_binding(doc["metadata"]["name"])


def can_list_jobs(api: client.ApiClient, namespace: str) -> bool:
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


def patch_spec(api: client.ApiClient, namespace: str, spec: dict[str, Any], name: str = "corgi") -> None:
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": spec})


def wait_phase(api: client.ApiClient, namespace: str, phase: str, name: str = "corgi",
               timeout: float = TIMEOUT) -> dict[str, Any]:
    """The first version of the FineTuneJob in `phase`, from now on.

    Watched, not polled: a phase the operator passes through in less than a poll interval
    (Restarting, when the next attempt's pods start at once) is still seen, because every
    status write is a version of its own.
    """
    objects = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    current = read(api, namespace, name)
    version = current["metadata"]["resourceVersion"]
    while (current.get("status") or {}).get("phase") != phase:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for FineTuneJob {namespace}/{name} "
                               f"to be {phase}\n{cluster_state(api, namespace, name)}")
        stream = watch.Watch().stream(objects.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                                      field_selector=f"metadata.name={name}", resource_version=version,
                                      timeout_seconds=max(1, int(left)), _request_timeout=left + 5)
        for event in stream:
            obj = event["object"]
            version = obj.get("metadata", {}).get("resourceVersion", version)
            if event["type"] in ("ADDED", "MODIFIED") and (obj.get("status") or {}).get("phase") == phase:
                return obj
        current = read(api, namespace, name)  # the watch ended (its timeout, or a closed stream): look again
    return current


def cluster_state(api: client.ApiClient, namespace: str, name: str = "corgi") -> str:
    """What the FineTuneJob, its Jobs and pods look like now: a timed-out wait says why it waited."""
    lines = []
    status = read(api, namespace, name).get("status") or {}
    lines.append(f"FineTuneJob status: phase={status.get('phase')} message={status.get('message')!r}")
    for job in client.BatchV1Api(api).list_namespaced_job(namespace).items:
        conds = [(c.type, c.status, c.reason) for c in job.status.conditions or []]
        lines.append(f"Job {job.metadata.name} uid={job.metadata.uid} deleting={job.metadata.deletion_timestamp} "
                     f"active={job.status.active} failed={job.status.failed} conditions={conds}")
    for pod in client.CoreV1Api(api).list_namespaced_pod(namespace).items:
        states = [(s.name, s.state.terminated.exit_code if s.state and s.state.terminated else None)
                  for s in pod.status.container_statuses or []]
        conds = [(c.type, c.status, c.reason) for c in pod.status.conditions or []]
        lines.append(f"Pod {pod.metadata.name} phase={pod.status.phase} deleting={pod.metadata.deletion_timestamp} "
                     f"finalizers={pod.metadata.finalizers} terminated={states} conditions={conds}")
    return "\n".join(lines)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def running_pods(api: client.ApiClient, namespace: str, count: int, job_uid: str | None = None,
                 exclude: str = "", name: str = "corgi") -> list[Any]:
    core = client.CoreV1Api(api)

    def wanted(pod: Any) -> bool:
        owner_ok = job_uid is None or pod.metadata.owner_references[0].uid == job_uid
        return pod.status.phase == "Running" and owner_ok and pod.metadata.name != exclude

    def ready() -> list[Any] | None:
        pods = core.list_namespaced_pod(namespace, label_selector=f"kubetune.io/job-name={name}").items
        running = [p for p in pods if wanted(p)]
        return running if len(running) == count else None

    return fakegpu.wait_for(ready, timeout=TIMEOUT, what=f"{count} running trainer pods")


def batch_job(api: client.ApiClient, namespace: str, name: str = "corgi") -> Any:
    return client.BatchV1Api(api).read_namespaced_job(name, namespace)


def job_or_none(api: client.ApiClient, namespace: str, name: str = "corgi") -> Any:
    try:
        return batch_job(api, namespace, name)
    except client.ApiException:
        return None


def event_reasons(api: client.ApiClient, namespace: str, name: str = "corgi") -> list[str]:
    events = client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob").items
    # creationTimestamp has 1 s resolution; an Event is written once, so its resourceVersion orders creation
    return [e.reason for e in sorted(events, key=lambda e: int(e.metadata.resource_version))]


def result_message(**fields: Any) -> str:
    """A trainer's termination message."""
    return json.dumps(fields)
