"""Least privilege on the real control plane: the chart's defaults plus `watchNamespaces` (the
test's namespace) applied to the cluster, then requests sent with a token of the operator's
ServiceAccount, as a leaked token would send them.

RBAC keeps the operator out of every namespace it does not watch, kube-system included. In the
watched namespace the admission policy keeps its writes to its own children: labelled, owned by
a FineTuneJob, Jobs at least as strict as Pod Security "baseline" (non-root, unprivileged, no host
namespaces or hostPath, no Secret volumes), headless Services; on create, on update (where the
stored object must already be a child of the same job: no adopting someone else's object) and on
delete. The children the operator renders, and the patches and deletes it really sends, are
admitted.
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
from test_render import DEFAULTS_TABLE, _full_job

from kubetune.api.resource import FineTuneJob
from kubetune.api.validation import validate_document
from kubetune.operator import naming
from kubetune.operator.actions import CreateChild
from kubetune.operator.render import render_children
from kubetune.operator.runtime.kube import ApiError, KubeApi, collection_path
from kubetune.operator.runtime.kube_cluster import ChildConflict, KubeCluster
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
            self.operator.request(method, path, body, query={"dryRun": "All"} if dry_run else None)
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


def _stored_job(kube_admin: client.ApiClient, body: dict[str, Any]) -> FineTuneJob:
    create(kube_admin, body)
    stored = client.CustomObjectsApi(kube_admin).get_namespaced_custom_object(
        "kubetune.io", "v1alpha1", body["metadata"]["namespace"], "finetunejobs", body["metadata"]["name"])
    validated = validate_document(stored)
    assert validated.job is not None, [str(p) for p in validated.problems]
    return validated.job


def _stored_children(kube_admin: client.ApiClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    return render_children(_stored_job(kube_admin, body), SETTINGS)


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
        answer = install.operator.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
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


def _pod_security(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["securityContext"]


def _seccomp_unconfined(job: dict[str, Any]) -> None:
    _pod_security(job)["seccompProfile"] = {"type": "Unconfined"}


def _container_seccomp_unconfined(job: dict[str, Any]) -> None:
    _container(job)["securityContext"]["seccompProfile"] = {"type": "Unconfined"}


def _apparmor_unconfined(job: dict[str, Any]) -> None:
    _container(job)["securityContext"]["appArmorProfile"] = {"type": "Unconfined"}


def _apparmor_annotation(job: dict[str, Any]) -> None:
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    annotations[f"container.apparmor.security.beta.kubernetes.io/{_container(job)['name']}"] = "unconfined"


def _selinux_spc(job: dict[str, Any]) -> None:
    _pod_security(job)["seLinuxOptions"] = {"type": "spc_t"}


def _unsafe_sysctl(job: dict[str, Any]) -> None:
    _pod_security(job)["sysctls"] = [{"name": "kernel.msgmax", "value": "65536"}]


def _proc_mount(job: dict[str, Any]) -> None:
    job["spec"]["template"]["spec"]["hostUsers"] = False
    _container(job)["securityContext"]["procMount"] = "Unmasked"


def _privileged_init_container(job: dict[str, Any]) -> None:
    init = copy.deepcopy(_container(job))
    init.update(name="init", ports=[])
    init["securityContext"].update(privileged=True, allowPrivilegeEscalation=True)
    job["spec"]["template"]["spec"]["initContainers"] = [init]


def _bound_ephemeral_volume(job: dict[str, Any]) -> None:
    claim = {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": "node-root",
             "resources": {"requests": {"storage": "1Gi"}}}
    volumes = job["spec"]["template"]["spec"]["volumes"]
    volumes[:] = [v for v in volumes if v["name"] != "scratch"]
    volumes.append({"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": claim}}})


def _secret_volume(job: dict[str, Any]) -> None:
    job["spec"]["template"]["spec"]["volumes"].append({"name": "loot", "secret": {"secretName": "db-admin"}})
    _container(job)["volumeMounts"].append({"name": "loot", "mountPath": "/loot"})


def _token_volume(job: dict[str, Any]) -> None:
    source = {"serviceAccountToken": {"path": "token", "audience": "https://kubernetes.default.svc"}}
    job["spec"]["template"]["spec"]["volumes"].append({"name": "sa", "projected": {"sources": [source]}})
    _container(job)["volumeMounts"].append({"name": "sa", "mountPath": "/sa"})


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
    ("seccomp-job", "Job", _seccomp_unconfined, "no Unconfined seccompProfile"),
    ("container-seccomp-job", "Job", _container_seccomp_unconfined, "no Unconfined seccompProfile"),
    ("apparmor-job", "Job", _apparmor_unconfined, "no Unconfined AppArmor profile"),
    ("apparmor-annotation-job", "Job", _apparmor_annotation, "no Unconfined AppArmor profile"),
    ("selinux-job", "Job", _selinux_spc, "seLinuxOptions: type only"),
    ("sysctl-job", "Job", _unsafe_sysctl, "only the safe sysctls"),
    ("procmount-job", "Job", _proc_mount, "procMount must be Default"),
    ("privileged-init-job", "Job", _privileged_init_container, "no privileged containers"),
    ("bound-volume-job", "Job", _bound_ephemeral_volume, "volumeClaimTemplate.spec.volumeName"),
    ("secret-volume-job", "Job", _secret_volume, "no Secret volumes"),
    ("token-volume-job", "Job", _token_volume, "no Secret volumes"),
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
    """An orphaned child of the job (labelled, created by an admin, no owner) that breaks a rule:
    the operator's adoption patch (its owner reference), or for a ConfigMap its data patch, is
    refused; the admin's own create is not."""
    bad = _bad_child(corgi, name, kind, mutate)
    if kind == "ConfigMap":
        stored, patch = bad, {"data": {naming.CONFIG_KEY: "rewritten"}}
    else:
        stored = copy.deepcopy(bad)
        patch = {"metadata": {"ownerReferences": stored["metadata"].pop("ownerReferences")}}
        if kind == "Job":
            stored["spec"]["suspend"] = True  # no pods: only the object is under test
    _admin_create(kube_admin, stored)
    error = install.refusal("PATCH", _path(stored), patch)
    _assert_refused_by_policy(error, install, kind, fragment)


def _admin_create(kube_admin: client.ApiClient, obj: dict[str, Any]) -> dict[str, Any]:
    admin = KubeApi(kube_admin.configuration)
    try:
        return admin.request("POST", collection_path(obj["kind"], obj["metadata"]["namespace"]), obj)
    finally:
        admin.close()


def _stranger(children: list[dict[str, Any]], kind: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Someone else's object (no kubetune labels, no owner) under `name`, and the operator's
    adoption patch for it: the labels and owner reference of the child it renders."""
    child = _bad_child(children, name, kind, lambda obj: None)
    meta = child["metadata"]
    patch = {"metadata": {"labels": meta.pop("labels"), "ownerReferences": meta.pop("ownerReferences")}}
    if kind == "Job":  # the API server gives a Job without labels those of its pod template
        child["spec"]["suspend"] = True
        child["spec"]["template"]["metadata"]["labels"] = {"app": "someone-else"}
    return child, patch


STRANGER_KINDS = ["ConfigMap", "Service", "Job"]
ADOPTION = "updates only objects that already are its children"


@pytest.mark.parametrize("kind", STRANGER_KINDS)
def test_the_policy_refuses_to_adopt_someone_elses_object(
        install: Install, corgi: list[dict[str, Any]], kube_admin: client.ApiClient, kind: str) -> None:
    """A leaked token cannot take over an object by labelling and owning it first: the stored
    object must already be a kubetune child, whatever the patch carries besides."""
    stored, patch = _stranger(corgi, kind, f"stranger-{kind.lower()}")
    _admin_create(kube_admin, stored)
    error = install.refusal("PATCH", _path(stored), patch)
    _assert_refused_by_policy(error, install, kind, ADOPTION)
    if kind == "ConfigMap":
        patch["data"] = {"ca.crt": "attacker"}
    elif kind == "Service":
        patch["spec"] = {"selector": {"app": "attacker"}}
    error = install.refusal("PATCH", _path(stored), patch)
    _assert_refused_by_policy(error, install, kind, ADOPTION)


def test_the_policy_refuses_to_take_over_the_namespaces_ca_bundle(
        install: Install, corgi: list[dict[str, Any]]) -> None:
    configmap = next(c for c in corgi if c["kind"] == "ConfigMap")
    path = f"{collection_path('ConfigMap', install.watched)}/kube-root-ca.crt"
    patch = {"metadata": {key: configmap["metadata"][key] for key in ("labels", "ownerReferences")},
             "data": {"ca.crt": "-----BEGIN CERTIFICATE-----\nattacker\n-----END CERTIFICATE-----\n"}}
    _assert_refused_by_policy(install.refusal("PATCH", path, patch), install, "ConfigMap", ADOPTION)


def test_the_policy_refuses_to_move_a_child_to_another_job(
        install: Install, corgi: list[dict[str, Any]], kube_admin: client.ApiClient) -> None:
    """An orphaned child of one job is not another job's to adopt (relabelled in the same patch)."""
    stored = _bad_child(corgi, "orphan-of-corgi", "ConfigMap", _unowned)
    _admin_create(kube_admin, stored)
    owner = {**stored_owner(corgi), "name": "other"}
    patch = {"metadata": {"labels": {naming.JOB_NAME_LABEL: "other"}, "ownerReferences": [owner]}}
    error = install.refusal("PATCH", _path(stored), patch)
    _assert_refused_by_policy(error, install, "ConfigMap", ADOPTION)


def stored_owner(children: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(children[0]["metadata"]["ownerReferences"][0])


def test_the_operator_adopts_only_its_own_orphans(install: Install, kube_admin: client.ApiClient) -> None:
    """`KubeCluster` with the operator's token: someone else's ConfigMap under the child's name is
    a conflict (no patch is sent), an orphaned child of the job (labelled, no owner) is adopted
    through the policy."""
    body = e2e_manifest(install.watched, "http://127.0.0.1:9")
    body["metadata"]["name"] = "adopter"
    job = _stored_job(kube_admin, body)
    configmap = render_children(job, SETTINGS)[0]
    stranger = copy.deepcopy(configmap)
    del stranger["metadata"]["labels"], stranger["metadata"]["ownerReferences"]
    _admin_create(kube_admin, stranger)
    cluster = KubeCluster(install.operator)
    try:
        with pytest.raises(ChildConflict, match="not labelled as a child of this FineTuneJob"):
            cluster.apply(job, CreateChild(configmap))
        assert "ownerReferences" not in install.operator.get(_path(configmap))["metadata"]
        client.CoreV1Api(kube_admin).delete_namespaced_config_map(configmap["metadata"]["name"], install.watched)
        orphan = copy.deepcopy(configmap)
        del orphan["metadata"]["ownerReferences"]
        _admin_create(kube_admin, orphan)
        cluster.apply(job, CreateChild(configmap))
    finally:
        cluster.close()
    [owner] = install.operator.get(_path(configmap))["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("FineTuneJob", "adopter", True)


def test_ephemeral_containers_never_reach_the_policy(install: Install, corgi: list[dict[str, Any]]) -> None:
    """The Job rules cover ephemeralContainers too, but the API server refuses them in any pod
    template before admission."""
    def debug_container(job: dict[str, Any]) -> None:
        shell = {"name": "debug", "image": "busybox", "securityContext": {"privileged": True}}
        job["spec"]["template"]["spec"]["ephemeralContainers"] = [shell]

    bad = _bad_child(corgi, "ephemeral-job", "Job", debug_container)
    error = install.refusal("POST", collection_path("Job", install.watched), bad, dry_run=True)
    assert error is not None and error.status == 422, error
    assert "ephemeral containers not allowed in pod template" in error.message, error.message


def test_the_policy_refuses_to_delete_someone_elses_job(
        install: Install, corgi: list[dict[str, Any]], kube_admin: client.ApiClient) -> None:
    """RBAC lets the operator delete Jobs in a watched namespace; the policy only its own."""
    stored, _ = _stranger(corgi, "Job", "someone-elses-job")
    created = _admin_create(kube_admin, stored)
    options = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Foreground",
               "preconditions": {"uid": created["metadata"]["uid"]}}
    error = install.refusal("DELETE", _path(stored), options)
    _assert_refused_by_policy(error, install, "Job", "labels kubetune.io/job-name")


def test_the_children_the_operator_renders_are_admitted(
        install: Install, corgi: list[dict[str, Any]], kube_admin: client.ApiClient) -> None:
    full = _full_job().model_dump(by_alias=True, exclude_none=True, mode="json")
    full["metadata"] = {"name": "every-field", "namespace": install.watched}
    full.pop("status", None)
    every_field = _stored_children(kube_admin, full)
    for child in [*corgi, *every_field]:
        install.operator.request("POST", collection_path(child["kind"], install.watched), child)
    # The updates a pass sends: a rewritten ConfigMap, a suspended and resumed Job.
    configmap, _, job = corgi
    install.operator.request("PATCH", _path(configmap), {"data": {naming.CONFIG_KEY: "rewritten"}})
    install.operator.request("PATCH", _path(job), {"spec": {"suspend": True}})
    install.operator.request("PATCH", _path(job), {"spec": {"suspend": False}})
    # A failed attempt's Job, as `KubeCluster.apply(DeleteJob)` deletes it.
    uid = install.operator.get(_path(job))["metadata"]["uid"]
    install.operator.request("DELETE", _path(job), {"apiVersion": "v1", "kind": "DeleteOptions",
                                         "propagationPolicy": "Foreground", "preconditions": {"uid": uid}})


@pytest.mark.parametrize(("row", "case", "builder"), [(n, c, b) for n, (c, b, *_) in enumerate(DEFAULTS_TABLE)],
                         ids=[c for c, *_ in DEFAULTS_TABLE])
def test_every_rendering_of_the_render_table_is_admitted(install: Install, row: int, case: str, builder: Any) -> None:
    """Each variant of tests/operator/test_render.py (PVC volumes, no credentials, suspended, ...)
    passes the policy: a server-side dry run of the create, under a job name of its own."""
    job = copy.deepcopy(builder).set("metadata.name", f"row-{row}").typed()
    for child in render_children(job, SETTINGS):
        child["metadata"]["namespace"] = install.watched
        error = install.refusal("POST", collection_path(child["kind"], install.watched), child, dry_run=True)
        assert error is None, f"{case}: {child['kind']} refused: {error}"


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
