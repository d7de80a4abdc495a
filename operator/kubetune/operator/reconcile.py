"""One reconcile pass: validate, observe, decide, act, write status once, then emit events.

Every trigger (a new job, a changed spec or Job, a retry, the resync, rank 0's news) queues
this same pass, so the result depends only on the resource and its children, never on which
event arrived.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from kubetune.api.resource import FineTuneJob
from kubetune.api.status import FineTuneJobStatus
from kubetune.api.validation import validate_document
from kubetune.operator import observed as obs
from kubetune.operator.actions import Action, CreateChild, DeleteFineTuneJob, plan_actions
from kubetune.operator.cluster import Cluster, JobRef
from kubetune.operator.events import Event, events_for_transition
from kubetune.operator.observed import Observed
from kubetune.operator.reports import ProgressReport, ResultReport, parse_result
from kubetune.operator.restart import failure_verdict
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import compute_status, invalid_status, is_final


@dataclass
class PassOutcome:
    """What one pass did; `errors` are actions that failed and should be retried soon."""

    status: FineTuneJobStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    wrote_status: bool = False
    errors: list[str] = field(default_factory=list)
    deferred: bool = False
    """Children were created during a burst of other creates: the status waits for the next pass."""


class TransitionMetrics(Protocol):
    """Where a pass counts its job's phase change (`metrics.OperatorMetrics`)."""

    def observe_transition(self, uid: str, namespace: str, old: FineTuneJobStatus, new: FineTuneJobStatus) -> None:
        ...


def previous_status(body: Mapping[str, Any]) -> FineTuneJobStatus:
    return FineTuneJobStatus.model_validate(body.get("status") or {})


def job_document(body: Mapping[str, Any]) -> dict[str, Any]:
    """The resource as the validator reads it: no status (the operator's, not the user's)."""
    return {k: v for k, v in dict(body).items() if k != "status"}


def status_patch(old: Mapping[str, Any] | None, new: FineTuneJobStatus) -> dict[str, Any] | None:
    """A merge patch from the stored status to `new` (None values delete), or None if equal."""
    wanted = new.model_dump(mode="json", by_alias=True, exclude_none=True)
    old = dict(old or {})
    if wanted == old:
        return None
    return {**{k: None for k in old if k not in wanted}, **wanted}


def rank0_reports(job: FineTuneJob, seen: Observed, cluster: Cluster) -> tuple[ProgressReport | None,
                                                                               ResultReport | None]:
    """Progress a running rank 0 reported since the last pass, or its last words once it has ended."""
    pod = seen.rank0_pod()
    if pod is None:
        return None, None
    ended = obs.terminated(pod)
    if ended is not None:
        return None, parse_result(ended.get("message"))
    if obs.pod_phase(pod) == "Running":
        return cluster.take_progress(job, pod), None
    return None, None


def _finish(ref: JobRef, body: Mapping[str, Any], old: FineTuneJobStatus, new: FineTuneJobStatus,
            cluster: Cluster, metrics: TransitionMetrics, now: datetime, outcome: PassOutcome) -> PassOutcome:
    patch = status_patch(body.get("status"), new)
    if patch is not None:
        cluster.write_status(ref, patch)
        outcome.wrote_status = True
    outcome.events = events_for_transition(old, new)
    for event in outcome.events:
        cluster.post_event(ref, event, now)
    metrics.observe_transition(ref.uid, ref.namespace, old, new)
    return outcome


def reconcile(body: Mapping[str, Any], cluster: Cluster, settings: OperatorSettings, metrics: TransitionMetrics,
              now: datetime) -> PassOutcome:
    """Bring one FineTuneJob's children and status in line with its spec."""
    ref, old = JobRef.of(body), previous_status(body)
    generation = (body.get("metadata") or {}).get("generation")
    validated = validate_document(job_document(body))
    if validated.job is None:
        new = invalid_status([str(p) for p in validated.problems], generation, now, old)
        return _finish(ref, body, old, new, cluster, metrics, now, PassOutcome(new))
    job = validated.job
    if is_final(old, generation) and job.spec.run_policy.ttl_seconds_after_finished is None:
        new = old.model_copy(update={"observed_generation": generation})
        return _finish(ref, body, old, new, cluster, metrics, now, PassOutcome(new))
    seen = cluster.observe(job)
    progress, result = rank0_reports(job, seen, cluster)
    verdict = failure_verdict(job, seen)  # judged once: the status and the actions act on the same verdict
    new = compute_status(job, seen, now, old, progress, result, verdict)
    outcome = PassOutcome(new, plan_actions(job, seen, new, settings, now, verdict))
    outcome.errors = cluster.apply_all(job, outcome.actions)  # the status below is true even if some failed
    if any(isinstance(a, DeleteFineTuneJob) for a in outcome.actions) and not outcome.errors:
        return outcome
    if any(isinstance(a, CreateChild) for a in outcome.actions) and not outcome.errors and cluster.others_first(ref):
        outcome.deferred = True  # in a burst, other jobs' Jobs before this one's status; a queued pass writes it
        return outcome
    return _finish(ref, body, old, new, cluster, metrics, now, outcome)
