"""Progress JSON, the termination message size limit, and Prometheus exposition (checked by promtool)."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import pytest

from kubetune.api.status import CheckpointRef, DataReport, SkippedFile
from kubetune_trainer.job import RunResult, termination_message
from kubetune_trainer.metrics import PrometheusMetrics
from kubetune_trainer.reporting import REPORTED_SKIPPED_FILES, LogLines, ProgressBar, ProgressState, console_reporter
from kubetune_trainer.storage.staging import StagingReport
from tests.tools import needs_tools

needs_promtool = needs_tools("promtool")


def _feed(reporter: object) -> None:
    reporter.staged("data", StagingReport(Path("/x"), files=3, downloaded=3, bytes_downloaded=1234, seconds=0.5))
    reporter.started(0, 10)
    reporter.step(1, 0.25, 8, 2.0)
    ref = CheckpointRef(step=1, uri="s3://b/out/checkpoints/step-1/", created_at="2026-01-01T00:00:00Z")
    reporter.checkpoints([ref], 0.3)


def test_progress_state_reports_step_rate_eta_and_checkpoints() -> None:
    progress = ProgressState()
    _feed(progress)
    snap = progress.snapshot()
    assert (snap["step"], snap["totalSteps"], snap["imagesPerSecond"], snap["etaSeconds"]) == (1, 10, 4.0, 18)
    assert snap["checkpoints"] == [{"step": 1, "uri": "s3://b/out/checkpoints/step-1/",
                                    "createdAt": "2026-01-01T00:00:00Z"}]


def test_metrics_use_only_namespace_and_name_labels() -> None:
    metrics = PrometheusMetrics("team-a", "corgi")
    _feed(metrics)
    text = metrics.exposition().decode()
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples and all(line.startswith("kubetune_trainer_") for line in samples)
    label_sets = {frozenset(re.findall(r'(\w+)="', line)) - {"le"} for line in samples}
    assert label_sets == {frozenset({"namespace", "name"})}
    assert "kubetune_trainer_staged_bytes_total" in text and "kubetune_trainer_step_loss{" in text


@needs_promtool
def test_metrics_pass_promtool_check() -> None:
    metrics = PrometheusMetrics("team-a", "corgi")
    _feed(metrics)
    done = subprocess.run(["promtool", "check", "metrics"], input=metrics.exposition(), capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_termination_message_stays_under_4096_bytes() -> None:
    checkpoints = [{"step": i, "uri": f"s3://bucket/very/long/prefix/checkpoints/step-{i}/",
                    "createdAt": "2026-01-01T00:00:00Z"} for i in range(200)]
    result = RunResult("Failed", 1, "TrainingFailed", "ü" * 10000, {"checkpoints": checkpoints, "step": 7})
    text = termination_message(result)
    assert len(text.encode()) <= 4096
    assert json.loads(text)["step"] == 7


def test_loss_terms_reach_progress_and_a_term_labelled_gauge() -> None:
    progress, metrics = ProgressState(), PrometheusMetrics("team-a", "corgi")
    for reporter in (progress, metrics):
        _feed(reporter)
        reporter.loss_terms(1, {})  # one-term methods: nothing changes
    assert progress.snapshot()["lossTerms"] is None
    assert "kubetune_trainer_loss_term{" not in metrics.exposition().decode()
    for reporter in (progress, metrics):
        reporter.loss_terms(2, {"instance": 0.25, "prior": 0.125})
    assert progress.snapshot()["lossTerms"] == {"instance": 0.25, "prior": 0.125}
    text = metrics.exposition().decode()
    assert 'kubetune_trainer_loss_term{name="corgi",namespace="team-a",term="prior"} 0.125' in text


@needs_promtool
def test_metrics_with_loss_terms_pass_promtool_check() -> None:
    metrics = PrometheusMetrics("team-a", "corgi")
    _feed(metrics)
    metrics.loss_terms(1, {"instance": 0.25, "prior": 0.125})
    done = subprocess.run(["promtool", "check", "metrics"], input=metrics.exposition(), capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def _data_report(skipped: int, name_length: int = 20) -> DataReport:
    files = [SkippedFile(file=f"{i:04d}-{'x' * name_length}.jpg", reason="truncated image") for i in range(skipped)]
    return DataReport(images=100, skipped=skipped, max_skipped=skipped, skipped_files=files)


def test_progress_carries_the_data_block_with_the_first_few_skipped_files() -> None:
    progress = ProgressState()
    assert progress.snapshot()["data"] is None
    progress.data(_data_report(25))
    data = progress.snapshot()["data"]
    assert set(data) == {"images", "skipped", "maxSkipped", "skippedFiles"}
    assert (data["images"], data["skipped"], data["maxSkipped"]) == (100, 25, 25)
    assert [f["file"][:4] for f in data["skippedFiles"]] == [f"{i:04d}" for i in range(REPORTED_SKIPPED_FILES)]
    assert DataReport.model_validate(data).skipped_files[0].reason == "truncated image"


def test_termination_message_keeps_the_counts_and_drops_the_last_skipped_names_first() -> None:
    progress = ProgressState()
    progress.data(_data_report(25, name_length=600))
    checkpoints = [{"step": 1, "uri": "s3://b/out/checkpoints/step-1/", "createdAt": "2026-01-01T00:00:00Z"}]
    result = RunResult("Failed", 78, "TooManySkippedImages", "m" * 500, {**progress.snapshot(),
                                                                         "checkpoints": checkpoints})
    text = termination_message(result)
    body = json.loads(text)
    assert len(text.encode()) <= 4096
    assert (body["data"]["skipped"], body["data"]["maxSkipped"]) == (25, 25)
    assert 1 <= len(body["data"]["skippedFiles"]) < REPORTED_SKIPPED_FILES
    assert body["data"]["skippedFiles"][0]["file"].startswith("0000-")
    assert body["checkpoints"] == checkpoints and body["message"] == "m" * 500
    assert len(result.as_dict()["data"]["skippedFiles"]) == REPORTED_SKIPPED_FILES  # the status file keeps them


def test_log_lines_name_every_skipped_file() -> None:
    stream = io.StringIO()
    LogLines(stream=stream).data(_data_report(25))
    lines = [line.split(" ", 2)[2] for line in stream.getvalue().splitlines()]
    assert lines[0] == "data: 100 images, 25 skipped (data.maxSkipped 25)"
    assert lines[1:] == [f"skipped {i:04d}-{'x' * 20}.jpg: truncated image" for i in range(25)]


def test_progress_names_the_step_loss_and_its_smoothed_average() -> None:
    progress = ProgressState()
    progress.started(0, 10)
    progress.step(1, 1.0, 8, 2.0)
    progress.step(2, 0.0, 8, 2.0)
    snap = progress.snapshot()
    assert (snap["stepLoss"], snap["smoothedLoss"], snap["validationLoss"]) == (0.0, 0.9, None)
    assert "loss" not in snap and RunResult("Succeeded", 0, progress=snap).as_dict()["smoothedLoss"] == 0.9


def _samples(metrics: PrometheusMetrics) -> set[str]:
    return {line.split("{")[0] for line in metrics.exposition().decode().splitlines() if not line.startswith("#")}


def test_a_gauge_has_no_sample_until_it_has_a_value_and_no_created_series_appear() -> None:
    import torch

    metrics = PrometheusMetrics("team-a", "corgi")
    gauges = {"kubetune_trainer_step", "kubetune_trainer_total_steps", "kubetune_trainer_step_loss",
              "kubetune_trainer_smoothed_loss", "kubetune_trainer_validation_loss",
              "kubetune_trainer_images_per_second"}
    assert not gauges & _samples(metrics)
    assert "kubetune_trainer_images_total" in _samples(metrics)  # a counter at 0 is true from the start
    _feed(metrics)
    metrics.step(2, 0.0, 8, 2.0)
    assert gauges - _samples(metrics) == {"kubetune_trainer_validation_loss"}  # no validation yet: no sample
    assert ("kubetune_trainer_gpu_memory_allocated_bytes" in _samples(metrics)) == torch.cuda.is_available()
    metrics.validation(2, 0.5)
    text = metrics.exposition().decode()
    assert 'kubetune_trainer_validation_loss{name="corgi",namespace="team-a"} 0.5' in text
    assert 'kubetune_trainer_step_loss{name="corgi",namespace="team-a"} 0.0' in text
    assert 'kubetune_trainer_smoothed_loss{name="corgi",namespace="team-a"} 0.225' in text  # 0.9 x 0.25
    assert "_created" not in text


class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _logged_steps(total: int, seconds_per_step: float, start: int = 0, steps: bool = True) -> list[int]:
    """The steps LogLines writes a line for, over a run from `start` to `total`."""
    clock, stream = FakeClock(), io.StringIO()
    log = LogLines(stream=stream, steps=steps, clock=clock)
    log.started(start, total)
    for step in range(start + 1, total + 1):
        clock.now += seconds_per_step
        log.step(step, 0.5, 4, seconds_per_step)
    return [int(m) for m in re.findall(r" step (\d+)/\d+ \(", stream.getvalue())]


LOG_RULE = [
    ("fast: every 5% of the steps, 20 lines", 1000, 0.01, 0, list(range(50, 1001, 50))),
    ("slow: every 30 s between the 5% marks", 100, 12.0, 0, [s for s in range(1, 101) if s % 5 in (0, 3)]),
    ("exactly 30 s apart", 1000, 30.0, 0, list(range(1, 1001))),
    ("resumed at step 40 of 100", 100, 0.01, 40, list(range(45, 101, 5))),
    ("fewer than 20 steps: every step", 7, 0.01, 0, list(range(1, 8))),
]


@pytest.mark.parametrize(("case", "total", "seconds", "start", "expected"), LOG_RULE, ids=[r[0] for r in LOG_RULE])
def test_log_lines_come_every_30_seconds_and_at_every_5_percent(case: str, total: int, seconds: float, start: int,
                                                                expected: list[int]) -> None:
    assert _logged_steps(total, seconds, start) == expected


def test_log_lines_without_step_lines_still_say_the_rest() -> None:
    assert _logged_steps(100, 60.0, steps=False) == []
    stream = io.StringIO()
    log = LogLines(stream=stream, steps=False)
    log.started(0, 10)
    log.validation(5, 0.25)
    assert [line.split(" ", 2)[2] for line in stream.getvalue().splitlines()] == [
        "training from step 0 to 10", "step 5 validation loss 0.2500"]


def test_the_log_line_names_both_losses() -> None:
    stream = io.StringIO()
    log = LogLines(stream=stream)
    log.started(0, 2)
    log.step(1, 1.0, 8, 2.0)
    log.step(2, 0.0, 8, 2.0)
    lines = [line.split(" ", 2)[2] for line in stream.getvalue().splitlines()]
    assert lines[1:] == ["step 1/2 (50%) step loss 1.0000 smoothed loss 1.0000 4.00 img/s",
                         "step 2/2 (100%) step loss 0.0000 smoothed loss 0.9000 4.00 img/s"]


def test_without_a_terminal_the_console_gets_log_lines_not_a_bar(capsys: pytest.CaptureFixture[str]) -> None:
    assert isinstance(console_reporter(progress_bar=True), LogLines)  # pytest's captured stderr is no terminal
    assert isinstance(console_reporter(progress_bar=False), LogLines)


def test_the_bar_names_both_losses(capsys: pytest.CaptureFixture[str]) -> None:
    bar = ProgressBar()
    bar.started(0, 2)
    bar.step(1, 1.0, 8, 2.0)
    bar.step(2, 0.0, 8, 2.0)
    bar.close()
    assert "step loss 0.0000 smoothed loss 0.9000" in capsys.readouterr().err
