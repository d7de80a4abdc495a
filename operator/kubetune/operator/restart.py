"""Retry policy: what a failed attempt means, and whether the job gets another one.

The batch Job runs with `backoffLimit: 0`, so any counted pod failure fails the attempt;
the operator then recreates the Job and the trainer resumes from the newest checkpoint.
Node disruptions and configuration errors are told apart from ordinary failures here,
in one place, as pure functions of the observed children.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from kubetune.api.resource import FineTuneJob
from kubetune.exitcodes import CONFIG_ERROR_EXIT_CODE
from kubetune.operator import observed as obs
from kubetune.operator.observed import Observed
from kubetune.operator.timefmt import parse_time

VerdictKind = Literal["restart", "disrupted", "config-error", "deadline", "exhausted"]
CAUSE_LIMIT = 300


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
