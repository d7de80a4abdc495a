"""Where training events go: progress JSON, Prometheus metrics, log lines, a progress bar.

The trainer tells one `Reporter` what happened; `Reporters` fans out to several. The base
class does nothing, so ranks other than 0, or a run without a bar, get plain `Reporter()`
and the loop never asks whether reporting is on.

Two losses, named the same everywhere (/metrics, /progress, status, log line, bar): the
*step loss* is the raw loss of the latest optimizer step; the *smoothed loss* is its
exponential moving average (`Smoothed`, factor `SMOOTHING`).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from kubetune.api.report import TrainerProgress
from kubetune.api.status import CheckpointRef, DataReport, Outputs, SampleRef
from kubetune_trainer.storage.staging import StagingReport

SMOOTHING = 0.9
"""Smoothed loss = SMOOTHING x the previous smoothed loss + (1 - SMOOTHING) x the step loss."""
LOG_SECONDS = 30.0
LOG_PERCENT = 5
"""Without a terminal, a step line every LOG_SECONDS and at every LOG_PERCENT% of the steps."""
REPORTED_SKIPPED_FILES = 10
"""Skipped files named in /progress and the termination message; the log names every one."""


class Smoothed:
    """An exponential moving average that starts at its first value (again after a resume: the
    average is not checkpointed). Every reporter keeps its own; they see the same steps, so agree."""

    def __init__(self, factor: float = SMOOTHING) -> None:
        self.factor = factor
        self.value: float | None = None

    def add(self, value: float) -> float:
        self.value = value if self.value is None else self.factor * self.value + (1 - self.factor) * value
        return self.value


class Reporter:
    """Receives training events; every method is a no-op here."""

    def phase(self, phase: str) -> None: ...

    def notice(self, text: str) -> None: ...

    def staged(self, what: str, report: StagingReport) -> None: ...

    def data(self, report: DataReport) -> None:
        """What the dataset gave: images used and every image skipped, with the reason (data.maxSkipped)."""

    def started(self, step: int, total_steps: int) -> None: ...

    def step(self, step: int, loss: float, images: int, seconds: float, epoch: int = 1) -> None: ...

    def loss_terms(self, step: int, terms: dict[str, float]) -> None:
        """The parts of the step's loss by term (DreamBooth: instance, prior); empty for one-term methods."""

    def validation(self, step: int, loss: float) -> None: ...

    def checkpoints(self, refs: list[CheckpointRef], upload_seconds: float | None) -> None: ...

    def buckets(self, sizes: dict[tuple[int, int], int]) -> None:
        """The aspect buckets training draws batches from: (width, height) -> examples."""

    def sample(self, sample: SampleRef) -> None: ...

    def outputs(self, outputs: Outputs) -> None: ...

    def close(self) -> None: ...


class Reporters(Reporter):
    """Sends every event to each reporter in turn."""

    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    def _each(self, event: str, *args: Any) -> None:
        for reporter in self.reporters:
            getattr(reporter, event)(*args)

    def phase(self, phase: str) -> None:
        self._each("phase", phase)

    def notice(self, text: str) -> None:
        self._each("notice", text)

    def staged(self, what: str, report: StagingReport) -> None:
        self._each("staged", what, report)

    def data(self, report: DataReport) -> None:
        self._each("data", report)

    def started(self, step: int, total_steps: int) -> None:
        self._each("started", step, total_steps)

    def step(self, step: int, loss: float, images: int, seconds: float, epoch: int = 1) -> None:
        self._each("step", step, loss, images, seconds, epoch)

    def loss_terms(self, step: int, terms: dict[str, float]) -> None:
        self._each("loss_terms", step, terms)

    def validation(self, step: int, loss: float) -> None:
        self._each("validation", step, loss)

    def checkpoints(self, refs: list[CheckpointRef], upload_seconds: float | None) -> None:
        self._each("checkpoints", refs, upload_seconds)

    def buckets(self, sizes: dict[tuple[int, int], int]) -> None:
        self._each("buckets", sizes)

    def sample(self, sample: SampleRef) -> None:
        self._each("sample", sample)

    def outputs(self, outputs: Outputs) -> None:
        self._each("outputs", outputs)

    def close(self) -> None:
        self._each("close")


REPORTED_CHECKPOINTS = 32
"""The newest checkpoints /progress lists (keepCheckpoints may be 1,000; the operator reads 64 KiB at most)."""


class ProgressState(Reporter):
    """The `/progress` document (`kubetune.api.report.TrainerProgress`): phase, step, both losses, ETA, URIs.

    Rank 0 serves it while training and puts its last reading into the run's result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._report = TrainerProgress(phase="Starting", step=0)
        self._loss, self._rate = Smoothed(), Smoothed()

    def report(self) -> TrainerProgress:
        """The document as it stands (a copy: later events do not change it)."""
        with self._lock:
            return self._report.model_copy()

    def snapshot(self) -> dict[str, Any]:
        """The document as JSON values, as `/progress` serves it."""
        return self.report().wire()

    def _set(self, **values: Any) -> None:
        with self._lock:
            self._report = self._report.model_copy(update=values)

    def phase(self, phase: str) -> None:
        self._set(phase=phase)

    def data(self, report: DataReport) -> None:
        self._set(data=reported_data(report))

    def started(self, step: int, total_steps: int) -> None:
        self._set(step=step, total_steps=total_steps)

    def step(self, step: int, loss: float, images: int, seconds: float, epoch: int = 1) -> None:
        smoothed, rate = self._loss.add(loss), self._rate.add(images / seconds if seconds > 0 else 0.0)
        total = self._report.total_steps or step
        eta = (total - step) * seconds
        self._set(step=step, epoch=epoch, step_loss=round(loss, 6), smoothed_loss=round(smoothed, 6),
                  images_per_second=round(rate, 3), eta_seconds=int(eta))

    def loss_terms(self, step: int, terms: dict[str, float]) -> None:
        if terms:
            self._set(loss_terms={name: round(value, 6) for name, value in terms.items()})

    def validation(self, step: int, loss: float) -> None:
        self._set(validation_loss=round(loss, 6))

    def checkpoints(self, refs: list[CheckpointRef], upload_seconds: float | None) -> None:
        self._set(checkpoints=list(refs[-REPORTED_CHECKPOINTS:]))

    def sample(self, sample: SampleRef) -> None:
        with self._lock:
            self._report = self._report.model_copy(update={"samples": [*self._report.samples, sample][-16:]})

    def outputs(self, outputs: Outputs) -> None:
        self._set(outputs=outputs)


def reported_data(report: DataReport, files: int = REPORTED_SKIPPED_FILES) -> DataReport:
    """The report as /progress and the result carry it: the first `files` skipped files named."""
    return report.model_copy(update={"skipped_files": report.skipped_files[:files]})


def aspect_buckets(data: Any) -> dict[tuple[int, int], int]:
    """The aspect buckets of a batch source, found through its wrappers (prefetching, prior preservation,
    tracing): (width, height) -> examples; empty when it has none."""
    for _ in range(4):
        buckets = getattr(data, "buckets", None)
        if isinstance(buckets, dict):
            return {size: len(members) for size, members in buckets.items()}
        data = next((getattr(data, name) for name in ("instance", "stream", "data", "inner")
                     if hasattr(data, name)), None)
        if data is None:
            return {}
    return {}


def data_lines(report: DataReport) -> list[str]:
    """The log's account of the dataset: a summary, then each skipped file with its reason."""
    summary = f"data: {report.images} images, {report.skipped} skipped (data.maxSkipped {report.max_skipped})"
    return [summary, *(f"skipped {entry.file}: {entry.reason}" for entry in report.skipped_files)]


def step_line(step: int, total: int, loss: float, smoothed: float, images: int, seconds: float) -> str:
    """The log's account of one step: where it is, both losses by their documented names, throughput."""
    percent = f" ({step * 100 // total}%)" if total else ""
    return (f"step {step}/{total}{percent} step loss {loss:.4f} smoothed loss {smoothed:.4f} "
            f"{images / max(seconds, 1e-9):.2f} img/s")


class LogLines(Reporter):
    """One line per notable event, for logs read without a terminal (pods, CI, `kubetune run` piped).

    A step line every `seconds` (a slow run still shows it is alive) and at every `percent`% of
    the steps (a fast run still shows its course in about 100 / `percent` lines), and the last
    step; `steps=False` leaves step lines out. `clock` is the seam tests turn by hand.
    """

    def __init__(self, stream: Any = None, steps: bool = True, seconds: float = LOG_SECONDS,
                 percent: int = LOG_PERCENT, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.steps, self.seconds, self.percent, self.clock = (stream or sys.stdout, steps, seconds,
                                                                            percent, clock)
        self.total, self.previous, self.logged_at, self.loss = 0, 0, 0.0, Smoothed()

    def _due(self, step: int) -> bool:
        """A step line is due: `seconds` passed since the last one, or `step` reached the next
        multiple of `percent`% of the steps (a step taken from a later one may cross several)."""
        def tick(s: int) -> int:
            return s * 100 // (self.percent * self.total) if self.total else s

        return (step == self.total or tick(step) > tick(self.previous)
                or self.clock() - self.logged_at >= self.seconds)

    def _print(self, text: str) -> None:
        print(f"[kubetune] {time.strftime('%H:%M:%S')} {text}", file=self.stream, flush=True)

    def phase(self, phase: str) -> None:
        self._print(f"phase {phase}")

    def notice(self, text: str) -> None:
        self._print(f"note: {text}")

    def staged(self, what: str, report: StagingReport) -> None:
        if not report.files:
            self._print(f"{what}: using {report.path} in place")
            return
        self._print(f"staged {what}: {report.files} files, {report.downloaded} downloaded "
                    f"({report.bytes_downloaded} bytes) in {report.seconds:.1f}s")
        if report.unverified:
            self._print(f"note: {what}: {report.unverified} objects carry no digest (only their size was checked), "
                        f"e.g. {', '.join(report.unverified_keys)}")

    def data(self, report: DataReport) -> None:
        for line in data_lines(report):
            self._print(line)

    def started(self, step: int, total_steps: int) -> None:
        self.total, self.previous, self.logged_at = total_steps, step, self.clock()
        self._print(f"training from step {step} to {total_steps}")

    def step(self, step: int, loss: float, images: int, seconds: float, epoch: int = 1) -> None:
        smoothed = self.loss.add(loss)
        if self.steps and self._due(step):
            self.logged_at = self.clock()
            self._print(step_line(step, self.total, loss, smoothed, images, seconds))
        self.previous = step

    def validation(self, step: int, loss: float) -> None:
        self._print(f"step {step} validation loss {loss:.4f}")

    def checkpoints(self, refs: list[CheckpointRef], upload_seconds: float | None) -> None:
        if refs and upload_seconds is not None:
            self._print(f"checkpoint step {refs[-1].step} -> {refs[-1].uri} ({upload_seconds:.1f}s)")


class ProgressBar(Reporter):
    """A tqdm bar over optimizer steps, for `kubetune run` in a terminal."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.loss = Smoothed()

    def notice(self, text: str) -> None:
        print(f"note: {text}", file=sys.stderr, flush=True)

    def data(self, report: DataReport) -> None:
        for line in data_lines(report):
            print(line, file=sys.stderr, flush=True)

    def started(self, step: int, total_steps: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, images: int, seconds: float, epoch: int = 1) -> None:
        smoothed = self.loss.add(loss)
        if self.bar is not None:
            self.bar.set_postfix_str(f"step loss {loss:.4f} smoothed loss {smoothed:.4f}", refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def console_reporter(progress_bar: bool, step_lines: bool = True) -> Reporter:
    """The bar when asked for and stderr is a terminal; log lines otherwise: a bar redrawn into a
    pod log or a file is one long unreadable line."""
    if progress_bar and sys.stderr.isatty():
        return ProgressBar()
    return LogLines(steps=step_lines)
