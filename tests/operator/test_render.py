"""Rendering: every spec field lands where the trainer and Kubernetes expect it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest
import yaml
from ftj_builders import JOB_UID, make_job

from kubetune.api.exitcodes import CONFIG_ERROR_EXIT_CODE
from kubetune.api.validation import validate_document
from kubetune.operator.render import Attempt, render_children, render_configmap, render_job, render_service
from kubetune.operator.settings import OperatorSettings

SETTINGS = OperatorSettings(default_image="registry.local/kubetune:test")
K8S_VERSION = "1.31.0"


def _full_job() -> Any:
    return (
        make_job("corgi")
        .nodes(3)
        .gpus(8)
        .secret("s3-creds")
        .queue("gpu-queue")
        .deadline(7200)
        .set("spec.runPolicy.terminationGracePeriodSeconds", 900)
        .set("spec.model.tokenSecretRef", {"name": "hub-token", "key": "token"})
        .set("spec.resources.gpuResource", "amd.com/gpu")
        .set("spec.resources.cpu", "16")
        .set("spec.resources.memory", "128Gi")
        .set("spec.resources.sharedMemory", "32Gi")
        .set("spec.resources.scratch", {"size": "500Gi", "storageClassName": "fast-nvme"})
        .set("spec.image", "registry.local/trainer:v2")
        .set("spec.model.uri", "pvc://models/sd15")
        .set("spec.output.uri", "pvc://results/corgi/")
        .set("spec.scheduling.priorityClassName", "training-high")
        .set("spec.scheduling.nodeSelector", {"gpu": "h100"})
        .set("spec.scheduling.tolerations", [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}])
        .set("spec.scheduling.affinity", {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}})
        .typed()
    )


def _pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def _container(job: dict[str, Any]) -> dict[str, Any]:
    return _pod(job)["containers"][0]


def _env(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(job)["env"]}


def _volume(job: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in _pod(job)["volumes"] if v["name"] == name)


def _mount(job: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in _container(job)["volumeMounts"] if m["name"] == name)


WHERE_FIELDS_LAND: list[tuple[str, Callable[[dict[str, Any]], Any], Any]] = [
    ("nodes -> completions", lambda j: j["spec"]["completions"], 3),
    ("nodes -> parallelism", lambda j: j["spec"]["parallelism"], 3),
    ("indexed", lambda j: j["spec"]["completionMode"], "Indexed"),
    ("nodes -> PET_NNODES", lambda j: _env(j)["PET_NNODES"], "3"),
    ("gpusPerNode -> PET_NPROC_PER_NODE", lambda j: _env(j)["PET_NPROC_PER_NODE"], "8"),
    ("rank from completion index", lambda j: _env(j)["PET_NODE_RANK"],
     {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}),
    ("rank 0 DNS name", lambda j: _env(j)["PET_MASTER_ADDR"], "corgi-0.corgi"),
    ("master port", lambda j: _env(j)["PET_MASTER_PORT"], "29500"),
    ("unbuffered", lambda j: _env(j)["PYTHONUNBUFFERED"], "1"),
    ("job name for metric labels", lambda j: _env(j)["KUBETUNE_JOB_NAME"], "corgi"),
    ("namespace for metric labels", lambda j: _env(j)["KUBETUNE_JOB_NAMESPACE"],
     {"fieldRef": {"fieldPath": "metadata.namespace"}}),
    ("secretRef -> access key", lambda j: _env(j)["AWS_ACCESS_KEY_ID"],
     {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}),
    ("secretRef -> secret key", lambda j: _env(j)["AWS_SECRET_ACCESS_KEY"],
     {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}),
    ("session token optional", lambda j: _env(j)["AWS_SESSION_TOKEN"],
     {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SESSION_TOKEN", "optional": True}}),
    ("gpuResource request", lambda j: _container(j)["resources"]["requests"]["amd.com/gpu"], "8"),
    ("gpuResource limit", lambda j: _container(j)["resources"]["limits"]["amd.com/gpu"], "8"),
    ("cpu", lambda j: _container(j)["resources"]["limits"]["cpu"], "16"),
    ("memory", lambda j: _container(j)["resources"]["requests"]["memory"], "128Gi"),
    ("sharedMemory -> /dev/shm", lambda j: _volume(j, "dshm")["emptyDir"], {"medium": "Memory", "sizeLimit": "32Gi"}),
    ("/dev/shm mounted", lambda j: _mount(j, "dshm")["mountPath"], "/dev/shm"),
    ("scratch with class -> ephemeral", lambda j: _volume(j, "scratch")["ephemeral"]["volumeClaimTemplate"]["spec"],
     {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast-nvme",
      "resources": {"requests": {"storage": "500Gi"}}}),
    ("model pvc read-only", lambda j: _volume(j, "pvc-models")["persistentVolumeClaim"],
     {"claimName": "models", "readOnly": True}),
    ("model pvc mount", lambda j: (_mount(j, "pvc-models")["mountPath"], _mount(j, "pvc-models")["readOnly"]),
     ("/mnt/pvc/models", True)),
    ("output pvc writable", lambda j: _mount(j, "pvc-results").get("readOnly", False), False),
    ("image", lambda j: _container(j)["image"], "registry.local/trainer:v2"),
    ("command", lambda j: _container(j)["command"], ["kubetune", "train", "--config", "/etc/kubetune/job.yaml"]),
    ("config mounted", lambda j: _volume(j, "config")["configMap"]["name"], "corgi-config"),
    ("priorityClassName", lambda j: _pod(j)["priorityClassName"], "training-high"),
    ("nodeSelector", lambda j: _pod(j)["nodeSelector"], {"gpu": "h100"}),
    ("tolerations", lambda j: _pod(j)["tolerations"], [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]),
    ("affinity", lambda j: _pod(j)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
     ["nodeSelectorTerms"][0]["matchExpressions"][0]["key"], "zone"),
    ("queueName -> Kueue label", lambda j: j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"], "gpu-queue"),
    ("queueName -> created suspended", lambda j: j["spec"]["suspend"], True),
    ("activeDeadlineSeconds", lambda j: j["spec"]["activeDeadlineSeconds"], 7200),
    ("subdomain = service", lambda j: _pod(j)["subdomain"], "corgi"),
    ("no token", lambda j: _pod(j)["automountServiceAccountToken"], False),
    ("restartPolicy", lambda j: _pod(j)["restartPolicy"], "Never"),
    ("retries belong to the operator", lambda j: j["spec"]["backoffLimit"], 0),
    ("config error fails the Job", lambda j: j["spec"]["podFailurePolicy"]["rules"][0],
     {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                           "values": [CONFIG_ERROR_EXIT_CODE]}}),
    ("a lost pod fails a multi-node attempt at once", lambda j: j["spec"]["podFailurePolicy"]["rules"][1],
     {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}),
    ("grace period from runPolicy", lambda j: _pod(j)["terminationGracePeriodSeconds"], 900),
    ("hub token from its Secret key", lambda j: _env(j)["HF_TOKEN"],
     {"secretKeyRef": {"name": "hub-token", "key": "token"}}),
    ("non-root", lambda j: (_pod(j)["securityContext"]["runAsNonRoot"], _pod(j)["securityContext"]["runAsUser"]),
     (True, 1000)),
    ("seccomp", lambda j: _pod(j)["securityContext"]["seccompProfile"], {"type": "RuntimeDefault"}),
    ("container hardening", lambda j: {k: _container(j)["securityContext"][k] for k in
                                       ("allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities")},
     {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}),
    ("writable /tmp", lambda j: _mount(j, "tmp")["mountPath"], "/tmp"),
    ("termination message", lambda j: _container(j)["terminationMessagePolicy"], "FallbackToLogsOnError"),
    ("metrics port", lambda j: _container(j)["ports"][0],
     {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}),
    ("scrape annotation", lambda j: j["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"], "9090"),
    ("pod label for PodMonitor/Service", lambda j: j["spec"]["template"]["metadata"]["labels"]["kubetune.io/job-name"],
     "corgi"),
]


@pytest.mark.parametrize(("where", "read", "expected"), WHERE_FIELDS_LAND, ids=[w for w, _, _ in WHERE_FIELDS_LAND])
def test_every_spec_field_lands_in_the_job(where: str, read: Callable[[dict[str, Any]], Any], expected: Any) -> None:
    assert read(render_job(_full_job(), SETTINGS)) == expected


DEFAULTS_TABLE: list[tuple[str, Any, Callable[[dict[str, Any]], Any], Any]] = [
    ("default image from settings", make_job(), lambda j: _container(j)["image"], "registry.local/kubetune:test"),
    ("cpu training: one process", make_job().gpus(0), lambda j: _env(j)["PET_NPROC_PER_NODE"], "1"),
    ("cpu training: no gpu resource", make_job().gpus(0),
     lambda j: sorted(_container(j)["resources"]["limits"]), ["cpu", "memory"]),
    ("no secretRef: no credentials", make_job(), lambda j: "AWS_ACCESS_KEY_ID" in _env(j), False),
    ("no tokenSecretRef: no hub token", make_job(), lambda j: "HF_TOKEN" in _env(j), False),
    ("hub token key defaults to HF_TOKEN", make_job().set("spec.model.tokenSecretRef", {"name": "hub"}),
     lambda j: _env(j)["HF_TOKEN"], {"secretKeyRef": {"name": "hub", "key": "HF_TOKEN"}}),
    ("grace period long enough for a checkpoint upload", make_job(),
     lambda j: _pod(j)["terminationGracePeriodSeconds"], 600),
    ("one node: a lost pod is replaced uncounted", make_job(), lambda j: j["spec"]["podFailurePolicy"]["rules"][1],
     {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}),
    ("scratch emptyDir by default", make_job(), lambda j: _volume(j, "scratch"),
     {"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}}),
    ("no queue: not suspended", make_job(), lambda j: j["spec"]["suspend"], False),
    ("no queue: no Kueue label", make_job(), lambda j: "kueue.x-k8s.io/queue-name" in j["metadata"]["labels"], False),
    ("runPolicy.suspend", make_job().suspended(), lambda j: j["spec"]["suspend"], True),
    ("no deadline", make_job(), lambda j: "activeDeadlineSeconds" in j["spec"], False),
    ("no scheduling fields", make_job(), lambda j: {"nodeSelector", "tolerations", "affinity",
                                                   "priorityClassName"} & set(_pod(j)), set()),
    ("no pvc volumes for s3", make_job(), lambda j: [v["name"] for v in _pod(j)["volumes"]],
     ["config", "dshm", "tmp", "scratch"]),
    ("one volume per claim, writable if output", make_job().set("spec.data.uri", "pvc://shared/data/")
     .set("spec.output.uri", "pvc://shared/out/"), lambda j: _volume(j, "pvc-shared")["persistentVolumeClaim"],
     {"claimName": "shared", "readOnly": False}),
]


@pytest.mark.parametrize(("case", "builder", "read", "expected"), DEFAULTS_TABLE, ids=[c for c, *_ in DEFAULTS_TABLE])
def test_defaults_and_variants(case: str, builder: Any, read: Callable[[dict[str, Any]], Any], expected: Any) -> None:
    assert read(render_job(builder.typed(), SETTINGS)) == expected


def test_attempt_records_restarts_and_remaining_deadline() -> None:
    job = render_job(make_job().deadline(3600).typed(), SETTINGS, Attempt(restarts=2, active_deadline_seconds=1200))
    assert job["metadata"]["annotations"]["kubetune.io/restarts"] == "2"
    assert job["spec"]["template"]["metadata"]["annotations"]["kubetune.io/restarts"] == "2"
    assert job["spec"]["activeDeadlineSeconds"] == 1200


def test_children_are_owned_and_labelled() -> None:
    for child in render_children(make_job("corgi").typed(), SETTINGS):
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["labels"]["kubetune.io/job-name"] == "corgi"
        assert meta["ownerReferences"] == [{
            "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "corgi", "uid": JOB_UID,
            "controller": True, "blockOwnerDeletion": True,
        }]


def test_service_is_headless_and_publishes_not_ready_pods() -> None:
    service = render_service(make_job("corgi").typed(), SETTINGS)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"kubetune.io/job-name": "corgi"}


def test_configmap_holds_the_resolved_spec_that_validates_again() -> None:
    job = make_job("corgi").secret("s3-creds").typed()
    text = render_configmap(job)["data"]["job.yaml"]
    doc = yaml.safe_load(text)
    assert doc["spec"]["training"]["learningRate"] == 1.0e-4, "defaults are filled in"
    assert doc["spec"]["storage"]["secretRef"] == {"name": "s3-creds"}
    assert "uid" not in doc["metadata"] and "status" not in doc
    again = validate_document(doc)
    assert again.ok, again.problems
    assert again.job is not None and again.job.spec == job.spec


@pytest.mark.parametrize("builder", [make_job(), _full_job], ids=["minimal", "full"])
def test_children_are_valid_kubernetes_objects(builder: Any) -> None:
    job = builder() if callable(builder) else builder.typed()
    for child in render_children(job, SETTINGS, Attempt(1, 60)):
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_credentials_are_only_ever_secret_references() -> None:
    credentials = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}
    env = [e for e in _container(render_job(_full_job(), SETTINGS))["env"] if e["name"] in credentials]
    assert {e["name"] for e in env} == credentials
    for entry in env:
        assert "value" not in entry and set(entry["valueFrom"]) == {"secretKeyRef"}, entry
