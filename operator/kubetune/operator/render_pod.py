"""The trainer pod template: torchrun wiring, credentials, volumes, resources, security.

Everything a trainer pod needs arrives here from the FineTuneJob spec; the pod itself
holds no Kubernetes credentials and reads its configuration from the mounted ConfigMap.
Credentials (S3 keys, the Hugging Face token) are only ever references to the user's
Secret keys, never values.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import uris
from kubetune.api.resource import FineTuneJob
from kubetune.api.spec import FineTuneJobSpec
from kubetune.operator import naming
from kubetune.operator.settings import OperatorSettings

SCRATCH_DIR = "/scratch"
PVC_ROOT = "/mnt/pvc"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
RUN_AS_USER = 1000
S3_SECRET_KEYS: tuple[tuple[str, bool], ...] = (
    ("AWS_ACCESS_KEY_ID", False),
    ("AWS_SECRET_ACCESS_KEY", False),
    ("AWS_SESSION_TOKEN", True),
)
"""(key, optional) read from `spec.storage.secretRef`."""


def _value(name: str, value: object) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def _field(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def torchrun_env(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Kubeflow's PET_* convention: torchrun reads these without any flags."""
    resources = job.spec.resources
    return [
        _value("PET_NNODES", resources.nodes),
        _value("PET_NPROC_PER_NODE", resources.gpus_per_node or 1),
        _field("PET_NODE_RANK", f"metadata.annotations['{naming.COMPLETION_INDEX_ANNOTATION}']"),
        _value("PET_MASTER_ADDR", naming.master_address(job.metadata.name)),
        _value("PET_MASTER_PORT", settings.master_port),
    ]


def secret_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """S3 credentials, only ever as references to the user's Secret."""
    ref = spec.storage.secret_ref
    if ref is None:
        return []
    out = []
    for key, optional in S3_SECRET_KEYS:
        selector: dict[str, Any] = {"name": ref.name, "key": key}
        if optional:
            selector["optional"] = True
        out.append({"name": key, "valueFrom": {"secretKeyRef": selector}})
    return out


def hub_token_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """The Hugging Face token for gated hf:// models, as a reference to the user's Secret key."""
    ref = spec.model.token_secret_ref
    if ref is None:
        return []
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def trainer_env(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    return [
        *torchrun_env(job, settings),
        _value("PYTHONUNBUFFERED", 1),
        _field("KUBETUNE_JOB_NAMESPACE", "metadata.namespace"),
        _value("KUBETUNE_JOB_NAME", job.metadata.name),
        _field("KUBETUNE_POD_NAME", "metadata.name"),
        _value("KUBETUNE_STATUS_PORT", settings.metrics_port),
        _value("KUBETUNE_SCRATCH", SCRATCH_DIR),
        _value("KUBETUNE_PVC_ROOT", PVC_ROOT),
        _value("HF_HOME", f"{SCRATCH_DIR}/huggingface"),
        *secret_env(job.spec),
        *hub_token_env(job.spec),
    ]


def claims(spec: FineTuneJobSpec) -> dict[str, bool]:
    """PersistentVolumeClaims named by pvc:// URIs, mapped to whether they must be writable."""
    inputs = [spec.model.uri, spec.data.uri]
    if spec.method.dreambooth is not None and spec.method.dreambooth.class_data_uri:
        inputs.append(spec.method.dreambooth.class_data_uri)
    out: dict[str, bool] = {}
    for uri, writable in [*((u, False) for u in inputs), (spec.output.uri, True)]:
        parsed = uris.parse_uri(uri)
        if parsed.scheme == "pvc":
            out[parsed.location] = out.get(parsed.location, False) or writable
    return out


def _scratch_volume(spec: FineTuneJobSpec) -> dict[str, Any]:
    scratch = spec.resources.scratch
    if not scratch.storage_class_name:
        return {"name": "scratch", "emptyDir": {"sizeLimit": scratch.size}}
    claim_spec = {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": scratch.storage_class_name,
        "resources": {"requests": {"storage": scratch.size}},
    }
    return {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": claim_spec}}}


def _claim_volume_name(claim: str) -> str:
    return f"pvc-{claim}"[:63].rstrip("-")


def volumes(job: FineTuneJob) -> list[dict[str, Any]]:
    spec = job.spec
    out: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": naming.configmap_name(job.metadata.name)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
        {"name": "tmp", "emptyDir": {}},
        _scratch_volume(spec),
    ]
    for claim, writable in claims(spec).items():
        source = {"claimName": claim, "readOnly": not writable}
        out.append({"name": _claim_volume_name(claim), "persistentVolumeClaim": source})
    return out


def volume_mounts(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": "config", "mountPath": naming.CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    for claim, writable in claims(spec).items():
        mount = {"name": _claim_volume_name(claim), "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable}
        out.append(mount)
    return out


def container_resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    """Requests equal limits (Guaranteed QoS): evictions under pressure hit others first."""
    amounts: dict[str, Any] = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    if spec.resources.gpus_per_node > 0:
        amounts[spec.resources.gpu_resource] = str(spec.resources.gpus_per_node)
    return {"requests": dict(amounts), "limits": dict(amounts)}


CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_USER,
    "fsGroup": RUN_AS_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def trainer_container(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "name": naming.CONTAINER_NAME,
        "image": job.spec.image or settings.default_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["kubetune", "train", "--config", f"{naming.CONFIG_DIR}/{naming.CONFIG_KEY}"],
        "env": trainer_env(job, settings),
        "ports": [
            {"name": "metrics", "containerPort": settings.metrics_port, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": settings.master_port, "protocol": "TCP"},
        ],
        "resources": container_resources(job.spec),
        "volumeMounts": volume_mounts(job.spec),
        "securityContext": dict(CONTAINER_SECURITY),
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def scheduling_fields(spec: FineTuneJobSpec) -> dict[str, Any]:
    """Placement fields of the pod spec, only those the user set."""
    scheduling = spec.scheduling
    out: dict[str, Any] = {}
    if scheduling.node_selector:
        out["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in scheduling.tolerations]
    if scheduling.affinity:
        out["affinity"] = dict(scheduling.affinity)
    if scheduling.priority_class_name:
        out["priorityClassName"] = scheduling.priority_class_name
    return out


def pod_template(job: FineTuneJob, settings: OperatorSettings, restarts: int) -> dict[str, Any]:
    """The pod template of the Indexed Job."""
    name = job.metadata.name
    annotations = {
        naming.RESTARTS_ANNOTATION: str(restarts),
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(settings.metrics_port),
        "prometheus.io/path": "/metrics",
    }
    spec = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": job.spec.run_policy.termination_grace_period_seconds,
        "subdomain": naming.service_name(name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": dict(POD_SECURITY),
        "containers": [trainer_container(job, settings)],
        "volumes": volumes(job),
        **scheduling_fields(job.spec),
    }
    return {"metadata": {"labels": naming.labels(job, "trainer"), "annotations": annotations}, "spec": spec}
