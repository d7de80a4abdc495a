"""The trainer's report (`kubetune.api.report`) is one contract: what the trainer writes at `/progress` and in
its termination message is what the operator reads, and a garbled section costs only that section."""

from __future__ import annotations

import json

import pytest

from kubetune.api.report import TrainerProgress, TrainerResult
from kubetune.api.status import CheckpointRef, DataReport, LoraOutputs, Outputs, SampleRef, SkippedFile
from kubetune.operator.reports import parse_progress, parse_result, validate_sections
from kubetune_trainer.job import RunResult, termination_message
from kubetune_trainer.reporting import ProgressState

CHECKPOINT = CheckpointRef(step=4, uri="s3://o/checkpoints/step-4/", created_at="2026-11-21T11:00:00Z")
SAMPLE = SampleRef(step=4, prompt="a corgi", uri="s3://o/samples/step-4-0-0.png")


def _trained() -> ProgressState:
    progress = ProgressState()
    progress.phase("Training")
    progress.data(DataReport(images=9, skipped=1, max_skipped=2,
                             skipped_files=[SkippedFile(file="a.png", reason="not an image")]))
    progress.started(0, 8)
    progress.step(4, 0.25, 8, 2.0, epoch=2)
    progress.loss_terms(4, {"instance": 0.2, "prior": 0.05})
    progress.validation(4, 0.125)
    progress.checkpoints([CHECKPOINT], 0.5)
    progress.sample(SAMPLE)
    progress.outputs(Outputs(report="s3://o/report/index.html"))
    return progress


def test_progress_is_served_in_the_reports_own_field_names() -> None:
    served = json.loads(json.dumps(_trained().snapshot()))
    assert list(served) == [field.alias for field in TrainerProgress.model_fields.values()]
    assert TrainerProgress.model_validate(served) == _trained().report()
    assert served["outputs"] == {"report": "s3://o/report/index.html"}, "outputs name only what was written"


def test_the_operator_reads_what_the_trainer_serves() -> None:
    reading = parse_progress(json.loads(json.dumps(_trained().snapshot())))
    assert reading is not None and reading.stage == "training"
    assert reading.progress is not None
    assert (reading.progress.step, reading.progress.total_steps, reading.progress.percent) == (4, 8, 50)
    assert (reading.progress.step_loss, reading.progress.validation_loss, reading.progress.epoch) == (0.25, 0.125, 2)
    assert reading.checkpoints == (CHECKPOINT,) and reading.samples == (SAMPLE,)
    assert reading.data is not None and reading.data.skipped_files[0].file == "a.png"
    assert reading.report == "s3://o/report/index.html"


def test_the_operator_reads_the_trainers_termination_message() -> None:
    progress = _trained()
    progress.phase("Succeeded")
    progress.outputs(Outputs(uri="s3://o/final/", lora=LoraOutputs(kohya="s3://o/final/k.safetensors"), step=4,
                             reason="LastStep"))
    result = RunResult("Succeeded", 0, "EarlyStopped", "stopped early at step 4 of 8", progress.snapshot())
    message = termination_message(result)
    assert TrainerResult.model_validate_json(message) == result.report()
    read = parse_result(message)
    assert read is not None and read.error is None and read.early_stop == "stopped early at step 4 of 8"
    assert read.outputs == progress.report().outputs
    assert read.progress is not None and read.progress.stage == "done" and read.progress.checkpoints == (CHECKPOINT,)


def test_a_failed_result_is_the_error_with_its_reason() -> None:
    read = parse_result(termination_message(RunResult("Failed", 78, "ConfigError", "model.uri: nothing there")))
    assert read is not None and read.error == "ConfigError: model.uri: nothing there"


@pytest.mark.parametrize(("doc", "kept"), [
    ({"phase": "Training", "step": "many", "totalSteps": 8}, {"phase": "Training", "step": None, "total_steps": 8}),
    ({"step": 3, "checkpoints": [{"step": 1, "uri": "u1"}, {"uri": "no step"}, {"step": 2, "uri": "u2"}]},
     {"step": 3, "checkpoints": [CheckpointRef(step=1, uri="u1"), CheckpointRef(step=2, uri="u2")]}),
    ({"step": 3, "checkpoints": "not a list", "data": {"images": "many"}}, {"step": 3, "checkpoints": [],
                                                                             "data": None}),
    ({"stage": "training", "outputs": {"lora": 5}}, {"phase": "training", "outputs": None}),
    ({"total_steps": "x", "step": 2, "stage": 5}, {"step": 2, "total_steps": None, "phase": None}),  # snake_case too
])
def test_a_section_that_does_not_validate_is_left_out(doc: dict[str, object], kept: dict[str, object]) -> None:
    report = validate_sections(TrainerProgress, doc)
    assert report is not None
    assert {name: getattr(report, name) for name in kept} == kept


@pytest.mark.parametrize("doc", [None, [1, 2], "text", 5])
def test_only_an_object_is_a_report(doc: object) -> None:
    assert validate_sections(TrainerProgress, doc) is None
