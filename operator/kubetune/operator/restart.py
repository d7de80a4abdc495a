"""Retry policy: what a failed attempt means, and whether the job gets another one.

The batch Job runs with `backoffLimit: 0`, so any counted pod failure fails the attempt;
the operator then recreates the Job and the trainer resumes from the newest checkpoint.
Node disruptions and configuration errors are told apart from ordinary failures here,
in one place, as pure functions of the observed children.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from kubetune.api.resource import FineTuneJob
from kubetune.api.status import FineTuneJobStatus
from kubetune.exitcodes import CONFIG_ERROR_EXIT_CODE
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


def failure_cause(observed: Observed) -> str:
    """One line on why the attempt failed, from the first failed pod or the Job condition."""
    for pod in observed.current_pods():
        ended = obs.terminated(pod)
        if obs.pod_phase(pod) == "Failed" and ended:
            text = f"pod {obs.pod_name(pod)} exited with code {ended.get('exitCode')}"
            if ended.get("reason"):
                text += f" ({ended['reason']})"
            if ended.get("message"):
                text += f": {ended['message']}"
            return _short(text)
    cond = observed.job_condition("Failed") or {}
    return _short(cond.get("message") or cond.get("reason") or "the Job failed")


def _config_error(observed: Observed) -> bool:
    return any(
        (obs.terminated(p) or {}).get("exitCode") == CONFIG_ERROR_EXIT_CODE for p in observed.current_pods()
    )


def failure_verdict(job: FineTuneJob, observed: Observed) -> Verdict | None:
    """None while the Job has not failed; otherwise what to do about it."""
    failed = observed.job_condition("Failed")
    if failed is None:
        return None
    base = observed.job_restarts
    cause = failure_cause(observed)
    if failed.get("reason") == "DeadlineExceeded":
        return Verdict("deadline", cause, base)
    if _config_error(observed):
        return Verdict("config-error", cause, base)
    if any(obs.pod_disrupted(p) for p in observed.current_pods()):
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
