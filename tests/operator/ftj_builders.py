"""Chained builders for what the operator reads: FineTuneJobs, batch Jobs and pods.

Each test states only what differs from a plain running job:
`make_job("a").nodes(2).suspended().obj()`, `make_batch_job("a").failed().obj()`,
`make_pod("a", 0).failed(exit_code=78).obj()`.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from kubetune.api.resource import FineTuneJob
from kubetune.api.validation import validate_document
from kubetune.operator import naming
from kubetune.operator.observed import Observed

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
JOB_UID = "ftj-uid-1"
BATCH_UID = "batch-uid-1"
S3_KEYS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        doc = doc.setdefault(part, {})
    doc[leaf] = value


class JobBuilder:
    """A FineTuneJob document as the API server would store it."""

    def __init__(self, name: str) -> None:
        self._doc: dict[str, Any] = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "team-a", "uid": JOB_UID, "generation": 1},
            "spec": {
                "model": {"uri": "s3://models/sd15/"},
                "method": {"type": "lora"},
                "data": {"uri": "s3://datasets/corgis/"},
                "output": {"uri": f"s3://outputs/{name}/"},
                "training": {"maxSteps": 100},
            },
        }

    def set(self, path: str, value: Any) -> JobBuilder:
        _set(self._doc, path, value)
        return self

    def nodes(self, count: int) -> JobBuilder:
        return self.set("spec.resources.nodes", count)

    def gpus(self, count: int) -> JobBuilder:
        return self.set("spec.resources.gpusPerNode", count)

    def suspended(self, value: bool = True) -> JobBuilder:
        return self.set("spec.runPolicy.suspend", value)

    def queue(self, name: str) -> JobBuilder:
        return self.set("spec.scheduling.queueName", name)

    def secret(self, name: str = "s3-credentials") -> JobBuilder:
        return self.set("spec.storage.secretRef", {"name": name})

    def backoff_limit(self, limit: int) -> JobBuilder:
        return self.set("spec.runPolicy.backoffLimit", limit)

    def deadline(self, seconds: int) -> JobBuilder:
        return self.set("spec.runPolicy.activeDeadlineSeconds", seconds)

    def ttl(self, seconds: int) -> JobBuilder:
        return self.set("spec.runPolicy.ttlSecondsAfterFinished", seconds)

    def keep_checkpoints(self, count: int) -> JobBuilder:
        return self.set("spec.output.keepCheckpoints", count)

    def obj(self) -> dict[str, Any]:
        return copy.deepcopy(self._doc)

    def typed(self) -> FineTuneJob:
        result = validate_document(self.obj())
        assert result.job is not None, [str(p) for p in result.problems]
        return result.job


def make_job(name: str = "corgi") -> JobBuilder:
    return JobBuilder(name)


class BatchJobBuilder:
    """An observed batch/v1 Job (only the fields the operator reads)."""

    def __init__(self, name: str) -> None:
        self._doc: dict[str, Any] = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": "team-a", "uid": BATCH_UID, "annotations": {}},
            "spec": {"suspend": False, "completions": 1, "parallelism": 1},
            "status": {"startTime": "2026-11-21T11:00:00Z", "active": 0, "ready": 0},
        }

    def status(self, **fields: Any) -> BatchJobBuilder:
        self._doc["status"].update(fields)
        return self

    def active(self, count: int, ready: int | None = None) -> BatchJobBuilder:
        return self.status(active=count, ready=count if ready is None else ready)

    def condition(self, type_: str, reason: str = "", message: str = "") -> BatchJobBuilder:
        conds = self._doc["status"].setdefault("conditions", [])
        conds.append({"type": type_, "status": "True", "reason": reason, "message": message})
        return self

    def complete(self) -> BatchJobBuilder:
        return self.condition("Complete").status(completionTime="2026-11-21T11:50:00Z", active=0)

    def failed(self, reason: str = "BackoffLimitExceeded", message: str = "") -> BatchJobBuilder:
        return self.condition("Failed", reason, message).status(active=0, failed=1)

    def suspended(self) -> BatchJobBuilder:
        self._doc["spec"]["suspend"] = True
        self._doc["status"].pop("startTime", None)
        return self

    def deleting(self) -> BatchJobBuilder:
        self._doc["metadata"]["deletionTimestamp"] = "2026-11-21T11:59:00Z"
        return self

    def restarts(self, count: int) -> BatchJobBuilder:
        self._doc["metadata"]["annotations"][naming.RESTARTS_ANNOTATION] = str(count)
        return self

    def obj(self) -> dict[str, Any]:
        return copy.deepcopy(self._doc)


def make_batch_job(name: str = "corgi") -> BatchJobBuilder:
    return BatchJobBuilder(name)


class PodBuilder:
    """An observed trainer pod of the current batch Job."""

    def __init__(self, name: str, index: int) -> None:
        self._doc: dict[str, Any] = {
            "metadata": {
                "name": f"{name}-{index}-abcde",
                "annotations": {naming.COMPLETION_INDEX_ANNOTATION: str(index)},
                "ownerReferences": [{"kind": "Job", "uid": BATCH_UID, "controller": True}],
                "creationTimestamp": "2026-11-21T11:00:00Z",
            },
            "status": {"phase": "Pending", "conditions": [], "containerStatuses": []},
        }

    def _container(self, state: dict[str, Any], ready: bool = False) -> PodBuilder:
        self._doc["status"]["containerStatuses"] = [{"name": "trainer", "ready": ready, "state": state}]
        return self

    def _condition(self, type_: str, status: str, reason: str = "", message: str = "") -> PodBuilder:
        entry = {"type": type_, "status": status, "reason": reason, "message": message}
        self._doc["status"]["conditions"].append(entry)
        return self

    def owner(self, uid: str) -> PodBuilder:
        self._doc["metadata"]["ownerReferences"][0]["uid"] = uid
        return self

    def created(self, stamp: str) -> PodBuilder:
        self._doc["metadata"]["creationTimestamp"] = stamp
        return self

    def pod_ip(self, ip: str) -> PodBuilder:
        self._doc["status"]["podIP"] = ip
        return self

    def unschedulable(self, message: str = "0/3 nodes have nvidia.com/gpu") -> PodBuilder:
        return self._condition("PodScheduled", "False", "Unschedulable", message)

    def waiting(self, reason: str, message: str = "") -> PodBuilder:
        return self._container({"waiting": {"reason": reason, "message": message}})

    def running(self, ready: bool = True) -> PodBuilder:
        self._doc["status"]["phase"] = "Running"
        self._condition("Ready", "True" if ready else "False")
        return self._container({"running": {"startedAt": "2026-11-21T11:01:00Z"}}, ready)

    def succeeded(self, message: str = "") -> PodBuilder:
        self._doc["status"]["phase"] = "Succeeded"
        return self._container({"terminated": {"exitCode": 0, "reason": "Completed", "message": message}})

    def failed(self, exit_code: int = 1, message: str = "", reason: str = "Error") -> PodBuilder:
        self._doc["status"]["phase"] = "Failed"
        return self._container({"terminated": {"exitCode": exit_code, "reason": reason, "message": message}})

    def disrupted(self) -> PodBuilder:
        return self._condition("DisruptionTarget", "True", "DeletionByTaintManager")

    def obj(self) -> dict[str, Any]:
        return copy.deepcopy(self._doc)


def make_pod(name: str = "corgi", index: int = 0) -> PodBuilder:
    return PodBuilder(name, index)


def observed(
    job: BatchJobBuilder | None = None,
    pods: tuple[PodBuilder, ...] = (),
    secret_keys: frozenset[str] | None = S3_KEYS,
    children: bool = True,
) -> Observed:
    """What one pass sees; ConfigMap and Service exist unless `children=False`."""
    return Observed(
        job=job.obj() if job is not None else None,
        pods=tuple(p.obj() for p in pods),
        configmap={"metadata": {"name": "x"}, "data": {}} if children else None,
        service={"metadata": {"name": "x"}} if children else None,
        secret_keys=secret_keys,
    )
