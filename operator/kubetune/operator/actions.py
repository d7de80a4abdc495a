"""What the operator must change on the cluster this pass, decided from what it saw.

Each action is a small value; the handlers carry them out. Deciding and doing are kept
apart so that every decision (create, restart, suspend, clean up) is tested without a
cluster, and so that carrying out the same plan twice changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from types import EllipsisType
from typing import Any

from kubetune.api.resource import FineTuneJob
from kubetune.api.status import FineTuneJobStatus
from kubetune.operator.observed import Observed
from kubetune.operator.render import Attempt, render_configmap, render_job, render_service
from kubetune.operator.restart import Verdict, failure_verdict, next_attempt_at, remaining_deadline
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import TERMINAL, secret_view
from kubetune.operator.timefmt import parse_time


@dataclass(frozen=True)
class CreateChild:
    """Create (or adopt, when it already exists) one child object."""

    obj: dict[str, Any]


@dataclass(frozen=True)
class ReplaceConfigMapData:
    """Keep the resolved spec current; the next attempt's pods read the new one."""

    name: str
    data: dict[str, str]


@dataclass(frozen=True)
class DeleteJob:
    """Delete a failed attempt (foreground, so its pods are gone before the next starts)."""

    name: str
    uid: str


@dataclass(frozen=True)
class SetJobSuspend:
    name: str
    suspend: bool


@dataclass(frozen=True)
class DeleteFineTuneJob:
    """`runPolicy.ttlSecondsAfterFinished` has passed."""


Action = CreateChild | ReplaceConfigMapData | DeleteJob | SetJobSuspend | DeleteFineTuneJob


def ttl_expired(job: FineTuneJob, status: FineTuneJobStatus, now: datetime) -> bool:
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    finished = parse_time(status.completion_time)
    if ttl is None or finished is None or status.phase not in TERMINAL:
        return False
    return now >= finished + timedelta(seconds=ttl)


def _config_actions(job: FineTuneJob, observed: Observed, settings: OperatorSettings) -> list[Action]:
    out: list[Action] = []
    configmap = render_configmap(job)
    if observed.configmap is None:
        out.append(CreateChild(configmap))
    elif observed.configmap.get("data") != configmap["data"]:
        out.append(ReplaceConfigMapData(configmap["metadata"]["name"], configmap["data"]))
    if observed.service is None:
        out.append(CreateChild(render_service(job, settings)))
    return out


def _job_actions(job: FineTuneJob, observed: Observed, status: FineTuneJobStatus, settings: OperatorSettings,
                 now: datetime, verdict: Verdict | None) -> list[Action]:
    if observed.job is None:
        not_before = next_attempt_at(status, settings.restart_backoff_seconds)
        if not_before is not None and now < not_before:
            return []  # backing off; a later pass (the resync timer) starts the attempt
        attempt = Attempt(status.restarts, remaining_deadline(job, status.start_time, now))
        return [CreateChild(render_job(job, settings, attempt))]
    meta = observed.job["metadata"]
    if observed.job_deleting:
        return []
    if verdict is not None:
        return [DeleteJob(meta["name"], meta.get("uid", ""))] if verdict.retried else []
    wanted = job.spec.run_policy.suspend
    if wanted and not observed.job_suspended:
        return [SetJobSuspend(meta["name"], True)]
    if not wanted and observed.job_suspended and job.spec.scheduling.queue_name is None:
        return [SetJobSuspend(meta["name"], False)]
    return []


def plan_actions(job: FineTuneJob, observed: Observed, status: FineTuneJobStatus, settings: OperatorSettings,
                 now: datetime, verdict: Verdict | EllipsisType | None = ...) -> list[Action]:
    """Actions that move the cluster towards `status` (already computed for this pass); `verdict` as in
    `compute_status`."""
    if status.phase in TERMINAL:
        return [DeleteFineTuneJob()] if ttl_expired(job, status, now) else []
    if observed.job is None and secret_view(job, observed) is not None:
        return []
    verdict = failure_verdict(job, observed) if verdict is ... else verdict
    return _config_actions(job, observed, settings) + _job_actions(job, observed, status, settings, now, verdict)
