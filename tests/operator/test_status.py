"""Status: the phase, conditions and counters computed from observed children, table-driven."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from ftj_builders import NOW, S3_KEYS, make_batch_job, make_job, make_pod, observed

from kubetune.api.status import CheckpointRef, Condition, FineTuneJobStatus
from kubetune.operator import conditions as cond
from kubetune.operator.events import primary_reason
from kubetune.operator.observed import Observed
from kubetune.operator.reports import ProgressReport, parse_progress, parse_result
from kubetune.operator.status import compute_status, invalid_status, merge_checkpoints

RUNNING = make_batch_job().active(1)
TRAINING = parse_progress({"stage": "training", "step": 10, "totalSteps": 100, "smoothedLoss": 0.1})
STAGING = parse_progress({"stage": "staging"})


def previous(phase: str | None = None, restarts: int = 0, reason: str = "") -> FineTuneJobStatus:
    conditions = [Condition(type=cond.PHASE_CONDITION[phase], status="True", reason=reason)] if phase else []
    return FineTuneJobStatus(phase=phase, restarts=restarts, conditions=conditions)


# (case, job, observed, previous, progress report, phase, reason, restarts)
PHASES: list[tuple[str, Any, Observed, FineTuneJobStatus, ProgressReport | None, str, str, int]] = [
    ("secret missing", make_job().secret(), observed(secret_keys=None), previous(), None,
     "Pending", "SecretNotFound", 0),
    ("secret lacks a key", make_job().secret(), observed(secret_keys=frozenset({"AWS_ACCESS_KEY_ID"})), previous(),
     None, "Pending", "SecretIncomplete", 0),
    ("secret deleted mid-run: the attempt goes on", make_job().secret(),
     observed(RUNNING, (make_pod().running(),), secret_keys=None), previous("Running"), TRAINING,
     "Running", "Training", 0),
    ("no secretRef needs no secret", make_job(), observed(secret_keys=None), previous(), None,
     "Pending", "Creating", 0),
    ("nothing created yet", make_job(), observed(), previous(), None, "Pending", "Creating", 0),
    ("pods not started", make_job(), observed(RUNNING, (make_pod(),)), previous(), None,
     "Pending", "PodsPending", 0),
    ("unschedulable", make_job(), observed(RUNNING, (make_pod().unschedulable(),)), previous(), None,
     "Pending", "Unschedulable", 0),
    ("image pull", make_job(), observed(RUNNING, (make_pod().waiting("ImagePullBackOff", "not found"),)),
     previous(), None, "Pending", "ContainerWaiting", 0),
    ("one of two running", make_job().nodes(2), observed(RUNNING, (make_pod().running(), make_pod(index=1))),
     previous(), None, "Pending", "PodsPending", 0),
    ("running, no report yet", make_job(), observed(RUNNING, (make_pod().running(),)), previous(), None,
     "Staging", "Staging", 0),
    ("running, staging", make_job(), observed(RUNNING, (make_pod().running(),)), previous(), STAGING,
     "Staging", "Staging", 0),
    ("running, training", make_job(), observed(RUNNING, (make_pod().running(),)), previous(), TRAINING,
     "Running", "Training", 0),
    ("progress unreachable keeps Running", make_job(), observed(RUNNING, (make_pod().running(),)),
     previous("Running"), None, "Running", "Training", 0),
    ("complete", make_job(), observed(make_batch_job().complete(), (make_pod().succeeded(),)), previous("Running"),
     None, "Succeeded", "Succeeded", 0),
    ("a pod ended, its Job not failed yet: no flicker back to Pending", make_job(),
     observed(RUNNING, (make_pod().failed(),)), previous("Staging"), None, "Staging", "Staging", 0),
    ("failed, retries left", make_job(), observed(make_batch_job().failed(), (make_pod().failed(),)),
     previous("Running"), None, "Restarting", "Restarting", 1),
    ("failed again, counted from the Job", make_job(),
     observed(make_batch_job().restarts(2).failed(), (make_pod().failed(),)), previous("Running", 2), None,
     "Restarting", "Restarting", 3),
    ("retries exhausted", make_job().backoff_limit(3),
     observed(make_batch_job().restarts(3).failed(), (make_pod().failed(),)), previous("Running", 3), None,
     "Failed", "BackoffLimitExceeded", 3),
    ("backoffLimit 0", make_job().backoff_limit(0), observed(make_batch_job().failed(), (make_pod().failed(),)),
     previous("Running"), None, "Failed", "BackoffLimitExceeded", 0),
    ("config error is not retried", make_job(),
     observed(make_batch_job().failed("PodFailurePolicy"), (make_pod().failed(78, "no model_index.json"),)),
     previous("Staging"), None, "Failed", "ConfigError", 0),
    ("deadline", make_job().deadline(60), observed(make_batch_job().failed("DeadlineExceeded")), previous("Running"),
     None, "Failed", "DeadlineExceeded", 0),
    ("node lost: not counted", make_job().nodes(2),
     observed(make_batch_job().failed(), (make_pod().failed(), make_pod(index=1).failed(137).disrupted())),
     previous("Running"), None, "Restarting", "NodeDisrupted", 0),
    ("old Job being deleted", make_job(), observed(make_batch_job().failed().deleting()),
     previous("Restarting", 1, "Restarting"), None, "Restarting", "Restarting", 1),
    ("between attempts", make_job(), observed(), previous("Restarting", 1, "NodeDisrupted"), None,
     "Restarting", "NodeDisrupted", 1),
    ("new attempt pending", make_job(), observed(make_batch_job().restarts(1).active(1), (make_pod(),)),
     previous("Restarting", 1, "Restarting"), None, "Restarting", "Restarting", 1),  # the cause stays in view
    ("new attempt staging", make_job(), observed(make_batch_job().restarts(1).active(1), (make_pod().running(),)),
     previous("Restarting", 1), STAGING, "Staging", "Staging", 1),
    ("suspended by user", make_job().suspended(), observed(make_batch_job().suspended()), previous("Running"), None,
     "Suspended", "Suspended", 0),
    ("queued by Kueue", make_job().queue("gpus"), observed(make_batch_job().suspended()), previous(), None,
     "Suspended", "Queued", 0),
    ("admitted by Kueue", make_job().queue("gpus"), observed(RUNNING, (make_pod().running(),)), previous("Suspended"),
     None, "Staging", "Staging", 0),
    ("pods of a deleted attempt ignored", make_job(),
     observed(RUNNING, (make_pod().owner("old-uid").failed(), make_pod().running())), previous(), TRAINING,
     "Running", "Training", 0),
    ("succeeded stays succeeded", make_job(), observed(), previous("Succeeded", 0, "Succeeded"), None,
     "Succeeded", "Succeeded", 0),
    ("failed stays failed", make_job(), observed(), previous("Failed", 3, "BackoffLimitExceeded"), None,
     "Failed", "BackoffLimitExceeded", 3),
    ("a fixed spec re-runs an invalid job", make_job(), observed(), previous("Failed", 0, "InvalidSpec"), None,
     "Pending", "Creating", 0),
]


@pytest.mark.parametrize(("case", "job", "seen", "before", "report", "phase", "reason", "restarts"), PHASES,
                         ids=[p[0] for p in PHASES])
def test_phase(case: str, job: Any, seen: Observed, before: FineTuneJobStatus, report: ProgressReport | None,
               phase: str, reason: str, restarts: int) -> None:
    status = compute_status(job.typed(), seen, NOW, before, report)
    assert (status.phase, primary_reason(status), status.restarts) == (phase, reason, restarts), status.message


def _types(status: FineTuneJobStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def test_every_standard_condition_is_reported() -> None:
    status = compute_status(make_job().typed(), observed(RUNNING, (make_pod().running(),)), NOW, None, TRAINING)
    assert _types(status) == {
        "Created": ("True", "ChildrenCreated"), "Running": ("True", "Training"),
        "Restarting": ("False", "NotStarted"), "Suspended": ("False", "NotStarted"),
        "Succeeded": ("False", "NotFinished"), "Failed": ("False", "NotFinished"),
    }


def test_last_transition_time_moves_only_when_a_condition_flips() -> None:
    job, seen = make_job().typed(), observed(RUNNING, (make_pod().running(),))
    first = compute_status(job, seen, NOW, None, TRAINING)
    later = compute_status(job, seen, NOW + timedelta(minutes=5), first, TRAINING)
    assert [c.last_transition_time for c in later.conditions] == [c.last_transition_time for c in first.conditions]
    done = compute_status(job, observed(make_batch_job().complete()), NOW + timedelta(minutes=9), later)
    times = {c.type: c.last_transition_time for c in done.conditions}
    assert times["Succeeded"] == times["Running"] == "2026-11-21T12:09:00Z"
    assert times["Created"] == times["Failed"] == "2026-11-21T12:00:00Z"
    assert _types(done)["Running"] == ("False", "Succeeded"), "a condition that stops being True says why"


def test_progress_checkpoints_and_samples_come_from_rank_zero() -> None:
    report = parse_progress({
        "stage": "training", "step": 600, "totalSteps": 2000, "smoothedLoss": 0.08, "imagesPerSecond": 41.5,
        "checkpoints": [{"step": 500, "uri": "s3://o/ckpt/500/"}],
        "samples": [{"step": 500, "prompt": "a corgi", "uri": "s3://o/s/500-0.png"}],
    })
    before = FineTuneJobStatus(checkpoints=[CheckpointRef(step=s, uri=f"s3://o/ckpt/{s}/") for s in (200, 300, 400)])
    status = compute_status(make_job().typed(), observed(RUNNING, (make_pod().running(),)), NOW, before, report)
    assert status.progress is not None
    progress = status.progress
    assert (progress.step, progress.percent, progress.updated_at) == (600, 30, "2026-11-21T12:00:00Z")
    assert [c.step for c in status.checkpoints] == [300, 400, 500], "newest last, pruned to keepCheckpoints"
    assert [s.uri for s in status.samples] == ["s3://o/s/500-0.png"]


def test_outputs_come_from_the_termination_message() -> None:
    result = parse_result('{"outputs": {"uri": "s3://o/final/", "lora": {"diffusers": "s3://o/final/w.safetensors"}},'
                          ' "step": 100, "totalSteps": 100}')
    status = compute_status(make_job().typed(), observed(make_batch_job().complete()), NOW, previous("Running"),
                            None, result)
    assert status.outputs is not None and status.outputs.lora is not None
    assert status.outputs.lora.diffusers == "s3://o/final/w.safetensors"
    assert status.progress is not None and status.progress.percent == 100
    assert status.message == "training finished; outputs at s3://o/final/"
    assert status.completion_time == "2026-11-21T11:50:00Z"


def test_times_workers_and_generation() -> None:
    job = make_job().set("metadata.generation", 4).typed()
    status = compute_status(job, observed(make_batch_job().active(2, ready=1)), NOW)
    assert (status.start_time, status.completion_time, status.observed_generation) == ("2026-11-21T11:00:00Z", None, 4)
    assert status.workers is not None and (status.workers.active, status.workers.ready) == (2, 1)


def test_config_error_message_carries_the_trainers_words() -> None:
    pod = make_pod().failed(78, '{"phase": "Failed", "exitCode": 78, "reason": "ConfigError", '
                                '"message": "model.uri: no model_index.json under s3://models/sd15/"}')
    status = compute_status(make_job().typed(), observed(make_batch_job().failed("PodFailurePolicy"), (pod,)), NOW,
                            None, None, parse_result(pod.obj()["status"]["containerStatuses"][0]["state"]
                                                     ["terminated"]["message"]))
    assert "no model_index.json" in status.message


def test_invalid_spec_names_the_field() -> None:
    status = invalid_status(["spec.training.maxSteps: set exactly one of maxSteps and epochs"], 2, NOW)
    assert status.phase == "Failed" and status.observed_generation == 2
    failed = cond.find(status.conditions, "Failed")
    assert failed is not None and failed.reason == "InvalidSpec" and "spec.training.maxSteps" in failed.message
    assert _types(status)["Created"][0] == "False"


@pytest.mark.parametrize(("old", "new", "keep", "steps"), [
    ((), (1, 2), 3, [1, 2]),
    ((1, 2, 3), (4,), 3, [2, 3, 4]),
    ((5,), (3,), 3, [3, 5]),
    ((1, 2), (), 1, [2]),
])
def test_merge_checkpoints(old: tuple[int, ...], new: tuple[int, ...], keep: int, steps: list[int]) -> None:
    refs = [CheckpointRef(step=s, uri=f"u{s}") for s in old]
    merged = merge_checkpoints(refs, tuple(CheckpointRef(step=s, uri=f"u{s}") for s in new), keep)
    assert [c.step for c in merged] == steps


def test_s3_keys_fixture_matches_what_status_requires() -> None:
    from kubetune.operator.status import S3_KEYS as REQUIRED

    assert frozenset(REQUIRED) == S3_KEYS


def test_unchecked_secret_does_not_hold_the_job_back() -> None:
    """Without permission to read Secrets, a missing one is left for the pods to report."""
    from kubetune.operator.observed import Observed
    from kubetune.operator.status import secret_view
    from tests.operator.ftj_builders import make_job

    job = make_job("a").secret().typed()
    assert secret_view(job, Observed(secret_keys=None, secret_checked=False)) is None
    assert secret_view(job, Observed(secret_keys=None)) is not None


def test_an_early_stop_is_the_reason_of_success() -> None:
    message = "stopped early at step 20 of 40: validation loss has not improved (training.earlyStopping)"
    result = parse_result(f'{{"phase": "Succeeded", "reason": "EarlyStopped", "message": "{message}", '
                          f'"outputs": {{"uri": "s3://out/corgi/final/"}}}}')
    seen = observed(make_batch_job().complete(), (make_pod().succeeded(),))
    status = compute_status(make_job().typed(), seen, NOW, previous("Running"), None, result)
    succeeded = next(c for c in status.conditions if c.type == "Succeeded")
    assert (status.phase, succeeded.status, succeeded.reason) == ("Succeeded", "True", "EarlyStopped")
    assert message in status.message and "s3://out/corgi/final/" in status.message
    plain = compute_status(make_job().typed(), seen, NOW, previous("Running"), None,
                           parse_result('{"phase": "Succeeded", "reason": "Completed", "message": "done"}'))
    assert primary_reason(plain) == "Succeeded"


def test_skipped_images_become_status_data_and_a_condition() -> None:
    data = {"images": 118, "skipped": 7, "maxSkipped": 10,
            "skippedFiles": [{"file": f"img-{i}.jpg", "reason": "truncated image"} for i in range(6)]}
    report = parse_progress({"stage": "training", "step": 3, "totalSteps": 10, "data": data})
    assert report is not None and report.progress is not None and report.progress.step == 3
    status = compute_status(make_job().typed(), observed(RUNNING, (make_pod().running(),)), NOW, previous("Running"),
                            report)
    assert status.data is not None and status.data.skipped == 7
    skipped = cond.find(status.conditions, "DataSkipped")
    assert skipped is not None and skipped.status == "True" and skipped.reason == "ImagesSkipped"
    assert skipped.message.startswith("7 of 125 image(s) skipped (spec.data.maxSkipped is 10): img-0.jpg")
    assert "img-4.jpg (truncated image) and 2 more" in skipped.message and "img-5" not in skipped.message
    from kubetune.operator.events import events_for_transition
    assert "ImagesSkipped" in [e.reason for e in events_for_transition(previous("Running"), status)]
    later = compute_status(make_job().typed(), observed(RUNNING, (make_pod().running(),)), NOW, status, None)
    assert later.data == status.data  # kept between reads


def test_no_skipped_images_is_a_false_condition_and_a_failed_run_reports_its_data() -> None:
    result = parse_result('{"phase": "Failed", "exitCode": 78, "reason": "InvalidConfiguration", '
                          '"message": "3 images skipped", "data": {"images": 2, "skipped": 3, "maxSkipped": 0, '
                          '"skippedFiles": [{"file": "a.png", "reason": "not an image"}]}}')
    assert result is not None and result.progress is not None and result.progress.data is not None
    assert result.progress.data.skipped_files[0].file == "a.png"
    clean = parse_progress({"stage": "training", "data": {"images": 5, "skipped": 0}})
    status = compute_status(make_job().typed(), observed(RUNNING, (make_pod().running(),)), NOW, previous("Running"),
                            clean)
    skipped = cond.find(status.conditions, "DataSkipped")
    assert skipped is not None and skipped.status == "False" and skipped.message == "all 5 image(s) are used"


def test_a_hostile_data_report_is_cut_to_size() -> None:
    data = {"images": 1, "skipped": 5000, "maxSkipped": 0,
            "skippedFiles": [{"file": "x" * 5000, "reason": "y" * 5000} for _ in range(5000)]}
    status = compute_status(make_job().typed(), observed(RUNNING, (make_pod().running(),)), NOW, previous("Running"),
                            parse_progress({"stage": "training", "data": data}))
    assert status.data is not None and status.data.skipped == 5000 and len(status.data.skipped_files) == 10
    assert len(status.data.skipped_files[0].file) == 300 and len(status.data.skipped_files[0].reason) == 300


def test_a_termination_message_nested_past_the_parser_is_plain_text() -> None:
    nested = "[" * 100_000
    result = parse_result(nested)
    assert result is not None and result.error == nested


def test_a_queued_job_that_kueue_admits_says_admitted_and_keeps_saying_it() -> None:
    job = make_job().queue("gpus").typed()
    queued = compute_status(job, observed(make_batch_job().suspended()), NOW, None)
    assert _types(queued)["Suspended"] == ("True", "Queued") and "LocalQueue gpus" in queued.message
    admitted = compute_status(job, observed(RUNNING, (make_pod().running(),)), NOW + timedelta(minutes=1), queued)
    suspended = cond_of(admitted, "Suspended")
    assert (suspended.status, suspended.reason, suspended.message) == ("False", "Admitted",
                                                                      "admitted by Kueue LocalQueue gpus")
    assert suspended.last_transition_time != cond_of(queued, "Suspended").last_transition_time
    done = compute_status(job, observed(make_batch_job().complete()), NOW + timedelta(minutes=9), admitted)
    assert done.phase == "Succeeded" and _types(done)["Suspended"] == ("False", "Admitted")
    unqueued = compute_status(make_job().typed(), observed(RUNNING, (make_pod().running(),)), NOW, None)
    assert _types(unqueued)["Suspended"] == ("False", "NotStarted"), "no queue, no word of Kueue"


def cond_of(status: FineTuneJobStatus, type_: str) -> Any:
    return next(c for c in status.conditions if c.type == type_)
