"""Least privilege on the real control plane: the chart's defaults plus `watchNamespaces` (the
test's namespace) applied to the cluster, then requests sent with a token of the operator's
ServiceAccount, as a leaked token would send them.

RBAC keeps the operator out of every namespace it does not watch, kube-system included. In the
watched namespace the admission policy keeps its writes to its own children: labelled, owned by
a FineTuneJob, non-root unprivileged Jobs without host namespaces or hostPath, headless
Services; on create and on update. The children the operator really renders, and the patches it
really sends, are admitted.
"""

from __future__ import annotations

import copy
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fakegpu
import pytest
import yaml
from cluster_support import create
from kubernetes import client
from test_operator_e2e import _manifest as e2e_manifest
from test_render import _full_job

from kubetune.api.validation import validate_document
from kubetune.operator import naming
from kubetune.operator.caches import collection_path
from kubetune.operator.kube import JSON, MERGE_PATCH, ApiError, KubeApi
from kubetune.operator.render import render_children
from kubetune.operator.settings import OperatorSettings
from tests.unit.test_chart import CHART, helm

pytestmark = pytest.mark.integration

SETTINGS = OperatorSettings(default_image="registry.invalid/kubetune:test")
RESOURCES = {"Job": "jobs", "ConfigMap": "configmaps", "Service": "services"}
PRIVILEGED_JOB = {
    "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "node-shell"},
    "spec": {"template": {"spec": {
        "hostPID": True, "hostNetwork": True, "restartPolicy": "Never",
        "containers": [{"name": "shell", "image": "busybox", "command": ["nsenter", "-t", "1", "-a", "sh"],
                        "securityContext": {"privileged": True},
                        "volumeMounts": [{"name": "host", "mountPath": "/host"}]}],
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}]}}},
}
"""The Job a leaked token would create: a root shell on the node."""


@dataclass
class Install:
    home: str
    """The release namespace, where the operator's ServiceAccount lives."""
    watched: str
    fullname: str
    operator: KubeApi
    """The operator's own API client, holding a token of its ServiceAccount."""
    user: str

    def refusal(self, method: str, path: str, body: dict[str, Any], dry_run: bool = False) -> ApiError | None:
        try:
            self.operator.request(method, path, body, query={"dryRun": "All"} if dry_run else None,
                                  content_type=MERGE_PATCH if method == "PATCH" else JSON)
        except ApiError as exc:
            return exc
        return None


def _unlabelled_configmap(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe", "namespace": namespace}}


def _policy_enforced(install: Install) -> bool:
    error = install.refusal("POST", collection_path("ConfigMap", install.watched),
                            _unlabelled_configmap(install.watched), dry_run=True)
    return error is not None and error.status == 422


@pytest.fixture(scope="module")
def install(kube_cluster, kube_admin: client.ApiClient) -> Iterator[Install]:
    """The chart applied: release `lp<hex>` in namespace `<release>-home`, watching `<release>-watched`."""
    release = f"lp{uuid.uuid4().hex[:6]}"
    home, watched = f"{release}-home", f"{release}-watched"
    core = client.CoreV1Api(kube_admin)
    for name in (home, watched):
        core.create_namespace({"metadata": {"name": name}})
    rendered = helm("template", release, str(CHART), "--namespace", home, "--set", f"watchNamespaces={{{watched}}}")
    assert rendered.returncode == 0, rendered.stderr
    kubectl = kube_cluster.kubectl_command()
    try:
        applied = subprocess.run([*kubectl, "apply", "--server-side", "-f", "-"], input=rendered.stdout,
                                 capture_output=True, text=True, timeout=60)
        assert applied.returncode == 0, applied.stderr
        fullname = f"{release}-operator"
        token = kube_cluster.service_account_client(home, fullname)
        user = f"system:serviceaccount:{home}:{fullname}"
        result = Install(home, watched, fullname, KubeApi(token.configuration), user)
        fakegpu.wait_for(lambda: _policy_enforced(result), timeout=60, what="the admission policy to take effect")
        yield result
        result.operator.close()
        token.close()
    finally:
        subprocess.run([*kubectl, "delete", "--ignore-not-found", "--wait=false", "-f", "-"], input=rendered.stdout,
                       capture_output=True, text=True, timeout=60)
        for name in (home, watched):
            core.delete_namespace(name)


@pytest.fixture(scope="module")
def corgi(install: Install, kube_admin: client.ApiClient) -> list[dict[str, Any]]:
    """The end-to-end test's FineTuneJob, stored (no operator runs here), and the children the
    operator renders for it: ConfigMap, Service, Job, owned by it."""
    return _stored_children(kube_admin, e2e_manifest(install.watched, "http://127.0.0.1:9"))


def _stored_children(kube_admin: client.ApiClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    create(kube_admin, body)
    stored = client.CustomObjectsApi(kube_admin).get_namespaced_custom_object(
        "kubetune.io", "v1alpha1", body["metadata"]["namespace"], "finetunejobs", body["metadata"]["name"])
    validated = validate_document(stored)
    assert validated.job is not None, [str(p) for p in validated.problems]
    return render_children(validated.job, SETTINGS)


def _path(obj: dict[str, Any]) -> str:
    return f"{collection_path(obj['kind'], obj['metadata']['namespace'])}/{obj['metadata']['name']}"


def _assert_refused_by_policy(error: ApiError | None, install: Install, kind: str, fragment: str) -> None:
    assert error is not None, "admitted"
    policy = f"{install.fullname}-{RESOURCES[kind]}"
    assert error.status == 422 and f"ValidatingAdmissionPolicy '{policy}'" in error.message, error
    assert fragment in " ".join(error.message.split()), error.message


def test_outside_the_watched_namespaces_the_operator_may_not_write(install: Install, kube_cluster) -> None:
    def allowed(verb: str, resource: str, namespace: str, group: str = "") -> bool:
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": {"verb": verb, "group": group, "resource": resource,
                                                  "namespace": namespace}}}
        answer = install.operator.create("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
        return answer["status"]["allowed"]

    for namespace in ("kube-system", "default"):
        assert not allowed("create", "jobs", namespace, "batch"), namespace
        assert not allowed("patch", "configmaps", namespace), namespace
        assert not allowed("create", "services", namespace), namespace
    assert not allowed("create", "jobs", "", "batch")  # cluster-wide
    assert not allowed("list", "pods", "")
    for namespace in (install.watched, install.home):
        assert allowed("create", "jobs", namespace, "batch"), namespace
    assert allowed("list", "namespaces", "")  # Kopf's namespace observer

    can_i = subprocess.run([*kube_cluster.kubectl_command(), "auth", "can-i", "create", "jobs.batch",
                            "--namespace=kube-system", f"--as={install.user}"], capture_output=True, text=True)
    assert (can_i.returncode, can_i.stdout.strip()) == (1, "no"), can_i.stdout + can_i.stderr

    error = install.refusal("POST", collection_path("Job", "kube-system"),
                            {**PRIVILEGED_JOB, "metadata": {"name": "node-shell", "namespace": "kube-system"}},
                            dry_run=True)
    assert error is not None and error.forbidden, error
    assert 'cannot create resource "jobs"' in error.message
    # Where RBAC lets it write, the admission policy refuses the same Job: it is no child of a FineTuneJob.
    error = install.refusal("POST", collection_path("Job", install.watched),
                            {**PRIVILEGED_JOB, "metadata": {"name": "node-shell", "namespace": install.watched}},
                            dry_run=True)
    _assert_refused_by_policy(error, install, "Job", "labels kubetune.io/job-name")


def _container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]


def _privileged(job: dict[str, Any]) -> None:
    _container(job)["securityContext"].update(privileged=True, allowPrivilegeEscalation=True)


def _host_path(job: dict[str, Any]) -> None:
    job["spec"]["template"]["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    _container(job)["volumeMounts"].append({"name": "host", "mountPath": "/host"})


def _host_pid(job: dict[str, Any]) -> None:
    job["spec"]["template"]["spec"]["hostPID"] = True


def _root(job: dict[str, Any]) -> None:
    job["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0, runAsNonRoot=False)
    _container(job)["securityContext"]["runAsNonRoot"] = False


def _with_token(job: dict[str, Any]) -> None:
    job["spec"]["template"]["spec"]["automountServiceAccountToken"] = True


def _unlabelled(obj: dict[str, Any]) -> None:
    del obj["metadata"]["labels"]


def _unowned(obj: dict[str, Any]) -> None:
    del obj["metadata"]["ownerReferences"]


def _external_name(service: dict[str, Any]) -> None:
    service["spec"] = {"type": "ExternalName", "externalName": "collector.attacker.example"}


def _node_port(service: dict[str, Any]) -> None:
    service["spec"] = {**service["spec"], "type": "NodePort"}
    del service["spec"]["clusterIP"]


REFUSED: list[tuple[str, str, Callable[[dict[str, Any]], None], str]] = [
    ("privileged-job", "Job", _privileged, "no privileged containers"),
    ("hostpath-job", "Job", _host_path, "no hostPath volumes"),
    ("hostpid-job", "Job", _host_pid, "no host namespaces"),
    ("root-job", "Job", _root, "trainer pods run as non-root"),
    ("token-job", "Job", _with_token, "without a token"),
    ("unlabelled-configmap", "ConfigMap", _unlabelled, "labels kubetune.io/job-name"),
    ("unowned-configmap", "ConfigMap", _unowned, "controller ownerReference"),
    ("externalname-service", "Service", _external_name, "Services are headless"),
    ("nodeport-service", "Service", _node_port, "Services are headless"),
]


def _bad_child(children: list[dict[str, Any]], name: str, kind: str,
               mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    obj = copy.deepcopy(next(c for c in children if c["kind"] == kind))
    obj["metadata"]["name"] = name
    mutate(obj)
    return obj


@pytest.mark.parametrize(("name", "kind", "mutate", "fragment"), REFUSED, ids=[case[0] for case in REFUSED])
def test_the_policy_refuses_what_the_operator_never_writes_on_create(
        install: Install, corgi: list[dict[str, Any]], name: str, kind: str,
        mutate: Callable[[dict[str, Any]], None], fragment: str) -> None:
    bad = _bad_child(corgi, name, kind, mutate)
    error = install.refusal("POST", collection_path(kind, install.watched), bad)
    _assert_refused_by_policy(error, install, kind, fragment)


@pytest.mark.parametrize(("name", "kind", "mutate", "fragment"), REFUSED, ids=[case[0] for case in REFUSED])
def test_the_policy_refuses_what_the_operator_never_writes_on_update(
        install: Install, corgi: list[dict[str, Any]], kube_admin: client.ApiClient, name: str, kind: str,
        mutate: Callable[[dict[str, Any]], None], fragment: str) -> None:
    """Someone else's object under a child's name: the operator's adoption patch (its labels and
    owner reference), or for a ConfigMap its data patch, is refused; the admin's own create is not."""
    bad = _bad_child(corgi, name, kind, mutate)
    if kind == "ConfigMap":
        stored, patch = bad, {"data": {naming.CONFIG_KEY: "rewritten"}}
    else:
        stored = copy.deepcopy(bad)
        owner, labels = stored["metadata"].pop("ownerReferences"), stored["metadata"].pop("labels")
        if kind == "Job":
            stored["spec"]["suspend"] = True  # no pods: only the object is under test
        patch = {"metadata": {"ownerReferences": owner, "labels": labels}}
    admin = KubeApi(kube_admin.configuration)
    try:
        admin.create(collection_path(kind, install.watched), stored)
    finally:
        admin.close()
    error = install.refusal("PATCH", _path(stored), patch)
    _assert_refused_by_policy(error, install, kind, fragment)


def test_the_children_the_operator_renders_are_admitted(
        install: Install, corgi: list[dict[str, Any]], kube_admin: client.ApiClient) -> None:
    full = _full_job().model_dump(by_alias=True, exclude_none=True, mode="json")
    full["metadata"] = {"name": "every-field", "namespace": install.watched}
    full.pop("status", None)
    every_field = _stored_children(kube_admin, full)
    for child in [*corgi, *every_field]:
        install.operator.create(collection_path(child["kind"], install.watched), child)
    # The updates a pass sends: a rewritten ConfigMap, a suspended and resumed Job.
    configmap, _, job = corgi
    install.operator.merge_patch(_path(configmap), {"data": {naming.CONFIG_KEY: "rewritten"}})
    install.operator.merge_patch(_path(job), {"spec": {"suspend": True}})
    install.operator.merge_patch(_path(job), {"spec": {"suspend": False}})


def test_the_policy_type_checks_against_the_real_schemas(install: Install, kube_admin: client.ApiClient) -> None:
    api = client.AdmissionregistrationV1Api(kube_admin)
    names = [f"{install.fullname}-{resource}" for resource in RESOURCES.values()]

    def checked() -> list[Any] | None:
        policies = [api.read_validating_admission_policy(name) for name in names]
        done = all(p.status and p.status.observed_generation == p.metadata.generation for p in policies)
        return policies if done else None

    for policy in fakegpu.wait_for(checked, timeout=30, what="the policies' type checking"):
        warnings = (policy.status.type_checking and policy.status.type_checking.expression_warnings) or []
        assert not warnings, yaml.safe_dump([w.to_dict() for w in warnings])
