"""What rank 0 tells the operator: its `/progress` JSON and its termination message.

Both use the status field names (camelCase; snake_case accepted), so the trainer writes
a piece of status and the operator merges it. The trainer's own shape
(`kubetune_trainer.reporting.ProgressState`, `kubetune_trainer.job.RunResult`):

    /progress            {"phase": "Staging" | "Loading" | "Resuming" | "Training" | ...,
                          "step": 1200, "totalSteps": 2000, "stepLoss": 0.091, "smoothedLoss": 0.083,
                          "imagesPerSecond": 41.5, "etaSeconds": 310,
                          "checkpoints": [{"step": 1000, "uri": "s3://...", "createdAt": "..."}],
                          "samples": [{"step": 1000, "prompt": "...", "uri": "s3://..."}],
                          "data": {"images": 118, "skipped": 2, "maxSkipped": 5,
                                   "skippedFiles": [{"file": "a.jpg", "reason": "truncated image"}]},
                          "outputs": {"report": "s3://.../report/index.html"}}  (from the first validation on)
    termination message  the same fields at the top level, plus "phase" ("Succeeded" | "Failed"),
                          "exitCode", "reason" ("Completed", "EarlyStopped", ...), "message" and
                          "outputs": {"uri": ..., "lora": {...}}

A nested {"progress": {...}} and an explicit "error" are accepted too. A report that does
not parse is ignored: a garbled read must never break the status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from kubetune.api.status import CheckpointRef, DataReport, Outputs, Progress, SampleRef

STAGE_OF = {
    "starting": "staging", "staging": "staging", "loading": "staging", "resuming": "staging",
    "training": "training", "exporting": "saving", "saving": "saving",
    "succeeded": "done", "failed": "done", "done": "done",
}
"""The trainer's phase (or an explicit stage) -> the operator's stage: staging, training, saving, done."""
EARLY_STOPPED = "EarlyStopped"
"""The trainer's result reason when `training.earlyStopping` ended the run."""
PROGRESS_KEYS = ("step", "totalSteps", "percent", "epoch", "stepLoss", "smoothedLoss", "validationLoss",
                 "imagesPerSecond", "etaSeconds")


@dataclass(frozen=True)
class ProgressReport:
    """One `/progress` reading from rank 0."""

    stage: str | None
    progress: Progress | None
    checkpoints: tuple[CheckpointRef, ...] = ()
    samples: tuple[SampleRef, ...] = ()
    data: DataReport | None = None
    """Images used and skipped, once the trainer has read the dataset."""
    report: str | None = None
    """`outputs.report`: the training report page, written from the first validation on."""


@dataclass(frozen=True)
class ResultReport:
    """Rank 0's termination message once its container ended."""

    outputs: Outputs | None = None
    progress: ProgressReport | None = None
    error: str | None = None
    early_stop: str | None = None
    """The trainer's explanation when early stopping ended a successful run."""


def _model(cls: type[BaseModel], value: Any) -> Any:
    if not isinstance(value, dict):
        return None
    try:
        return cls.model_validate(value)
    except ValidationError:
        return None


def _models(cls: type[BaseModel], values: Any) -> tuple[Any, ...]:
    if not isinstance(values, list):
        return ()
    return tuple(m for m in (_model(cls, v) for v in values) if m is not None)


def _with_percent(progress: Progress) -> Progress:
    if progress.percent is not None or not progress.step or not progress.total_steps:
        return progress
    percent = min(100, progress.step * 100 // progress.total_steps)
    return progress.model_copy(update={"percent": percent})


def parse_progress(doc: Any) -> ProgressReport | None:
    """A `/progress` document (already decoded), or None when it is not one."""
    if not isinstance(doc, dict):
        return None
    fields = {k: v for k, v in doc.items() if k not in ("stage", "phase", "checkpoints", "samples", "outputs", "data")}
    progress = _model(Progress, fields)
    stage = STAGE_OF.get(str(doc.get("stage") or doc.get("phase") or "").lower())
    if progress is not None:
        progress = _with_percent(progress)
    outputs = _model(Outputs, doc.get("outputs"))
    return ProgressReport(stage, progress, _models(CheckpointRef, doc.get("checkpoints")),
                          _models(SampleRef, doc.get("samples")), _model(DataReport, doc.get("data")),
                          outputs.report if outputs is not None else None)


def parse_result(message: str | None) -> ResultReport | None:
    """A termination message; plain text (the log tail on a crash) becomes the error."""
    if not message or not message.strip():
        return None
    try:
        doc = json.loads(message)
    except (ValueError, RecursionError):  # a hostile rank 0 may nest past the parser's depth
        return ResultReport(error=message.strip())
    if not isinstance(doc, dict):
        return ResultReport(error=message.strip())
    if isinstance(doc.get("progress"), dict):
        nested = dict(doc["progress"])
    else:
        nested = {k: doc[k] for k in PROGRESS_KEYS if doc.get(k) is not None}
    nested.update({k: doc[k] for k in ("checkpoints", "samples", "phase", "data", "outputs") if k in doc})
    message = doc.get("message")
    early_stop = message if doc.get("reason") == EARLY_STOPPED and isinstance(message, str) else None
    return ResultReport(_model(Outputs, doc.get("outputs")), parse_progress(nested) if nested else None,
                        _error(doc), early_stop)


def _error(doc: dict[str, Any]) -> str | None:
    if isinstance(doc.get("error"), str):
        return doc["error"]
    if doc.get("phase") == "Failed" and isinstance(doc.get("message"), str):
        return f"{doc.get('reason') or 'Failed'}: {doc['message']}"
    return None
