"""The operator's one seam to the cluster: what a reconcile pass needs from it.

`reconcile` depends on this protocol only: read a job's children, carry out actions, write
status, post events, and take what rank 0's `/progress` said. `KubeCluster` implements it on
the API server; tests implement it in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from kubetune.api.resource import FineTuneJob
from kubetune.operator.actions import Action
from kubetune.operator.events import Event
from kubetune.operator.observed import Observed
from kubetune.operator.reports import ProgressReport


@dataclass(frozen=True)
class JobRef:
    """Which FineTuneJob a status write or an event is about (valid or not)."""

    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> JobRef:
        meta = body.get("metadata") or {}
        return cls(meta.get("namespace") or "default", meta.get("name", ""), meta.get("uid", ""))


class Cluster(Protocol):
    """What one reconcile pass needs from the cluster."""

    def observe(self, job: FineTuneJob) -> Observed: ...

    def apply(self, job: FineTuneJob, action: Action) -> None: ...

    def apply_all(self, job: FineTuneJob, actions: list[Action]) -> list[str]:
        """Carry out a pass's actions; what failed, to be retried by a later pass."""
        ...

    def write_status(self, ref: JobRef, patch: dict[str, Any]) -> None: ...

    def post_event(self, ref: JobRef, event: Event, now: datetime) -> None: ...

    def take_progress(self, job: FineTuneJob, pod: dict[str, Any]) -> ProgressReport | None:
        """What rank 0 (`pod`) reported on `/progress` since the last pass took it (None: nothing new).

        Never waits for the pod: reads happen in the background, and a reading with news asks
        for the job's next pass.
        """
        ...

    def others_first(self, ref: JobRef) -> bool:
        """Whether other new jobs wait for their children: a status that can wait lets them go first."""
        ...
