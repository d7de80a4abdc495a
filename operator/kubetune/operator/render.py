"""The child objects of a FineTuneJob: ConfigMap, headless Service and Indexed Job.

Pure functions from a validated job (and operator settings) to plain Kubernetes objects;
the handlers only create, adopt or patch what these return.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import yaml

from kubetune.api.exitcodes import CONFIG_ERROR_EXIT_CODE
from kubetune.api.resource import FineTuneJob
from kubetune.operator import naming
from kubetune.operator.render_pod import pod_template
from kubetune.operator.settings import OperatorSettings

SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's emitter when PyYAML has it: the same text, ten times faster (every pass renders it)."""


@functools.lru_cache(maxsize=2048)
def _yaml_of(doc_json: str) -> str:
    """YAML of a document given as JSON: every pass compares the ConfigMap with the rendering,
    and JSON in C costs a fraction of PyYAML's representer, so each spec is dumped once."""
    return yaml.dump(json.loads(doc_json), Dumper=SAFE_DUMPER, sort_keys=False)


def resolved_spec_yaml(job: FineTuneJob) -> str:
    """The job as the trainer reads it: defaults filled in, no status, no cluster metadata.

    The spec only ever names the credentials Secret, so nothing secret can end up here.
    """
    doc = {
        "apiVersion": job.api_version,
        "kind": job.kind,
        "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace},
        "spec": job.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return _yaml_of(json.dumps(doc))


def render_configmap(job: FineTuneJob) -> dict[str, Any]:
    name = naming.configmap_name(job.metadata.name)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": naming.child_metadata(job, name, "config"),
        "data": {naming.CONFIG_KEY: resolved_spec_yaml(job)},
    }


def render_service(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """Headless, publishing not-ready pods: rank 0 must resolve before it is Ready."""
    name = naming.service_name(job.metadata.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": naming.child_metadata(job, name, "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {naming.JOB_NAME_LABEL: job.metadata.name},
            "ports": [
                {"name": "rendezvous", "port": settings.master_port, "targetPort": settings.master_port},
                {"name": "metrics", "port": settings.metrics_port, "targetPort": settings.metrics_port},
            ],
        },
    }


CONFIG_ERROR_RULE: dict[str, Any] = {
    "action": "FailJob",
    "onExitCodes": {"containerName": naming.CONTAINER_NAME, "operator": "In", "values": [CONFIG_ERROR_EXIT_CODE]},
}
DISRUPTION_CONDITION: list[dict[str, Any]] = [{"type": "DisruptionTarget", "status": "True"}]


def pod_failure_policy(nodes: int) -> dict[str, Any]:
    """A configuration error fails the Job at once; what a lost pod does depends on the group.

    One node: `Ignore`, the Job controller replaces the pod uncounted and it resumes alone from
    the newest checkpoint. Several nodes: `FailJob`, at once, because a lone replacement cannot
    join the others' torchrun group; the operator restarts every rank together on a new Job and
    `restart.failure_verdict` keeps the disruption uncounted (docs/operator.md, "Retries").
    """
    action = "Ignore" if nodes == 1 else "FailJob"
    return {"rules": [CONFIG_ERROR_RULE, {"action": action, "onPodConditions": DISRUPTION_CONDITION}]}


@dataclass(frozen=True)
class Attempt:
    """What differs between the Jobs of successive attempts."""

    restarts: int = 0
    """Counted restarts before this attempt (recorded on the Job)."""
    active_deadline_seconds: int | None = None
    """What is left of `runPolicy.activeDeadlineSeconds` when this attempt starts."""


def job_suspended_at_creation(job: FineTuneJob) -> bool:
    """Kueue admits by un-suspending, so a queued Job is always created suspended."""
    return job.spec.run_policy.suspend or job.spec.scheduling.queue_name is not None


def render_job(
    job: FineTuneJob, settings: OperatorSettings, attempt: Attempt | None = None
) -> dict[str, Any]:
    """The Indexed batch/v1 Job: one pod per node, each with a stable hostname.

    `backoffLimit: 0` hands retries to the operator, which restarts the whole group from
    the newest checkpoint (a lone replacement rank could not rejoin the others' collective);
    see `pod_failure_policy` for what a lost pod does.
    """
    attempt = attempt or Attempt(0, job.spec.run_policy.active_deadline_seconds)
    nodes = job.spec.resources.nodes
    metadata = naming.child_metadata(job, naming.batch_job_name(job.metadata.name), "trainer")
    metadata["annotations"] = {naming.RESTARTS_ANNOTATION: str(attempt.restarts)}
    if job.spec.scheduling.queue_name is not None:
        metadata["labels"][naming.QUEUE_NAME_LABEL] = job.spec.scheduling.queue_name
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "podFailurePolicy": pod_failure_policy(nodes),
        "suspend": job_suspended_at_creation(job),
        "template": pod_template(job, settings, attempt.restarts),
    }
    if attempt.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = max(1, attempt.active_deadline_seconds)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def render_children(
    job: FineTuneJob, settings: OperatorSettings, attempt: Attempt | None = None
) -> list[dict[str, Any]]:
    """Every child in creation order: config and DNS before the pods that need them."""
    return [render_configmap(job), render_service(job, settings), render_job(job, settings, attempt)]
