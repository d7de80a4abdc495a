"""The training report under `<output.uri>/report/`: a page people open, pictures they paste, a history they plot.

`ReportWriter` is a `Reporter` on rank 0: it keeps every logged step and validation in memory
(a few hundred bytes each) and, after a validation or a sampling (at most once a minute) and at
the end of the run, renders and uploads through the storage interface:

    report/index.html     one self-contained page (figures inline as SVG, samples embedded)
    report/loss.png       the loss figure, for chats and pull requests
    report/samples.png    validation prompts x steps
    report/history.jsonl  one line per logged step and per validation

Rendering happens only then, never per step, so training speed does not depend on it. The
report's URI goes into `/progress` `outputs.report` once first written; the operator copies it
to `status.outputs.report`. The final report is written by `finish()` before the run's result is
taken, so the result names it; after a stop signal the result goes first (`close()` renders after
it, the grace period is for the checkpoint). A report that cannot be written is a note in the log,
never a failed run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kubetune.api.resource import FineTuneJob
from kubetune.api.status import DataReport, Outputs, SampleRef
from kubetune_trainer import report_render as render
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.parts import StepHook, StepRecord
from kubetune_trainer.reporting import ProgressState, Reporter, Reporters, Smoothed
from kubetune_trainer.storage.interface import ObjectStore, as_prefix, download_whole, join_uri
from kubetune_trainer.storage.staging import StagingReport

REPORT_FILES = ("history.jsonl", "loss.png", "samples.png", "index.html")
"""Uploaded in this order: the page last, so whoever sees it finds its companions."""
SHOWN_SKIPPED = 100
"""Skipped files the page names (history and log name every one)."""
MAX_LOGGED_STEPS = 2000
"""Steps in the history and on the charts: every step up to this many, else every k-th (and the last), so a
long run's report renders in about the same time and stays a few MB."""
RENDER_INTERVAL_SECONDS = 60.0
"""At most one report per this many seconds while training (1-3 s of rank 0's time each); the final one always."""
SECRET_WORDS = ("token", "password", "secret_access", "secretaccess", "signature", "credential")


class ReportWriter(Reporter):
    """Collects the run's history and writes the report at each validation and at the end."""

    def __init__(self, job: FineTuneJob, runtime: RuntimeConfig, progress: ProgressState,
                 store: ObjectStore | None = None, clock: Callable[[], float] = time.monotonic,
                 interval: float = RENDER_INTERVAL_SECONDS) -> None:
        self.job, self.progress, self._store = job, progress, store
        self.clock, self.interval = clock, interval
        self.rendered_at: float | None = None
        """When the last report was written (by `clock`); None before the first."""
        self.finished = False
        os.environ.setdefault("MPLCONFIGDIR", str(runtime.scratch / "matplotlib"))  # its font cache; HOME may be
        # read-only in a pod, and a cache rebuilt in /tmp every start costs seconds
        self.runtime = runtime
        self.folder = runtime.scratch / "report"
        self.uri = join_uri(job.spec.output.uri, "report", "index.html")
        self.started_at = time.monotonic()
        self.steps: list[dict[str, Any]] = []
        self.validations: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.thumbnails: dict[str, Any] = {}
        self.embedded: dict[str, str] = {}
        self.every, self.total = 1, 0
        self.phases: list[tuple[str, float]] = []
        self.staging: list[dict[str, Any]] = []
        self.data_report: DataReport | None = None
        self.final: Outputs | None = None
        """The exported outputs, once the export ran."""
        self.published = False
        self.due = False
        self.record: StepRecord | None = None
        """The latest step's record: the run's length, and whether it is stopping and why."""
        self.batch_buckets: list[tuple[str, int]] = []
        self.render_seconds: float | None = None
        self.smoothed = Smoothed()
        self.earlier: list[dict[str, Any]] = []
        """History lines a previous pod of this run wrote before the step this one resumed from."""
        self.offset = 0.0
        """Seconds the previous pods ran, so `time` runs on across a restart."""

    # --- events -----------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def phase(self, phase: str) -> None:
        self.phases.append((phase, self.elapsed()))

    def staged(self, what: str, report: StagingReport) -> None:
        self.staging.append({"what": what, "files": report.files, "downloaded": report.downloaded,
                             "bytes": report.bytes_downloaded, "seconds": round(report.seconds, 1)})

    def data(self, report: DataReport) -> None:
        self.data_report = report

    def started(self, step: int, total_steps: int) -> None:
        self.total, self.every = total_steps, max(1, math.ceil(total_steps / MAX_LOGGED_STEPS))
        if step > 0:
            self.earlier = read_history(self.store(), self.uri.rsplit("/", 1)[0],
                                        self.runtime.scratch / "report-earlier.jsonl", step)
            self.offset = max((line.get("time", 0.0) for line in self.earlier), default=0.0)

    def step(self, step: int, loss: float, images: int, seconds: float, epoch: int = 1) -> None:
        smoothed = self.smoothed.add(loss)
        if step % self.every and step != self.total:
            return
        self.steps.append({"kind": "step", "step": step, "epoch": epoch, "stepLoss": loss, "smoothedLoss": smoothed,
                           "lr": None, "images": images, "seconds": seconds, "time": self.offset + self.elapsed(),
                           "imagesPerSecond": images / seconds if seconds > 0 else 0.0})

    def loss_terms(self, step: int, terms: dict[str, float]) -> None:
        if terms and self.steps and self.steps[-1]["step"] == step:
            self.steps[-1]["lossTerms"] = dict(terms)

    def validation(self, step: int, loss: float) -> None:
        self.validations.append({"kind": "validation", "step": step, "validationLoss": loss,
                                 "time": self.offset + self.elapsed()})
        self.due = True  # written once the step is over, with this step's samples

    def sample(self, sample: SampleRef) -> None:
        self.samples.append({"kind": "sample", **sample.model_dump()})
        self.due = True  # the grid changed: also runs without a validation split get a page while training

    def outputs(self, outputs: Outputs) -> None:
        self.final = outputs
        if self.published:  # the export's outputs replace /progress's; the report stays listed
            self.progress.outputs(outputs.model_copy(update={"report": self.uri}))

    def buckets(self, sizes: dict[tuple[int, int], int]) -> None:
        self.batch_buckets = [(f"{w} x {h}", count) for (w, h), count in sorted(sizes.items())]

    def step_hook(self, record: StepRecord) -> None:
        """After each step (a `StepHook`): the step's learning rate, and the report if a validation or a
        sampling asked for one and the last was written `interval` seconds ago (else it stays due)."""
        self.record = record
        if self.steps and self.steps[-1]["step"] == record.step:
            self.steps[-1]["lr"] = record.learning_rate
        if self.due and (self.rendered_at is None or self.clock() - self.rendered_at >= self.interval):
            self.due = False
            self.publish()

    def finish(self) -> None:
        """The final report, before the run's result is taken so that it names the report (after at least one step)."""
        if self.steps and not self.finished:
            self.finished = True
            self.publish()

    def close(self) -> None:
        """The last report if `finish` did not write it (a stop signal: the result went first)."""
        self.finish()

    # --- writing ----------------------------------------------------------------------------
    def store(self) -> ObjectStore:
        if self._store is None:
            from kubetune_trainer.storage.schemes import open_store

            spec = self.job.spec
            self._store = open_store(spec.output.uri, spec.storage, self.runtime.pvc_root)
        return self._store

    def publish(self) -> None:
        """Render and upload the report; a failure is a note, training goes on."""
        started = time.perf_counter()
        try:
            self.write(self.folder)
            for name in REPORT_FILES:
                self.store().upload(self.folder / name, join_uri(self.uri.rsplit("/", 1)[0], name))
        except Exception as exc:  # the report is a view of the run, never a reason to fail it
            print(f"[kubetune] note: the report at {self.uri} was not written: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            return
        finally:
            self.rendered_at = self.clock()  # a failed attempt waits its turn too
        self.render_seconds = time.perf_counter() - started
        if not self.published:
            self.published = True
            self.progress.outputs((self.final or Outputs()).model_copy(update={"report": self.uri}))

    def write(self, folder: Path) -> None:
        """Every report file into `folder` (replaced whole)."""
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        history = self.history()
        steps, validations = _kind(history, "step"), _kind(history, "validation")
        samples = _kind(history, "sample")
        cells = self.sample_cells(samples)
        figures = render.figures(steps, validations, self.marked_step(validations))
        (folder / "history.jsonl").write_text("".join(json.dumps(line) + "\n" for line in history), encoding="utf-8")
        if "loss" in figures:
            (folder / "loss.png").write_bytes(render.png_of(figures["loss"]))
        if cells:
            (folder / "samples.png").write_bytes(render.png_of(render.samples_figure(cells), dpi=90))
        svgs = {name: render.svg_of(fig) for name, fig in figures.items()}
        page = render.render_page(self.context(svgs, cells, steps, validations, len({s["step"] for s in samples})))
        (folder / "index.html").write_text(page, encoding="utf-8")
        if not cells:  # the picture is there before any sample is, and says why it is empty
            (folder / "samples.png").write_bytes(render.png_of(render.empty_figure("no samples yet")))

    def history(self) -> list[dict[str, Any]]:
        """Steps, validations and samples in step order, those of earlier pods of this run first."""
        order = {"step": 0, "validation": 1, "sample": 2}
        lines = [*self.steps, *self.validations, *self.samples]
        return self.earlier + sorted(lines, key=lambda line: (line["step"], order[line["kind"]]))

    def marked_step(self, validations: list[dict[str, Any]]) -> tuple[int, str] | None:
        """The exported step once known, else the best validation so far."""
        if self.final is not None and self.final.step is not None:
            return self.final.step, f"exported step {self.final.step}"
        if validations:
            best = min(validations, key=lambda v: (v["validationLoss"], v["step"]))
            return best["step"], f"best validation so far (step {best['step']})"
        return None

    def sample_cells(self, samples: list[dict[str, Any]]) -> list[render.SampleCell]:
        """The grid's cells (its steps chosen first, the first image of each prompt there), each with a thumbnail.

        Only the shown cells' thumbnails are kept (at most `MAX_GRID_STEPS` x prompts): one the grid
        no longer shows is dropped, one it shows anew is read back from the store."""
        from PIL import Image

        columns = set(render.grid_steps(s["step"] for s in samples))
        shown: dict[tuple[str, int], dict[str, Any]] = {}
        for sample in samples:
            if sample["step"] in columns:
                shown.setdefault((sample["prompt"], sample["step"]), sample)
        keep = {sample["uri"] for sample in shown.values()}
        self.thumbnails = {uri: thumb for uri, thumb in self.thumbnails.items() if uri in keep}
        self.embedded = {uri: src for uri, src in self.embedded.items() if uri in keep}
        cells = []
        for sample in shown.values():
            uri = sample["uri"]
            if uri not in self.thumbnails:
                local = self.runtime.scratch / "report-samples" / uri.rsplit("/", 1)[-1]
                local.parent.mkdir(parents=True, exist_ok=True)
                download_whole(self.store(), uri, local)
                with Image.open(local) as image:
                    thumb = image.convert("RGB")
                thumb.thumbnail((render.THUMBNAIL, render.THUMBNAIL))
                self.thumbnails[uri] = thumb
                local.unlink(missing_ok=True)
            cells.append(render.SampleCell(sample["step"], sample["prompt"], uri, self.thumbnails[uri]))
        return cells

    def context(self, svgs: dict[str, str], cells: list[render.SampleCell], steps: list[dict[str, Any]],
                validations: list[dict[str, Any]], sampled_steps: int) -> dict[str, Any]:
        """Everything the template shows, as plain values (it escapes them all but the SVGs)."""
        from markupsafe import Markup

        prompts, columns, grid = render.sample_grid(cells)
        return {
            "title": f"{self.job.metadata.name}: training report",
            "summary": self.summary(steps, validations),
            "figures": {name: Markup(svg) for name, svg in svgs.items()},
            "prompts": prompts, "columns": columns,
            "grid": {key: {"src": self.embed(value[0]), "uri": value[0].uri} for key, value in grid.items()},
            "sampled_steps": sampled_steps,
            "data": self.data_summary(),
            "phases": self.phase_timings(),
            "staging": self.staging,
            "spec": resolved_spec(self.job),
            "validations": validations,
        }

    def embed(self, cell: render.SampleCell) -> str:
        if cell.uri not in self.embedded:
            self.embedded[cell.uri] = render.data_uri(cell.thumbnail)
        return self.embedded[cell.uri]

    def summary(self, steps: list[dict[str, Any]], validations: list[dict[str, Any]]) -> list[tuple[str, str]]:
        spec, last = self.job.spec, steps[-1] if steps else None
        images = sum(s["images"] for s in steps)
        busy = sum(s["seconds"] for s in steps)
        total = self.record.total_steps if self.record is not None else None
        rows = [("phase", str(self.progress.report().phase)), ("stop reason", self.stop_reason()),
                ("base model", _masked_url(spec.model.uri)),
                ("method", spec.method.type),
                ("steps", f"{last['step'] if last else 0} of {total if total is not None else '?'}"),
                ("wall time", _duration(self.offset + self.elapsed())),
                ("images/s", f"{images / busy:.2f}" if busy > 0 else "-")]
        if validations:
            best = min(validations, key=lambda v: (v["validationLoss"], v["step"]))
            rows.append(("best validation loss", f"{best['validationLoss']:.5f} at step {best['step']}"))
        final = self.final
        if final is not None:
            step = final.step if final.step is not None else (last["step"] if last else "?")
            rows.append(("exported", f"step {step}" + (f" ({final.reason})" if final.reason else "")))
            rows.append(("outputs", final.uri or ""))
        return rows

    def stop_reason(self) -> str:
        phase = self.progress.report().phase
        record = self.record
        if record is not None and record.early_stop:
            return f"EarlyStopped: {record.early_stop}"
        if record is not None and record.stop_signal:
            return f"stopped by {record.stop_signal} after step {record.step} (a restart resumes)"
        if phase == "Succeeded":
            return "Completed: training finished"
        if phase == "Failed":
            return "Failed (status.message says why)"
        return "still running"

    def data_summary(self) -> dict[str, Any] | None:
        report = self.data_report
        buckets = self.batch_buckets
        if report is None and not buckets:
            return None
        skipped = list(report.skipped_files) if report else []
        return {"images": report.images if report else None, "skipped": report.skipped if report else None,
                "max_skipped": report.max_skipped if report else None,
                "skipped_files": [(s.file, s.reason) for s in skipped[:SHOWN_SKIPPED]],
                "more_skipped": max(0, len(skipped) - SHOWN_SKIPPED), "buckets": buckets or []}

    def phase_timings(self) -> list[tuple[str, str]]:
        """How long each phase took: from its start to the next phase's (the last one to now)."""
        marks = [*self.phases, ("end", self.elapsed())]
        return [(name, _duration(marks[i + 1][1] - start)) for i, (name, start) in enumerate(marks[:-1])]


def _kind(lines: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("kind") == kind]


def read_history(store: ObjectStore, folder_uri: str, local: Path, before: int) -> list[dict[str, Any]]:
    """The lines of an earlier pod's history.jsonl up to step `before`; none if it is missing or unreadable
    (the report then starts at the resumed step: a view of the run is never a reason to stop it)."""
    uri = join_uri(folder_uri, "history.jsonl")
    try:
        if not any(info.relative == "history.jsonl" for info in store.list(as_prefix(folder_uri))):
            return []
        local.parent.mkdir(parents=True, exist_ok=True)
        download_whole(store, uri, local)
        lines = [json.loads(line) for line in local.read_text(encoding="utf-8").splitlines() if line.strip()]
        local.unlink(missing_ok=True)
    except Exception as exc:  # damaged or unreachable: say so and go on
        print(f"[kubetune] note: the report's earlier history {uri} was not read: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        return []
    return [line for line in lines if isinstance(line, dict) and line.get("kind") in ("step", "validation", "sample")
            and isinstance(line.get("step"), int) and line["step"] <= before]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def resolved_spec(job: FineTuneJob) -> str:
    """The spec as YAML, with anything that could carry a credential masked (it should hold only Secret
    names; URLs with user:password or signed query strings, and token-like fields, are masked anyway)."""
    import yaml

    spec = job.spec.model_dump(by_alias=True, mode="json", exclude_none=True)
    return yaml.safe_dump(_scrubbed(spec), sort_keys=False, allow_unicode=True)


def _scrubbed(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _scrubbed(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v, key) for v in value]
    if not isinstance(value, str):
        return value
    if any(word in key.lower() for word in SECRET_WORDS):
        return "(masked)"
    return _masked_url(value)


def _masked_url(text: str) -> str:
    if "://" not in text:
        return text
    parts = urlsplit(text)
    netloc = parts.netloc.rsplit("@", 1)[-1] if "@" in parts.netloc else parts.netloc
    query = "(masked)" if parts.query else ""
    if netloc == parts.netloc and not query:
        return text
    return urlunsplit((parts.scheme, ("(masked)@" if "@" in parts.netloc else "") + netloc, parts.path, query,
                       parts.fragment))


def report_hooks(reporter: Reporter) -> list[StepHook]:
    """The step hooks of the report writers among `reporter`'s (none on ranks that write no report)."""
    members = reporter.reporters if isinstance(reporter, Reporters) else [reporter]
    return [member.step_hook for member in members if isinstance(member, ReportWriter)]


def finish_reports(reporter: Reporter) -> None:
    """The final report of each report writer among `reporter`'s, before the run's result is taken."""
    members = reporter.reporters if isinstance(reporter, Reporters) else [reporter]
    for member in members:
        if isinstance(member, ReportWriter):
            member.finish()
