"""Names, labels and owner references of the objects a FineTuneJob owns.

Every child is found again by the `kubetune.io/job-name` label and owned by the
FineTuneJob (controller reference), so deleting the job deletes its children and a
restarted operator adopts what it finds instead of creating duplicates.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.resource import API_VERSION, KIND, FineTuneJob

JOB_NAME_LABEL = "kubetune.io/job-name"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetune-operator"
RESTARTS_ANNOTATION = "kubetune.io/restarts"
"""Counted restarts before this Job's attempt; lets a restarted operator recount."""
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
CONTAINER_NAME = "trainer"
CONFIG_DIR = "/etc/kubetune"
CONFIG_KEY = "job.yaml"


def configmap_name(name: str) -> str:
    return f"{name}-config"


def service_name(name: str) -> str:
    """The headless Service; pods are `<job>-<index>.<service>`."""
    return name


def batch_job_name(name: str) -> str:
    return name


def master_address(name: str) -> str:
    """Rank 0's stable DNS name inside the namespace."""
    return f"{batch_job_name(name)}-0.{service_name(name)}"


def labels(job: FineTuneJob, component: str) -> dict[str, str]:
    """Labels on every child: the selector label plus the recommended app labels."""
    return {
        JOB_NAME_LABEL: job.metadata.name,
        "app.kubernetes.io/name": "kubetune",
        COMPONENT_LABEL: component,
        MANAGED_BY_LABEL: MANAGED_BY,
    }


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    """The controller reference that ties a child's lifetime to the FineTuneJob."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": (job.metadata.model_extra or {}).get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(job: FineTuneJob, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": labels(job, component),
        "ownerReferences": [owner_reference(job)],
    }
