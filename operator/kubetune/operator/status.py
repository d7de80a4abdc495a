"""The FineTuneJob status, recomputed from the observed children on every pass.

Nothing here remembers anything between passes except through `previous` (the status
already on the resource), so a restarted operator reaches the same answer. The phase
comes from the batch Job and its pods; progress, checkpoints and samples from rank 0's
reports; outputs from its termination message.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from types import EllipsisType

from kubetune.api.resource import FineTuneJob
from kubetune.api.status import CheckpointRef, Condition, DataReport, FineTuneJobStatus, Outputs, Workers
from kubetune.operator import conditions as cond
from kubetune.operator import naming
from kubetune.operator import observed as obs
from kubetune.operator.observed import Observed
from kubetune.operator.output_claims import holder
from kubetune.operator.reports import ProgressReport, ResultReport
from kubetune.operator.restart import Verdict, failure_verdict
from kubetune.operator.timefmt import format_time

TERMINAL = ("Succeeded", "Failed")
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@dataclass(frozen=True)
class PhaseView:
    """The phase with the reason and message that explain it."""

    phase: str
    reason: str
    message: str


def _view(phase: str, reason: cond.Reason, **fields: object) -> PhaseView:
    return PhaseView(phase, *reason.say(**fields))


def is_final(status: FineTuneJobStatus, generation: int | None = None) -> bool:
    """Succeeded or Failed for good: a fixed spec may re-run an invalid job, and a changed spec
    (`generation` past the one refused) a job refused for its output prefix; nothing else."""
    if status.phase not in TERMINAL:
        return False
    failed = cond.find(status.conditions, "Failed")
    if not (failed and failed.status == "True"):
        return True
    if failed.reason == cond.INVALID_SPEC.reason:
        return False
    if failed.reason == cond.OUTPUT_CONFLICT.reason:
        return generation is None or generation == failed.observed_generation
    return True


def output_view(job: FineTuneJob, observed: Observed, previous: FineTuneJobStatus) -> PhaseView | None:
    """Failed before it starts when a live job holds an overlapping output prefix (see `output_claims`)."""
    if previous.start_time is not None or observed.job is not None:
        return None  # a job that has started keeps its prefix; the trainer guards the rest
    claim = holder(job, observed.peers)
    if claim is None:
        return None
    return _view("Failed", cond.OUTPUT_CONFLICT, uri=job.spec.output.uri, other_uri=claim.uri, other=claim.job,
                 other_phase=claim.phase)


def secret_view(job: FineTuneJob, observed: Observed) -> PhaseView | None:
    """Pending while the credentials Secret is missing or lacks a key the trainer needs."""
    ref = job.spec.storage.secret_ref
    if ref is None or not observed.secret_checked:
        return None
    if observed.secret_keys is None:
        return _view("Pending", cond.SECRET_NOT_FOUND, secret=ref.name, namespace=job.metadata.namespace)
    missing = [k for k in S3_KEYS if k not in observed.secret_keys]
    if missing:
        return _view("Pending", cond.SECRET_INCOMPLETE, secret=ref.name, keys=", ".join(missing))
    return None


def _failure_view(job: FineTuneJob, verdict: Verdict, result: ResultReport | None) -> PhaseView:
    limit = job.spec.run_policy.backoff_limit
    if verdict.kind == "restart":
        return _view("Restarting", cond.RESTARTING, cause=verdict.cause, restarts=verdict.restarts, limit=limit)
    if verdict.kind == "disrupted":
        return _view("Restarting", cond.NODE_DISRUPTED, cause=verdict.cause)
    if verdict.kind == "config-error":
        return _view("Failed", cond.CONFIG_ERROR, detail=(result and result.error) or verdict.cause)
    if verdict.kind == "deadline":
        return _view("Failed", cond.DEADLINE_EXCEEDED, seconds=job.spec.run_policy.active_deadline_seconds)
    return _view("Failed", cond.BACKOFF_LIMIT_EXCEEDED, restarts=verdict.restarts, limit=limit, cause=verdict.cause)


def _pods_view(job: FineTuneJob, observed: Observed, waiting: str, report: ProgressReport | None,
               previous: FineTuneJobStatus) -> PhaseView:
    """Pending (or still Restarting) until every rank runs; then Staging, then Running."""
    nodes = job.spec.resources.nodes
    pods = observed.current_pods()
    for pod in pods:
        problem = obs.pod_problem(pod)
        if problem is not None:
            reason = cond.UNSCHEDULABLE if problem[0] == "unschedulable" else cond.CONTAINER_WAITING
            return _view(waiting, reason, pod=obs.pod_name(pod), detail=problem[1])
    started = sum(1 for p in pods if obs.pod_phase(p) in ("Running", "Succeeded", "Failed"))  # ended = started
    if started < nodes:
        if waiting == "Restarting" and previous.phase == "Restarting":  # why it restarts stays in view
            return PhaseView("Restarting", _reason_of(previous, "Restarting"), previous.message)
        return _view(waiting, cond.PODS_PENDING, waiting=nodes - started, nodes=nodes)
    if _training(report, previous):
        return _view("Running", cond.TRAINING, nodes=nodes)
    return _view("Staging", cond.STAGING)


def _training(report: ProgressReport | None, previous: FineTuneJobStatus) -> bool:
    if report is None:
        return previous.phase == "Running"
    if report.stage is not None:
        return report.stage != "staging"
    return report.progress is not None and report.progress.step is not None


def decide_phase(job: FineTuneJob, observed: Observed, previous: FineTuneJobStatus, verdict: Verdict | None,
                 report: ProgressReport | None = None, result: ResultReport | None = None) -> PhaseView:
    """The phase of a valid, not yet final job; `verdict` is `failure_verdict(job, observed)`."""
    if (view := output_view(job, observed, previous)) is not None:
        return view
    if observed.job is None and (view := secret_view(job, observed)) is not None:
        return view  # a running attempt already has its credentials; only a new one waits
    waiting = "Restarting" if previous.phase == "Restarting" else "Pending"
    if observed.job is None or observed.job_deleting:
        if waiting == "Restarting":
            return PhaseView("Restarting", _reason_of(previous, "Restarting"), previous.message)
        return _view("Pending", cond.CREATING)
    if observed.job_condition("Complete") is not None:
        uri = (result and result.outputs and result.outputs.uri) or job.spec.output.uri
        if result is not None and result.early_stop:
            return _view("Succeeded", cond.EARLY_STOPPED, detail=result.early_stop, uri=uri)
        return _view("Succeeded", cond.SUCCEEDED, uri=uri)
    if verdict is not None:
        return _failure_view(job, verdict, result)
    if observed.job_suspended:
        if job.spec.scheduling.queue_name is not None and not job.spec.run_policy.suspend:
            return _view("Suspended", cond.QUEUED, queue=job.spec.scheduling.queue_name)
        return _view("Suspended", cond.SUSPENDED)
    return _pods_view(job, observed, waiting, report, previous)


def _reason_of(previous: FineTuneJobStatus, type_: str) -> str:
    found = cond.find(previous.conditions, type_)
    return found.reason if found is not None else cond.RESTARTING.reason


def _created(
    job: FineTuneJob, observed: Observed, previous: FineTuneJobStatus, view: PhaseView
) -> tuple[bool, str, str]:
    if observed.job is not None:
        name = observed.job.get("metadata", {}).get("name", naming.batch_job_name(job.metadata.name))
        return (True, *cond.CREATED.say(job=name, nodes=job.spec.resources.nodes))
    old = cond.find(previous.conditions, "Created")
    if old is not None and old.status == "True":
        return True, old.reason, old.message
    return False, view.reason, view.message


def _workers(observed: Observed) -> Workers | None:
    if observed.job is None:
        return None
    status = observed.job.get("status") or {}
    return Workers(active=status.get("active", 0), ready=status.get("ready", 0) or 0,
                   succeeded=status.get("succeeded", 0), failed=status.get("failed", 0))


def merge_checkpoints(old: list[CheckpointRef], new: tuple[CheckpointRef, ...], keep: int) -> list[CheckpointRef]:
    """Newest last, one per step (a newer report wins), pruned to `keep`."""
    by_step = {c.step: c for c in old}
    by_step.update({c.step: c for c in new})
    return [by_step[s] for s in sorted(by_step)][-keep:]


def _times(observed: Observed, previous: FineTuneJobStatus, phase: str, now: str) -> tuple[str | None, str | None]:
    job_status = (observed.job or {}).get("status") or {}
    start = previous.start_time or job_status.get("startTime")
    if start is None and observed.job is not None and not observed.job_suspended:
        start = now
    end = None
    if phase in TERMINAL:
        end = previous.completion_time or job_status.get("completionTime") or now
    return start, end


def _reports(progress: ProgressReport | None, result: ResultReport | None) -> ProgressReport | None:
    """The freshest report: the live `/progress`, else the one in the termination message."""
    return progress or (result.progress if result else None)


def _restarts(observed: Observed, previous: FineTuneJobStatus, verdict: Verdict | None) -> int:
    counted = observed.job_restarts if observed.job is not None else 0
    if verdict is not None and observed.job is not None:
        counted = verdict.restarts
    return max(previous.restarts, counted)


def compute_status(
    job: FineTuneJob,
    observed: Observed,
    now: datetime,
    previous: FineTuneJobStatus | None = None,
    progress: ProgressReport | None = None,
    result: ResultReport | None = None,
    verdict: Verdict | EllipsisType | None = ...,
) -> FineTuneJobStatus:
    """The whole status for this pass; `previous` supplies what only history knows.

    `verdict` is `failure_verdict(job, observed)` when the pass has judged the attempt already
    (it judges once and hands the verdict to both the status and the actions).
    """
    previous = previous or FineTuneJobStatus()
    generation = (job.metadata.model_extra or {}).get("generation")
    stamp = format_time(now)
    if is_final(previous, generation):
        return previous.model_copy(update={"observed_generation": generation})
    verdict = failure_verdict(job, observed) if verdict is ... else verdict
    view = decide_phase(job, observed, previous, verdict, progress, result)
    report = _reports(progress, result)
    created = _created(job, observed, previous, view)
    start, end = _times(observed, previous, view.phase, stamp)
    new_progress = previous.progress
    if report is not None and report.progress is not None:
        new_progress = report.progress.model_copy(update={"updated_at": stamp})
    outputs = previous.outputs
    if view.phase == "Succeeded" and result is not None and result.outputs is not None:
        outputs = result.outputs
    outputs = with_report(outputs, report, previous.outputs, job.spec.output.uri)
    data = _bounded((report.data if report is not None else None) or previous.data)
    return FineTuneJobStatus(
        phase=view.phase,
        message=view.message,
        observed_generation=generation,
        conditions=_admitted(cond.phase_conditions(previous.conditions, view.phase, view.reason, view.message,
                                                   created, stamp, generation), job, observed)
        + _data_condition(previous, data, stamp, generation),
        start_time=start,
        completion_time=end,
        restarts=_restarts(observed, previous, verdict),
        workers=_workers(observed) or previous.workers,
        progress=new_progress,
        checkpoints=merge_checkpoints(previous.checkpoints, report.checkpoints if report else (),
                                      job.spec.output.keep_checkpoints),
        outputs=outputs,
        samples=list(report.samples) if report and report.samples else previous.samples,
        data=data,
    )


def _admitted(conditions: list[Condition], job: FineTuneJob, observed: Observed) -> list[Condition]:
    """A queued job's Job that Kueue has let run: its Suspended condition says Admitted (it keeps its time)."""
    queue = job.spec.scheduling.queue_name
    if queue is None or observed.job is None or observed.job_suspended or job.spec.run_policy.suspend:
        return conditions
    reason, message = cond.ADMITTED.say(queue=queue)
    return [c.model_copy(update={"reason": reason, "message": message}) if c.type == "Suspended" and c.status == "False"
            else c for c in conditions]


def with_report(outputs: Outputs | None, report: ProgressReport | None, previous: Outputs | None,
                output_uri: str) -> Outputs | None:
    """`outputs.report` as soon as rank 0 names its report page, before the job succeeds, and kept once
    the final outputs arrive; only a page under the job's own output is taken (rank 0 is untrusted)."""
    uri = (report.report if report is not None else None) or (previous.report if previous is not None else None)
    if not uri or (outputs is not None and outputs.report) or len(uri) > REPORT_URI_CHARS:
        return outputs
    if not uri.startswith(output_uri.rstrip("/") + "/"):
        return outputs
    return (outputs or Outputs()).model_copy(update={"report": uri})


REPORT_URI_CHARS = 2048
DATA_SKIPPED_CONDITION = "DataSkipped"
SKIPPED_KEPT = 10
"""Skipped files kept in status.data: rank 0 is untrusted, and the object must stay small."""
FILE_CHARS = 300
SKIPPED_SHOWN = 5
"""Skipped files a condition message names; the trainer's log names every one."""


def _bounded(data: DataReport | None) -> DataReport | None:
    """At most `SKIPPED_KEPT` skipped files, each name and reason cut to `FILE_CHARS`."""
    if data is None:
        return None
    kept = [f.model_copy(update={"file": f.file[:FILE_CHARS], "reason": f.reason[:FILE_CHARS]})
            for f in data.skipped_files[:SKIPPED_KEPT]]
    return data.model_copy(update={"skipped_files": kept})


def _data_condition(previous: FineTuneJobStatus, data: DataReport | None, now: str,
                    generation: int | None) -> list[Condition]:
    """DataSkipped: True naming the first few skipped images, False when every image is used."""
    if data is None:
        return []
    if data.skipped:
        shown = ", ".join(f"{f.file} ({f.reason})" for f in data.skipped_files[:SKIPPED_SHOWN])
        more = data.skipped - min(data.skipped, SKIPPED_SHOWN, len(data.skipped_files))
        files = shown + (f" and {more} more (see the trainer's log)" if more else "")
        reason, message = cond.DATA_SKIPPED.say(skipped=data.skipped, total=data.images + data.skipped,
                                                limit=data.max_skipped, files=files)
        status = "True"
    else:
        (reason, message), status = cond.NO_DATA_SKIPPED.say(images=data.images), "False"
    old = cond.find(previous.conditions, DATA_SKIPPED_CONDITION)
    return [cond.updated(old, DATA_SKIPPED_CONDITION, status, reason, message, now, generation)]



def invalid_status(problems: list[str], generation: int | None, now: datetime,
                   previous: FineTuneJobStatus | None = None) -> FineTuneJobStatus:
    """Failed with every problem named by field path; no children are created."""
    previous = previous or FineTuneJobStatus()
    stamp = format_time(now)
    reason, message = cond.INVALID_SPEC.say(problems="; ".join(problems))
    conditions = cond.phase_conditions(previous.conditions, "Failed", reason, message,
                                       (False, reason, message), stamp, generation)
    return previous.model_copy(update={
        "phase": "Failed", "message": message, "observed_generation": generation,
        "conditions": conditions, "completion_time": previous.completion_time or stamp,
    })
