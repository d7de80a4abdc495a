"""What rank 0 tells the operator: its `/progress` JSON and its termination message.

Both use the status field names (camelCase; snake_case accepted), so the trainer writes
a piece of status and the operator merges it:

    /progress            {"stage": "staging" | "training", "step": 1200, "totalSteps": 2000,
                          "epoch": 3, "loss": 0.083, "validationLoss": 0.091,
                          "imagesPerSecond": 41.5, "etaSeconds": 310,
                          "checkpoints": [{"step": 1000, "uri": "s3://...", "createdAt": "..."}],
                          "samples": [{"step": 1000, "prompt": "...", "uri": "s3://..."}]}
    termination message  {"outputs": {"uri": ..., "lora": {"diffusers": ..., "kohya": ...}},
                          "progress": {...}, "checkpoints": [...], "samples": [...],
                          "error": "why it failed"}

A report that does not parse is ignored: a garbled read must never break the status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from kubetune.api.status import CheckpointRef, Outputs, Progress, SampleRef

STAGES = ("staging", "training", "saving", "done")


@dataclass(frozen=True)
class ProgressReport:
    """One `/progress` reading from rank 0."""

    stage: str | None
    progress: Progress | None
    checkpoints: tuple[CheckpointRef, ...] = ()
    samples: tuple[SampleRef, ...] = ()


@dataclass(frozen=True)
class ResultReport:
    """Rank 0's termination message once its container ended."""

    outputs: Outputs | None = None
    progress: ProgressReport | None = None
    error: str | None = None


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
    fields = {k: v for k, v in doc.items() if k not in ("stage", "checkpoints", "samples")}
    progress = _model(Progress, fields)
    stage = doc.get("stage") if doc.get("stage") in STAGES else None
    if progress is not None:
        progress = _with_percent(progress)
    return ProgressReport(stage, progress, _models(CheckpointRef, doc.get("checkpoints")),
                          _models(SampleRef, doc.get("samples")))


def parse_result(message: str | None) -> ResultReport | None:
    """A termination message; plain text (the log tail on a crash) becomes the error."""
    if not message or not message.strip():
        return None
    try:
        doc = json.loads(message)
    except ValueError:
        return ResultReport(error=message.strip())
    if not isinstance(doc, dict):
        return ResultReport(error=message.strip())
    nested = dict(doc.get("progress") or {}) if isinstance(doc.get("progress"), dict) else {}
    nested.update({k: doc[k] for k in ("checkpoints", "samples") if k in doc})
    error = doc.get("error") if isinstance(doc.get("error"), str) else None
    return ResultReport(_model(Outputs, doc.get("outputs")), parse_progress(nested) if nested else None, error)
