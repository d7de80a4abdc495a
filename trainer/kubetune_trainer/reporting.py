"""Where training events go: progress JSON, Prometheus metrics, log lines, a progress bar.

The trainer tells one `Reporter` what happened; `Reporters` fans out to several. The base
class does nothing, so ranks other than 0, or a run without a bar, get plain `Reporter()`
and the loop never asks whether reporting is on.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from kubetune.api.status import DataReport
from kubetune_trainer.checkpoint import CheckpointRef
from kubetune_trainer.staging import StagingReport

SMOOTHING = 0.9
REPORTED_SKIPPED_FILES = 10
"""Skipped files named in /progress and the termination message; the log names every one."""


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

    def sample(self, sample: dict[str, Any]) -> None: ...

    def outputs(self, outputs: dict[str, Any]) -> None: ...

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

    def sample(self, sample: dict[str, Any]) -> None:
        self._each("sample", sample)

    def outputs(self, outputs: dict[str, Any]) -> None:
        self._each("outputs", outputs)

    def close(self) -> None:
        self._each("close")


REPORTED_CHECKPOINTS = 32
"""The newest checkpoints /progress lists (keepCheckpoints may be 1,000; the operator reads 64 KiB at most)."""


class ProgressState(Reporter):
    """The JSON served at /progress and written at exit: phase, step, loss, ETA, URIs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {
            "phase": "Starting", "step": 0, "totalSteps": None, "epoch": None, "loss": None, "validationLoss": None,
            "imagesPerSecond": None, "etaSeconds": None, "lossTerms": None, "checkpoints": [], "samples": [],
            "outputs": None, "data": None,
        }
        self._loss: float | None = None
        self._rate: float | None = None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {k: (list(v) if isinstance(v, list) else v) for k, v in self._state.items()}

    def _set(self, **values: Any) -> None:
        with self._lock:
            self._state.update(values)

    def phase(self, phase: str) -> None:
        self._set(phase=phase)

    def data(self, report: DataReport) -> None:
        self._set(data=data_block(report))

    def started(self, step: int, total_steps: int) -> None:
        self._set(step=step, totalSteps=total_steps)

    def step(self, step: int, loss: float, images: int, seconds: float, epoch: int = 1) -> None:
        rate = images / seconds if seconds > 0 else 0.0
        self._loss = loss if self._loss is None else SMOOTHING * self._loss + (1 - SMOOTHING) * loss
        self._rate = rate if self._rate is None else SMOOTHING * self._rate + (1 - SMOOTHING) * rate
        total = self._state["totalSteps"] or step
        eta = (total - step) * seconds
        self._set(step=step, epoch=epoch, loss=round(self._loss, 6), imagesPerSecond=round(self._rate, 3),
                  etaSeconds=int(eta))

    def loss_terms(self, step: int, terms: dict[str, float]) -> None:
        if terms:
            self._set(lossTerms={name: round(value, 6) for name, value in terms.items()})

    def validation(self, step: int, loss: float) -> None:
        self._set(validationLoss=round(loss, 6))

    def checkpoints(self, refs: list[CheckpointRef], upload_seconds: float | None) -> None:
        self._set(checkpoints=[ref.as_dict() for ref in refs][-REPORTED_CHECKPOINTS:])

    def sample(self, sample: dict[str, Any]) -> None:
        with self._lock:
            self._state["samples"] = [*self._state["samples"], sample][-16:]

    def outputs(self, outputs: dict[str, Any]) -> None:
        self._set(outputs=outputs)


def data_block(report: DataReport, files: int = REPORTED_SKIPPED_FILES) -> dict[str, Any]:
    """The report as the status field `data` (camelCase), naming the first `files` skipped files."""
    return report.model_copy(update={"skipped_files": report.skipped_files[:files]}).model_dump(by_alias=True,
                                                                                                 mode="json")


def data_lines(report: DataReport) -> list[str]:
    """The log's account of the dataset: a summary, then each skipped file with its reason."""
    summary = f"data: {report.images} images, {report.skipped} skipped (data.maxSkipped {report.max_skipped})"
    return [summary, *(f"skipped {entry.file}: {entry.reason}" for entry in report.skipped_files)]


class LogLines(Reporter):
    """One line per notable event, for pod logs; steps every `every` steps."""

    def __init__(self, every: int = 10, stream: Any = None) -> None:
        self.every, self.stream, self.total = every, stream or sys.stdout, 0

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
        self.total = total_steps
        self._print(f"training from step {step} to {total_steps}")

    def step(self, step: int, loss: float, images: int, seconds: float, epoch: int = 1) -> None:
        if step % self.every == 0 or step == self.total:
            self._print(f"step {step}/{self.total} loss {loss:.4f} {images / max(seconds, 1e-9):.2f} img/s")

    def validation(self, step: int, loss: float) -> None:
        self._print(f"step {step} validation loss {loss:.4f}")

    def checkpoints(self, refs: list[CheckpointRef], upload_seconds: float | None) -> None:
        if refs and upload_seconds is not None:
            self._print(f"checkpoint step {refs[-1].step} -> {refs[-1].uri} ({upload_seconds:.1f}s)")


class ProgressBar(Reporter):
    """A tqdm bar over optimizer steps, for `kubetune run` in a terminal."""

    def __init__(self) -> None:
        self.bar: Any = None

    def notice(self, text: str) -> None:
        print(f"note: {text}", file=sys.stderr, flush=True)

    def data(self, report: DataReport) -> None:
        for line in data_lines(report):
            print(line, file=sys.stderr, flush=True)

    def started(self, step: int, total_steps: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, images: int, seconds: float, epoch: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
