"""What the operator saw on the cluster in one pass, and plain readings of it.

Children arrive as the API server's JSON (camelCase dicts), so the pure functions that
read them are tested with the same shapes the cluster returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.operator import naming

WAITING_PROBLEMS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
     "CreateContainerError", "CrashLoopBackOff", "RunContainerError"}
)


@dataclass(frozen=True)
class Observed:
    """The children of one FineTuneJob as read this pass."""

    job: dict[str, Any] | None = None
    pods: tuple[dict[str, Any], ...] = ()
    configmap: dict[str, Any] | None = None
    service: dict[str, Any] | None = None
    secret_keys: frozenset[str] | None = None
    """Keys of the referenced Secret; None when it does not exist or none is referenced."""
    secret_checked: bool = True
    """False when the operator may not read Secrets: then the pods report a missing one."""
    peers: tuple[dict[str, Any], ...] = ()
    """The other FineTuneJobs the operator watches, for output ownership (`output_claims`)."""

    def job_condition(self, type_: str) -> dict[str, Any] | None:
        """A True condition of the batch Job."""
        for cond in ((self.job or {}).get("status") or {}).get("conditions") or []:
            if cond.get("type") == type_ and cond.get("status") == "True":
                return cond
        return None

    @property
    def job_deleting(self) -> bool:
        return bool(self.job and self.job.get("metadata", {}).get("deletionTimestamp"))

    @property
    def job_suspended(self) -> bool:
        return bool(self.job and self.job.get("spec", {}).get("suspend"))

    @property
    def job_restarts(self) -> int:
        annotations = (self.job or {}).get("metadata", {}).get("annotations") or {}
        try:
            return int(annotations.get(naming.RESTARTS_ANNOTATION, "0"))
        except ValueError:
            return 0

    def current_pods(self) -> list[dict[str, Any]]:
        """Pods of the current Job (not those of a deleted attempt), by completion index."""
        uid = (self.job or {}).get("metadata", {}).get("uid")
        pods = [p for p in self.pods if uid is None or _owner_uid(p) in (uid, None)]
        return sorted(pods, key=completion_index)

    def latest_pods(self) -> list[dict[str, Any]]:
        """The newest pod of each completion index of the current Job, by index.

        With one node a lost pod is replaced within the same Job (its podFailurePolicy ignores
        disruptions), so the pod that ended the attempt is the replacement, not the lost one.
        Between two pods created in the same second, the one not marked disrupted is the newer.
        """
        newest: dict[int, dict[str, Any]] = {}
        for pod in self.current_pods():
            index, held = completion_index(pod), newest.get(completion_index(pod))
            if held is None or _age_key(pod) >= _age_key(held):
                newest[index] = pod
        return [newest[i] for i in sorted(newest)]

    def rank0_pod(self) -> dict[str, Any] | None:
        """The newest pod with completion index 0 (the one that reports progress)."""
        rank0 = [p for p in self.current_pods() if completion_index(p) == 0]
        return max(rank0, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "", default=None)


def _age_key(pod: dict[str, Any]) -> tuple[str, bool]:
    return pod.get("metadata", {}).get("creationTimestamp") or "", not pod_disrupted(pod)


def _owner_uid(pod: dict[str, Any]) -> str | None:
    for ref in pod.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def completion_index(pod: dict[str, Any]) -> int:
    annotations = pod.get("metadata", {}).get("annotations") or {}
    try:
        return int(annotations.get(naming.COMPLETION_INDEX_ANNOTATION, "-1"))
    except ValueError:
        return -1


def pod_phase(pod: dict[str, Any]) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


def pod_condition(pod: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def pod_disrupted(pod: dict[str, Any]) -> bool:
    """The pod was evicted, preempted or lost with its node (the DisruptionTarget condition)."""
    cond = pod_condition(pod, "DisruptionTarget")
    return cond is not None and cond.get("status") == "True"


def trainer_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == naming.CONTAINER_NAME), {})


def terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer container's terminated state (exit code, message), if it ended."""
    state = trainer_status(pod).get("state") or {}
    return state.get("terminated")


def pod_problem(pod: dict[str, Any]) -> tuple[str, str] | None:
    """Why a pending pod cannot start: ("unschedulable" | "waiting", detail), or None."""
    scheduled = pod_condition(pod, "PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return "unschedulable", scheduled.get("message") or "no node fits"
    waiting = (trainer_status(pod).get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in WAITING_PROBLEMS:
        detail = waiting["reason"] + (f": {waiting['message']}" if waiting.get("message") else "")
        return "waiting", detail
    return None


def pod_name(pod: dict[str, Any]) -> str:
    return pod.get("metadata", {}).get("name", "?")
