"""An in-memory `Cluster`: the operator's own seam, faked, so a reconcile pass runs without a server."""

from __future__ import annotations

import copy
import itertools
from datetime import datetime
from typing import Any

from kubetune.api.resource import FineTuneJob
from kubetune.operator.actions import (
    Action,
    CreateChild,
    DeleteFineTuneJob,
    DeleteJob,
    ReplaceConfigMapData,
    SetJobSuspend,
)
from kubetune.operator.cluster import JobRef
from kubetune.operator.events import Event
from kubetune.operator.observed import Observed
from kubetune.operator.runtime.kube import ApiError
from kubetune.operator.runtime.kube_cluster import apply_in_order


class FakeCluster:
    """Children by (kind, name), pods, and a log of every write the operator made."""

    def __init__(self, secret_keys: frozenset[str] | None = None) -> None:
        self.children: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.secret_keys = secret_keys
        self.status: dict[str, Any] = {}
        self.status_writes: list[dict[str, Any]] = []
        self.events: list[Event] = []
        self.applied: list[Action] = []
        self.progress: Any = None
        self.fail_actions: set[type] = set()
        self.fail_observe = False
        self.deleted = False
        self._uids = (f"uid-{n}" for n in itertools.count(1))

    def observe(self, job: FineTuneJob) -> Observed:
        if self.fail_observe:
            raise ApiError(503, "Service Unavailable")
        name = job.metadata.name
        return Observed(
            job=copy.deepcopy(self.children.get(("Job", name))),
            pods=tuple(copy.deepcopy(self.pods)),
            configmap=copy.deepcopy(self.children.get(("ConfigMap", f"{name}-config"))),
            service=copy.deepcopy(self.children.get(("Service", name))),
            secret_keys=self.secret_keys,
        )

    def others_first(self, ref: JobRef) -> bool:
        return False

    def apply_all(self, job: FineTuneJob, actions: list[Action]) -> list[str]:
        return apply_in_order(self, job, actions)

    def apply(self, job: FineTuneJob, action: Action) -> None:
        if type(action) in self.fail_actions:
            raise ApiError(500, "Internal Server Error", "injected")
        self.applied.append(action)
        if isinstance(action, CreateChild):
            obj = copy.deepcopy(action.obj)
            obj["metadata"]["uid"] = next(self._uids)
            self.children[(obj["kind"], obj["metadata"]["name"])] = obj
        elif isinstance(action, ReplaceConfigMapData):
            self.children[("ConfigMap", action.name)]["data"] = dict(action.data)
        elif isinstance(action, DeleteJob):
            self.children[("Job", action.name)]["metadata"]["deletionTimestamp"] = "2026-11-21T12:00:00Z"
        elif isinstance(action, SetJobSuspend):
            self.children[("Job", action.name)]["spec"]["suspend"] = action.suspend
        elif isinstance(action, DeleteFineTuneJob):
            self.deleted = True

    def write_status(self, ref: JobRef, patch: dict[str, Any]) -> None:
        self.status_writes.append(patch)
        self.status = {k: v for k, v in {**self.status, **patch}.items() if v is not None}

    def post_event(self, ref: JobRef, event: Event, now: datetime) -> None:
        self.events.append(event)

    def take_progress(self, job: FineTuneJob, pod: dict[str, Any]) -> Any:
        return self.progress

    # What the Job controller and the kubelet would do, driven by the test.

    def batch_job(self, name: str) -> dict[str, Any]:
        return self.children[("Job", name)]

    def set_job_status(self, name: str, **fields: Any) -> None:
        self.batch_job(name).setdefault("status", {}).update(fields)

    def finish_job(self, name: str, type_: str, reason: str = "") -> None:
        status = self.batch_job(name).setdefault("status", {})
        status["conditions"] = [{"type": type_, "status": "True", "reason": reason}]
        status["active"] = 0

    def remove_job(self, name: str) -> None:
        del self.children[("Job", name)]
        self.pods = []

    def body(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The FineTuneJob as the next pass reads it: with the status written so far."""
        out = copy.deepcopy(doc)
        if self.status:
            out["status"] = copy.deepcopy(self.status)
        return out
