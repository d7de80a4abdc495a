"""The training report (`report/` under the output): files, one SVG marker per logged point, no secrets.

The page itself in a real browser is tests/trainer/test_report_browser.py; here the files are
read as text and parsed with the standard library's HTML parser.
"""

from __future__ import annotations

import json
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from trainer_probe import running_trainers
from trainer_support import local_job

from kubetune.api.status import DataReport, Outputs, SampleRef, SkippedFile
from kubetune_trainer import report_render as render
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job
from kubetune_trainer.parts import StepRecord
from kubetune_trainer.report import ReportWriter, resolved_spec
from kubetune_trainer.reporting import ProgressState, Reporters
from kubetune_trainer.storage.local import LocalStore
from kubetune_trainer.storage.staging import StagingReport


class PageParts(HTMLParser):
    """Markers (`<use>`) inside each `<g id="series-...">`, every src/href, the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.markers: dict[str, int] = {}
        self.links: list[str] = []
        self.tags: list[str] = []
        self.images = 0
        self._open: list[str | None] = []  # the series each open <g> belongs to

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, dict(attrs), closes=False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, dict(attrs), closes=True)

    def _tag(self, tag: str, attrs: dict[str, str | None], closes: bool) -> None:
        self.tags.append(tag)
        self.links += [v or "" for k, v in attrs.items() if k in ("src", "href", "xlink:href")]
        self.images += tag == "img"
        series = next((s for s in self._open if s), None)
        if tag == "use" and series:
            self.markers[series] = self.markers.get(series, 0) + 1
        if tag == "g" and not closes:
            gid = attrs.get("id") or ""
            self._open.append(gid if gid.startswith("series-") else None)

    def handle_endtag(self, tag: str) -> None:
        if tag == "g" and self._open:
            self._open.pop()


def parse_page(path: Path) -> PageParts:
    parts = PageParts()
    parts.feed(path.read_text(encoding="utf-8"))
    return parts


def history_of(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]


def step_record(step: int, lr: float) -> StepRecord:
    """What the trainer tells step hooks after step `step` of a 1,000-step run."""
    return StepRecord(step=step, total_steps=1000, step_loss=0.5, smoothed_loss=0.5, learning_rate=lr)


def feed_run(writer: ReportWriter, out: Path, steps: int, validate_every: int, prompts: list[str],
             sample_every: int) -> None:
    """Events as the trainer sends them: phases, staging, data, steps with loss terms, validations, samples."""
    writer.phase("Staging")
    writer.staged("model", StagingReport(path=out, files=3, downloaded=3, bytes_downloaded=1000, seconds=1.5))
    writer.phase("Loading")
    writer.data(DataReport(images=20, skipped=2, max_skipped=5, skipped_files=[
        SkippedFile(file="broken.png", reason="truncated image"),
        SkippedFile(file="<b>x</b>.png", reason="no caption")]))
    writer.phase("Training")
    writer.started(0, steps)
    writer.buckets({(64, 64): 3, (80, 48): 1})
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for step in range(1, steps + 1):
        writer.step(step, 1.0 / step + 0.05 * (step % 3), 4, 0.25)
        writer.loss_terms(step, {"instance": 0.5 / step, "prior": 0.1})
        if step % validate_every == 0:
            writer.validation(step, 0.9 / step)
        if step % sample_every == 0:
            for index, prompt in enumerate(prompts):
                path = out / "samples" / f"step-{step}-{index}-0.png"
                Image.new("RGB", (512, 512), (step % 256, index * 40, 90)).save(path)
                writer.sample(SampleRef(step=step, prompt=prompt, uri=str(path)))
        record = step_record(step, 1e-4 * (1 - step / (steps + 1)))
        if step < steps:  # the last step's report is the one written at the end
            writer.step_hook(record)
        else:
            writer.record = record
            writer.steps[-1]["lr"] = 1e-4 / (steps + 1)


@pytest.mark.slow
def test_a_thousand_steps_render_one_marker_per_point_in_bounded_time(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = local_job("/models/sd", "/data", str(out))
    progress = ProgressState()
    writer = ReportWriter(job, RuntimeConfig(scratch=tmp_path / "scratch"), progress, LocalStore())
    prompts = ["a corgi", "a <script>alert(1)</script> corgi", "a corgi in snow", "a corgi on a beach"]
    started = time.perf_counter()
    feed_run(writer, out, steps=1000, validate_every=250, prompts=prompts, sample_every=62)
    fed = time.perf_counter() - started
    writer.close()
    print(f"\n1,000 steps, 4 validations, 64 samples: events and reports {fed:.2f} s, final report "
          f"{writer.render_seconds:.2f} s, index.html {(out / 'report' / 'index.html').stat().st_size / 1e6:.2f} MB")

    report = out / "report"
    assert sorted(p.name for p in report.iterdir()) == ["history.jsonl", "index.html", "loss.png", "samples.png"]
    history = history_of(report)
    assert [line["step"] for line in history if line["kind"] == "step"] == list(range(1, 1001))
    assert [line["step"] for line in history if line["kind"] == "validation"] == list(range(250, 1001, 250))
    assert len([line for line in history if line["kind"] == "sample"]) == 64
    first = history[0]
    assert set(first) >= {"step", "stepLoss", "smoothedLoss", "lr", "imagesPerSecond", "time", "lossTerms"}
    assert first["lr"] is not None and first["imagesPerSecond"] == 16.0

    page = parse_page(report / "index.html")
    assert page.markers == {"series-step-loss": 1000, "series-smoothed-loss": 1000, "series-validation-loss": 4,
                            "series-loss-instance": 1000, "series-loss-prior": 1000, "series-lr": 1000,
                            "series-images-per-second": 1000}
    assert "script" not in page.tags, "prompts and file names are escaped, the page runs nothing"
    assert [link for link in page.links if not link.startswith(("data:image/png;base64,", "#"))] == []
    assert page.images == 4 * render.MAX_GRID_STEPS, "four prompts x twelve of the sixteen sampled steps"
    text = (report / "index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;b&gt;x&lt;/b&gt;.png" in text
    for shown in ("truncated image", "64 x 64", "80 x 48", "Staging", "Training", "1000 of 1000"):
        assert shown in text
    for png in ("loss.png", "samples.png"):
        with Image.open(report / png) as image:
            image.verify()
    assert progress.snapshot()["outputs"] == {"report": str(report / "index.html")}


def test_the_report_is_written_at_each_validation_and_keeps_the_final_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    progress = ProgressState()
    writer = ReportWriter(local_job("/m", "/d", str(out)), RuntimeConfig(scratch=tmp_path / "s"), progress,
                          LocalStore())
    reporter = Reporters([progress, writer])
    reporter.step(1, 0.5, 2, 1.0)
    writer.step_hook(step_record(1, 1e-3))
    assert not (out / "report").exists(), "no report before the first validation"
    assert progress.snapshot()["outputs"] is None
    reporter.step(2, 0.4, 2, 1.0)
    reporter.validation(2, 0.45)
    writer.step_hook(step_record(2, 1e-3))
    assert len([line for line in history_of(out / "report") if line["kind"] == "step"]) == 2
    uri = str(out / "report" / "index.html")
    assert progress.snapshot()["outputs"] == {"report": uri}
    reporter.outputs(Outputs(uri=str(out / "final") + "/", step=2, reason="BestValidationLoss"))
    assert progress.snapshot()["outputs"] == {"uri": str(out / "final") + "/", "step": 2,
                                              "reason": "BestValidationLoss", "report": uri}
    reporter.close()
    assert "step 2 (BestValidationLoss)" in (out / "report" / "index.html").read_text()


def test_a_restarted_pod_keeps_the_history_before_its_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = local_job("/m", "/d", str(out))
    first = ReportWriter(job, RuntimeConfig(scratch=tmp_path / "s1"), ProgressState(), LocalStore())
    for step in range(1, 7):
        first.step(step, 1.0 / step, 2, 1.0)
    first.validation(3, 0.4)
    first.validation(6, 0.3)
    first.close()
    second = ReportWriter(job, RuntimeConfig(scratch=tmp_path / "s2"), ProgressState(), LocalStore())
    second.started(4, 10)  # resumed from the checkpoint of step 4: steps 5 and 6 are done again
    for step in range(5, 8):
        second.step(step, 0.1, 2, 1.0)
    second.close()
    history = history_of(out / "report")
    assert [(line["kind"], line["step"]) for line in history] == [
        ("step", 1), ("step", 2), ("step", 3), ("validation", 3), ("step", 4), ("step", 5), ("step", 6), ("step", 7)]
    assert parse_page(out / "report" / "index.html").markers["series-step-loss"] == 7


def test_a_report_that_cannot_be_written_does_not_fail_the_run(tmp_path: Path, capsys: Any) -> None:
    blocked = tmp_path / "out"
    blocked.write_text("a file where the output folder should be")
    progress = ProgressState()
    writer = ReportWriter(local_job("/m", "/d", str(blocked)), RuntimeConfig(scratch=tmp_path / "s"), progress,
                          LocalStore())
    writer.step(1, 0.5, 2, 1.0)
    writer.close()
    assert "the report at" in capsys.readouterr().err
    assert progress.snapshot()["outputs"] is None


def test_the_spec_shown_masks_anything_credential_like(tmp_path: Path) -> None:
    """Validation refuses credentials in URLs; were one to slip past it, the report still would not show it."""
    job = local_job("/m", "/d", str(tmp_path), storage={"endpoint": "https://minio.local:9000"})
    storage = job.spec.storage.model_copy(update={"endpoint": "https://minio-user:hunter2@minio.local:9000"})
    model = job.spec.model.model_copy(update={"uri": "https://models.example/sd?X-Amz-Signature=abc"})
    text = resolved_spec(job.model_copy(update={"spec": job.spec.model_copy(update={"storage": storage,
                                                                                     "model": model})}))
    assert "hunter2" not in text and "minio-user" not in text and "abc" not in text
    assert "minio.local:9000" in text and "models.example/sd" in text


def test_figures_are_the_same_bytes_every_time() -> None:
    steps = [{"step": s, "stepLoss": 1 / s, "smoothedLoss": 1 / s, "lr": 1e-4, "imagesPerSecond": 3.0, "time": s}
             for s in range(1, 50)]
    twice = [render.figures(steps, [{"step": 10, "validationLoss": 0.2}], (10, "exported step 10"))
             for _ in range(2)]
    assert render.svg_of(twice[0]["loss"]) == render.svg_of(twice[1]["loss"])
    assert render.png_of(twice[0]["loss"]) == render.png_of(twice[1]["loss"])


@pytest.mark.slow
def test_a_run_with_validation_writes_the_report(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: dict[int, Any] = {}

    def listed_report(record: StepRecord) -> None:
        """After each step: what /progress says about the report (the previous step's, hooks run in order)."""
        progress = next(r for r in built[-1].p.reporter.reporters if isinstance(r, ProgressState))
        seen[record.step] = (progress.snapshot()["outputs"] or {}).get("report")

    job = local_job(str(tiny_sd), str(squares), str(out), data={"validationFraction": 0.2},
                    training={"maxSteps": 3}, output={"checkpointEvery": 10},
                    validation={"every": 2, "prompts": ["a red square"], "inferenceSteps": 1})
    with running_trainers() as built:
        result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0,
                                            status_file=tmp_path / "status.json"), hooks=[listed_report])
    assert result.exit_code == 0, result.message
    uri = str(out / "report" / "index.html")
    assert seen == {1: None, 2: None, 3: uri}, "listed from the step after the first validation"
    assert json.loads((tmp_path / "status.json").read_text())["outputs"]["report"] == uri
    report = out / "report"
    assert {p.name for p in report.iterdir()} == {"history.jsonl", "index.html", "loss.png", "samples.png"}
    history = history_of(report)
    steps = [line for line in history if line["kind"] == "step"]
    assert [line["step"] for line in steps] == [1, 2, 3]
    assert [line["step"] for line in history if line["kind"] == "validation"] == [2, 3]
    assert all(line["lr"] is not None for line in steps)
    page = parse_page(report / "index.html")
    assert page.markers == {"series-step-loss": 3, "series-smoothed-loss": 3, "series-validation-loss": 2,
                            "series-lr": 3, "series-images-per-second": 3}
    assert page.images == 2, "samples at step 2 and at the end"
    text = (report / "index.html").read_text()
    assert "Succeeded" in text and "Completed: training finished" in text


class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def steps_on_disk(folder: Path) -> list[int]:
    return [line["step"] for line in history_of(folder) if line["kind"] == "step"]


def test_reports_while_training_come_at_most_once_a_minute_and_the_final_one_always(tmp_path: Path) -> None:
    out, clock = tmp_path / "out", FakeClock()
    progress = ProgressState()
    writer = ReportWriter(local_job("/m", "/d", str(out)), RuntimeConfig(scratch=tmp_path / "s"), progress,
                          LocalStore(), clock=clock)
    for step in range(1, 11):  # validation.every 1, and each step takes a second
        writer.step(step, 0.5, 2, 1.0)
        writer.validation(step, 0.4)
        writer.step_hook(step_record(step, 1e-3))
        clock.now += 1.0
    assert steps_on_disk(out / "report") == [1], "the first report at once, then none within the minute"
    clock.now = 60.0
    writer.step(11, 0.5, 2, 1.0)
    writer.step_hook(step_record(11, 1e-3))  # no new validation: the one of step 10 is still due
    assert steps_on_disk(out / "report") == list(range(1, 12))
    writer.step(12, 0.5, 2, 1.0)
    writer.validation(12, 0.4)
    writer.step_hook(step_record(12, 1e-3))
    assert steps_on_disk(out / "report")[-1] == 11
    writer.finish()
    assert steps_on_disk(out / "report")[-1] == 12, "the final report does not wait for the minute"


def test_a_sampling_refreshes_the_report_without_a_validation_split(tmp_path: Path) -> None:
    out = tmp_path / "out"
    progress = ProgressState()
    writer = ReportWriter(local_job("/m", "/d", str(out)), RuntimeConfig(scratch=tmp_path / "s"), progress,
                          LocalStore())
    writer.step(1, 0.5, 2, 1.0)
    (out / "samples").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(out / "samples" / "step-1-0-0.png")
    writer.sample(SampleRef(step=1, prompt="a red square", uri=str(out / "samples" / "step-1-0-0.png")))
    writer.step_hook(step_record(1, 1e-3))
    assert parse_page(out / "report" / "index.html").images == 1
    assert progress.snapshot()["outputs"] == {"report": str(out / "report" / "index.html")}


def test_only_the_grid_cells_thumbnails_are_kept_and_each_cell_shows_one_image(tmp_path: Path) -> None:
    """100 samplings x 4 prompts x 4 images: the page and memory hold 12 columns x 4 prompts, one image each."""
    out, clock = tmp_path / "out", FakeClock()
    writer = ReportWriter(local_job("/m", "/d", str(out)), RuntimeConfig(scratch=tmp_path / "s"), ProgressState(),
                          LocalStore(), clock=clock)
    (out / "samples").mkdir(parents=True)
    prompts, most_kept = [f"prompt {i}" for i in range(4)], 0
    for step in range(1, 101):
        writer.step(step, 0.5, 2, 1.0)
        for p_index, prompt in enumerate(prompts):
            for i_index in range(4):
                path = out / "samples" / f"step-{step}-{p_index}-{i_index}.png"
                Image.new("RGB", (32, 32), (step, p_index * 60, i_index * 60)).save(path)
                writer.sample(SampleRef(step=step, prompt=prompt, uri=str(path)))
        clock.now += 2.5  # a report every 24th sampling: the grid changes between them
        writer.step_hook(step_record(step, 1e-3))
        most_kept = max(most_kept, len(writer.thumbnails), len(writer.embedded))
    writer.finish()
    limit = render.MAX_GRID_STEPS * len(prompts)
    assert most_kept <= limit and len(writer.thumbnails) == len(writer.embedded) == limit
    page = parse_page(out / "report" / "index.html")
    assert page.images == limit
    text = (out / "report" / "index.html").read_text()
    assert "12 of 100 sampled steps shown" in text
    assert all(uri.rsplit("-", 1)[-1] == "0.png" for uri in writer.thumbnails), "the first image of each cell"
    with Image.open(out / "report" / "samples.png") as image:
        image.verify()


def test_a_run_without_a_validation_split_names_its_report_in_the_result(tiny_sd: Path, squares: Path,
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = local_job(str(tiny_sd), str(squares), str(out), training={"maxSteps": 2}, output={"checkpointEvery": 10})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0, status_file=tmp_path / "status.json"))
    assert result.exit_code == 0, result.message
    uri = str(out / "report" / "index.html")
    assert result.progress["outputs"]["report"] == uri
    assert json.loads((tmp_path / "status.json").read_text())["outputs"]["report"] == uri
    assert steps_on_disk(out / "report") == [1, 2] and "Completed: training finished" in Path(uri).read_text()


def test_after_a_stop_signal_the_result_is_written_before_the_last_report(tiny_sd: Path, squares: Path,
                                                                          tmp_path: Path, monkeypatch: Any) -> None:
    from kubetune_trainer import job as job_module
    from kubetune_trainer.exitcodes import EXIT_INTERRUPTED

    out, page = tmp_path / "out", tmp_path / "out" / "report" / "index.html"
    page_at_result: list[bool] = []
    write_result = job_module.write_result

    def recording(result: Any, runtime: RuntimeConfig) -> None:
        page_at_result.append(page.exists())
        write_result(result, runtime)

    def sigterm(record: StepRecord) -> None:
        built[-1].p.stop.received = "SIGTERM"  # as the handler does; the ranks agree on it after the next step

    monkeypatch.setattr(job_module, "write_result", recording)
    job = local_job(str(tiny_sd), str(squares), str(out), training={"maxSteps": 5}, output={"checkpointEvery": 10})
    with running_trainers() as built:
        result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0,
                                            status_file=tmp_path / "status.json"), hooks=[sigterm])
    assert result.exit_code == EXIT_INTERRUPTED, result.message
    assert page_at_result == [False], "the result first: the grace period is for the checkpoint and the result"
    assert steps_on_disk(out / "report") == [1, 2], "the last report after it"
