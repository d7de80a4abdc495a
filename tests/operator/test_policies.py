"""Actions, events, reports and deadlines: the decisions around the status, table-driven."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from ftj_builders import NOW, make_batch_job, make_job, make_pod, observed

from kubetune.api.status import CheckpointRef, FineTuneJobStatus
from kubetune.operator.actions import (
    CreateChild,
    DeleteJob,
    ReplaceConfigMapData,
    SetJobSuspend,
    plan_actions,
)
from kubetune.operator.events import Event, events_for_transition
from kubetune.operator.observed import Observed
from kubetune.operator.render import render_configmap
from kubetune.operator.reports import parse_progress, parse_result
from kubetune.operator.restart import remaining_deadline
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import compute_status

SETTINGS = OperatorSettings(restart_backoff_seconds=0.0)  # back-off has its own tests (test_backoff.py)


def _describe(action: Any) -> str:
    if isinstance(action, CreateChild):
        return f"create {action.obj['kind']}"
    if isinstance(action, SetJobSuspend):
        return f"suspend={action.suspend}"
    return type(action).__name__


def _plan(job: Any, seen: Observed, before: FineTuneJobStatus | None = None, now: Any = NOW) -> list[str]:
    """The plan, with an existing ConfigMap already up to date (tested on its own below)."""
    typed = job.typed()
    if seen.configmap is not None:
        seen = dataclasses.replace(seen, configmap=render_configmap(typed))
    status = compute_status(typed, seen, now, before)
    return [_describe(a) for a in plan_actions(typed, seen, status, SETTINGS, now)]


def _status(phase: str, completed: str | None = None, restarts: int = 0) -> FineTuneJobStatus:
    return FineTuneJobStatus(phase=phase, completion_time=completed, restarts=restarts)


ACTIONS: list[tuple[str, Any, Observed, FineTuneJobStatus | None, list[str]]] = [
    ("fresh job", make_job(), observed(children=False), None, ["create ConfigMap", "create Service", "create Job"]),
    ("only the Job missing", make_job(), observed(), None, ["create Job"]),
    ("secret missing: wait", make_job().secret(), observed(secret_keys=None, children=False), None, []),
    ("running: nothing", make_job(), observed(make_batch_job().active(1), (make_pod().running(),)), None, []),
    ("failed with retries: delete", make_job(), observed(make_batch_job().failed(), (make_pod().failed(),)), None,
     ["DeleteJob"]),
    ("node lost: delete", make_job(), observed(make_batch_job().failed(), (make_pod().failed().disrupted(),)), None,
     ["DeleteJob"]),
    ("retries exhausted: keep for inspection", make_job().backoff_limit(0),
     observed(make_batch_job().failed(), (make_pod().failed(),)), None, []),
    ("config error: keep", make_job(), observed(make_batch_job().failed("PodFailurePolicy"),
                                                (make_pod().failed(78),)), None, []),
    ("deleting: wait", make_job(), observed(make_batch_job().failed().deleting()), _status("Restarting", restarts=1),
     []),
    ("old Job gone: new attempt", make_job(), observed(), _status("Restarting", restarts=1), ["create Job"]),
    ("user suspends", make_job().suspended(), observed(make_batch_job().active(1)), None, ["suspend=True"]),
    ("user resumes", make_job(), observed(make_batch_job().suspended()), _status("Suspended"), ["suspend=False"]),
    ("Kueue decides when to resume", make_job().queue("gpus"), observed(make_batch_job().suspended()), None, []),
    ("succeeded: nothing", make_job().ttl(600), observed(make_batch_job().complete()),
     _status("Succeeded", "2026-11-21T11:55:00Z"), []),
    ("succeeded, TTL passed", make_job().ttl(60), observed(make_batch_job().complete()),
     _status("Succeeded", "2026-11-21T11:55:00Z"), ["DeleteFineTuneJob"]),
    ("failed, no TTL", make_job(), observed(), _status("Failed", "2026-11-01T00:00:00Z"), []),
]


@pytest.mark.parametrize(("case", "job", "seen", "before", "expected"), ACTIONS, ids=[a[0] for a in ACTIONS])
def test_plan_actions(case: str, job: Any, seen: Observed, before: FineTuneJobStatus | None,
                      expected: list[str]) -> None:
    assert _plan(job, seen, before) == expected


def test_new_attempt_carries_restarts_and_what_is_left_of_the_deadline() -> None:
    job = make_job().deadline(3600).typed()
    before = FineTuneJobStatus(phase="Restarting", restarts=2, start_time="2026-11-21T11:00:00Z")
    seen = dataclasses.replace(observed(), configmap=render_configmap(job))
    (create,) = plan_actions(job, seen, compute_status(job, seen, NOW, before), SETTINGS, NOW)
    assert isinstance(create, CreateChild)
    assert create.obj["metadata"]["annotations"]["kubetune.io/restarts"] == "2"
    assert create.obj["spec"]["activeDeadlineSeconds"] == 1


def test_delete_targets_the_failed_job_by_uid() -> None:
    job, seen = make_job().typed(), observed(make_batch_job().failed(), (make_pod().failed(),))
    seen = dataclasses.replace(seen, configmap=render_configmap(job))
    (delete,) = plan_actions(job, seen, compute_status(job, seen, NOW), SETTINGS, NOW)
    assert delete == DeleteJob("corgi", "batch-uid-1")


def test_changed_spec_replaces_the_configmap_data() -> None:
    job = make_job().typed()
    seen = observed(make_batch_job().active(1))
    (replace,) = plan_actions(job, seen, compute_status(job, seen, NOW), SETTINGS, NOW)
    assert isinstance(replace, ReplaceConfigMapData) and replace.name == "corgi-config"


@pytest.mark.parametrize(("limit", "started", "expected"), [
    (None, "2026-11-21T11:00:00Z", None),
    (3600, None, 3600),
    (7200, "2026-11-21T11:00:00Z", 3600),
    (60, "2026-11-21T11:00:00Z", 1),
])
def test_remaining_deadline(limit: int | None, started: str | None, expected: int | None) -> None:
    job = make_job().set("spec.runPolicy.activeDeadlineSeconds", limit).typed()
    assert remaining_deadline(job, started, NOW) == expected


def _events(before: FineTuneJobStatus | None, job: Any, seen: Observed, report: Any = None) -> list[Event]:
    after = compute_status(job.typed(), seen, NOW + timedelta(seconds=10), before, report)
    return events_for_transition(before, after)


TRAINING = parse_progress({"stage": "training", "step": 5})


def test_events_follow_transitions_once() -> None:
    job = make_job()
    pending = compute_status(job.typed(), observed(), NOW)
    assert events_for_transition(None, pending) == [Event("Normal", "Creating",
                                                          "creating the ConfigMap, Service and Job")]
    seen = observed(make_batch_job().active(1), (make_pod().running(),))
    running = compute_status(job.typed(), seen, NOW, pending, TRAINING)
    assert [(e.type, e.reason) for e in events_for_transition(pending, running)] == [
        ("Normal", "ChildrenCreated"), ("Normal", "Training")]
    again = compute_status(job.typed(), seen, NOW, running, TRAINING)
    assert events_for_transition(running, again) == []


@pytest.mark.parametrize(("case", "before", "job", "seen", "expected"), [
    ("restart is a warning", "Running", make_job(), observed(make_batch_job().failed(), (make_pod().failed(),)),
     [("Warning", "Restarting")]),
    ("unschedulable is a warning", None, make_job(), observed(make_batch_job().active(1),
                                                              (make_pod().unschedulable(),)),
     [("Normal", "ChildrenCreated"), ("Warning", "Unschedulable")]),
    ("missing secret is a warning", None, make_job().secret(), observed(secret_keys=None),
     [("Warning", "SecretNotFound")]),
    ("success is normal", "Running", make_job(), observed(make_batch_job().complete()), [("Normal", "Succeeded")]),
])
def test_event_types(case: str, before: str | None, job: Any, seen: Observed, expected: list[tuple[str, str]]) -> None:
    old = None
    if before is not None:
        old = compute_status(job.typed(), observed(make_batch_job().active(1), (make_pod().running(),)), NOW, None,
                             TRAINING)
    assert [(e.type, e.reason) for e in _events(old, job, seen)] == expected


def test_new_checkpoint_is_an_event() -> None:
    old = FineTuneJobStatus(phase="Running", checkpoints=[CheckpointRef(step=1, uri="u1")])
    new = old.model_copy(update={"checkpoints": [CheckpointRef(step=1, uri="u1"), CheckpointRef(step=2, uri="u2")]})
    assert events_for_transition(old, new) == [Event("Normal", "CheckpointSaved", "checkpoint at step 2: u2")]


@pytest.mark.parametrize(("doc", "stage", "step", "percent"), [
    ({"stage": "training", "step": 50, "totalSteps": 200}, "training", 50, 25),
    ({"step": 50, "total_steps": 200, "images_per_second": 3.5}, None, 50, 25),
    ({"stage": "bogus", "step": 1}, None, 1, None),
    ({"step": "many"}, None, None, None),
])
def test_parse_progress(doc: dict[str, Any], stage: str | None, step: int | None, percent: int | None) -> None:
    report = parse_progress(doc)
    assert report is not None and report.stage == stage
    got = report.progress
    assert (got.step if got else None, got.percent if got else None) == (step, percent)


@pytest.mark.parametrize(("message", "error", "has_outputs"), [
    (None, None, False),
    ("", None, False),
    ("Traceback ...\nCUDA out of memory", "Traceback ...\nCUDA out of memory", False),
    ('{"phase": "Failed", "reason": "BadData", "message": "bad data"}', "BadData: bad data", False),
    ('{"outputs": {"uri": "s3://o/final/"}}', None, True),
    ("[1, 2]", "[1, 2]", False),
])
def test_parse_result(message: str | None, error: str | None, has_outputs: bool) -> None:
    result = parse_result(message)
    assert (result.error if result else None) == error
    assert (result is not None and result.outputs is not None) == has_outputs


def test_parse_progress_rejects_non_objects() -> None:
    assert parse_progress([1]) is None
    assert parse_progress(None) is None


TRAINER_PROGRESS = [
    ({"phase": "Starting", "step": 0, "totalSteps": None, "checkpoints": [], "samples": [], "outputs": None},
     "staging"),
    ({"phase": "Staging", "step": 0}, "staging"),
    ({"phase": "Resuming", "step": 500, "totalSteps": 2000}, "staging"),
    ({"phase": "Training", "step": 600, "totalSteps": 2000, "smoothedLoss": 0.1}, "training"),
    ({"phase": "Exporting", "step": 2000, "totalSteps": 2000}, "saving"),
]


@pytest.mark.parametrize(("doc", "stage"), TRAINER_PROGRESS, ids=[d["phase"] for d, _ in TRAINER_PROGRESS])
def test_trainer_progress_phases_map_to_stages(doc: dict[str, Any], stage: str) -> None:
    report = parse_progress(doc)
    assert report is not None and report.stage == stage


def test_trainer_termination_message_shape() -> None:
    failed = parse_result('{"phase": "Failed", "exitCode": 78, "reason": "ConfigError", "message": '
                          '"model.uri: no model_index.json", "step": 0, "totalSteps": null, "stepLoss": null, '
                          '"checkpoints": [], "samples": [], "outputs": null}')
    assert failed is not None and failed.error == "ConfigError: model.uri: no model_index.json"
    done = parse_result('{"phase": "Succeeded", "exitCode": 0, "reason": "Completed", "message": "training finished",'
                        ' "step": 100, "totalSteps": 100, "smoothedLoss": 0.05, "checkpoints": [{"step": 100, "uri": '
                        '"s3://o/checkpoints/step-100/", "createdAt": "2026-11-21T11:00:00Z"}], "samples": [],'
                        ' "outputs": {"uri": "s3://o/final/", "lora": {"kohya": "s3://o/final/x.safetensors"}}}')
    assert done is not None and done.error is None and done.progress is not None
    assert done.progress.progress is not None and done.progress.progress.percent == 100
    assert [c.created_at for c in done.progress.checkpoints] == ["2026-11-21T11:00:00Z"]
    assert done.outputs is not None and done.outputs.lora is not None and done.outputs.lora.kohya


def test_trainer_and_operator_agree_on_the_config_error_exit_code() -> None:
    from kubetune.api.exitcodes import CONFIG_ERROR_EXIT_CODE
    from kubetune_trainer import exitcodes as trainer_exitcodes

    assert trainer_exitcodes.EXIT_CONFIG == CONFIG_ERROR_EXIT_CODE
