"""Retry policy: what a failed attempt means, and whether the job gets another one.

The batch Job runs with `backoffLimit: 0`, so any counted pod failure fails the attempt;
the operator then recreates the Job and every rank resumes from the newest checkpoint.
This module is the one place that reads how each pod ended (`classify_pod`, the rule
documented in docs/operator.md, "Which exits count") and what that makes of the attempt
(`failure_verdict`), as pure functions of the observed children.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from kubetune.api.exitcodes import CONFIG_ERROR_EXIT_CODE, INTERRUPTED, PEER_LOST
from kubetune.api.resource import FineTuneJob
from kubetune.api.status import FineTuneJobStatus
from kubetune.operator import conditions as cond
from kubetune.operator import observed as obs
from kubetune.operator.observed import Observed
from kubetune.operator.timefmt import parse_time

VerdictKind = Literal["restart", "disrupted", "config-error", "deadline", "exhausted"]
CAUSE_LIMIT = 300
BACKOFF_CAP_SECONDS = 300.0


@dataclass(frozen=True)
class Verdict:
    """The meaning of a failed attempt."""

    kind: VerdictKind
    cause: str
    restarts: int
    """Counted restarts once this verdict is acted on."""

    @property
    def retried(self) -> bool:
        return self.kind in ("restart", "disrupted")


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= CAUSE_LIMIT else text[: CAUSE_LIMIT - 3] + "..."


PodEnd = Literal["running", "succeeded", "config-error", "lost", "failed", "stopped", "peer-lost"]
"""How one pod of an attempt ended, by the rule below; "running" has not ended."""

OOM_KILLED = "OOMKilled"
ATTEMPT_ORDER: tuple[PodEnd, ...] = ("config-error", "lost", "failed", "stopped", "peer-lost")
"""Which pod explains a failed attempt: the first kind in this order that any pod shows."""
UNCOUNTED: frozenset[PodEnd] = frozenset({"lost", "stopped"})
"""Attempts explained by these are disruptions: restarted at once, never counted."""


def classify_pod(pod: dict[str, Any]) -> PodEnd:
    """How a pod ended, the one rule for every pod of an attempt (docs/operator.md):

    - `DisruptionTarget` condition (node lost or drained, eviction, preemption): "lost", whatever
      the exit code (137 when killed, 143 when it checkpointed in time);
    - exit 78: "config-error", fails the job at once;
    - killed for memory (`OOMKilled`) or any other exit but 0, 143 and 76: "failed", counted (an
      out-of-memory kill repeats on a retry, so it must not retry forever);
    - exit 143: "stopped", every rank stopped at one agreed step after a SIGTERM from outside;
    - exit 76 (`PEER_LOST`): "peer-lost", another pod's process went away or stalled.
    """
    if obs.pod_disrupted(pod):
        return "lost"
    ended = obs.terminated(pod)
    if ended is None:
        return "failed" if obs.pod_phase(pod) == "Failed" else "running"
    code = ended.get("exitCode")
    if code == 0:
        return "succeeded"
    if code == CONFIG_ERROR_EXIT_CODE:
        return "config-error"
    if ended.get("reason") == OOM_KILLED:
        return "failed"
    return {INTERRUPTED: "stopped", PEER_LOST: "peer-lost"}.get(code, "failed")


def _pod_cause(pod: dict[str, Any], kind: PodEnd) -> str:
    name = obs.pod_name(pod)
    if kind == "lost":
        reason = (obs.pod_condition(pod, "DisruptionTarget") or {}).get("reason") or "DisruptionTarget"
        return f"pod {name} was lost ({reason})"
    ended = obs.terminated(pod) or {}
    text = f"pod {name} exited with code {ended.get('exitCode')}"
    if ended.get("reason"):
        text += f" ({ended['reason']})"
    if ended.get("message"):
        text += f": {ended['message']}"
    return _short(text)


def _job_failed_on_disruption(observed: Observed) -> bool:
    """The Job's own failure names the DisruptionTarget rule: the lost pod may be gone already."""
    failed = observed.job_condition("Failed") or {}
    return failed.get("reason") == "PodFailurePolicy" and "DisruptionTarget" in (failed.get("message") or "")


def attempt_end(observed: Observed) -> tuple[PodEnd, str] | None:
    """The kind of the pod that explains a failed attempt (`ATTEMPT_ORDER`) and one line on it.

    Only each rank's newest pod counts: a lost pod the Job already replaced did not end the attempt.
    """
    ends = [(classify_pod(p), p) for p in observed.latest_pods()]
    for kind in ATTEMPT_ORDER:
        pod = next((p for k, p in ends if k == kind), None)
        if pod is not None:
            return kind, _pod_cause(pod, kind)
        if kind == "lost" and _job_failed_on_disruption(observed):
            return "lost", _short((observed.job_condition("Failed") or {}).get("message") or "")
    return None


def failure_cause(observed: Observed) -> str:
    """One line on why the attempt failed, from the pod that explains it or the Job condition."""
    found = attempt_end(observed)
    if found is not None:
        return found[1]
    cond = observed.job_condition("Failed") or {}
    return _short(cond.get("message") or cond.get("reason") or "the Job failed")


def failure_verdict(job: FineTuneJob, observed: Observed) -> Verdict | None:
    """None while the Job has not failed; otherwise what to do about it.

    A lost pod anywhere in the attempt makes it uncounted, whatever its peers exited with when
    they lost it, and so does a stop from outside (143) that no failure explains; a configuration
    error fails at once; a failure, or peers that lost each other with no other cause, count
    against `runPolicy.backoffLimit`.
    """
    failed = observed.job_condition("Failed")
    if failed is None:
        return None
    base = observed.job_restarts
    found = attempt_end(observed)
    kind, cause = found if found is not None else ("failed", failure_cause(observed))
    if failed.get("reason") == "DeadlineExceeded":
        return Verdict("deadline", cause, base)
    if kind == "config-error":
        return Verdict("config-error", cause, base)
    if kind in UNCOUNTED:
        return Verdict("disrupted", cause, base)
    if base + 1 > job.spec.run_policy.backoff_limit:
        return Verdict("exhausted", cause, base)
    return Verdict("restart", cause, base + 1)


def remaining_deadline(job: FineTuneJob, start_time: str | None, now: datetime) -> int | None:
    """Seconds left of `activeDeadlineSeconds`, counted from the first attempt's start."""
    limit = job.spec.run_policy.active_deadline_seconds
    if limit is None:
        return None
    started = parse_time(start_time)
    if started is None:
        return limit
    return max(1, limit - int((now - started).total_seconds()))


def restart_delay(restarts: int, base_seconds: float) -> float:
    """Seconds between a failure and restart number `restarts`: base, 2 x base, 4 x base... capped,
    as the Job controller backs off pod retries."""
    if restarts <= 0 or base_seconds <= 0:
        return 0.0
    return min(BACKOFF_CAP_SECONDS, base_seconds * 2 ** (restarts - 1))


def next_attempt_at(status: FineTuneJobStatus, base_seconds: float) -> datetime | None:
    """When a Restarting job may start its next attempt; None when nothing holds it back.

    The clock starts when the Restarting condition turned True. A node disruption is not the
    job's fault and is not counted, so it restarts at once.
    """
    if status.phase != "Restarting":
        return None
    restarting = cond.find(status.conditions, "Restarting")
    if restarting is None or restarting.reason == cond.NODE_DISRUPTED.reason:
        return None
    since = parse_time(restarting.last_transition_time)
    if since is None:
        return None
    return since + timedelta(seconds=restart_delay(status.restarts, base_seconds))
