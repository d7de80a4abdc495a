"""What rank 0 tells the operator, read into what a pass needs.

The trainer writes two documents, typed in `kubetune.api.report`: `TrainerProgress` at
`/progress` while it runs, `TrainerResult` in its termination message when it ends. Both carry
status field names (camelCase; snake_case accepted), so the trainer writes a piece of status and
the operator merges it. The trainer's phase maps to the operator's stage (`STAGE_OF`).

A document is validated against its type section by section: a field or list entry that does
not validate is left out and the rest kept, and a document that is not a JSON object is none (a
termination message in plain text, the log tail of a crash, becomes the error). A garbled read
must never break the status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kubetune.api.report import EARLY_STOPPED, TrainerProgress, TrainerResult
from kubetune.api.status import CheckpointRef, DataReport, Outputs, Progress, SampleRef

STAGE_OF = {
    "starting": "staging", "staging": "staging", "loading": "staging", "resuming": "staging",
    "training": "training", "exporting": "saving", "saving": "saving",
    "succeeded": "done", "failed": "done", "done": "done",
}
"""The trainer's phase (or an explicit stage) -> the operator's stage: staging, training, saving, done."""
RESULT_PROGRESS = ("step", "totalSteps", "epoch", "stepLoss", "smoothedLoss", "validationLoss", "checkpoints",
                   "samples", "phase", "data", "outputs")
"""A result that carries none of these (only a message) has no progress to report."""

Model = TypeVar("Model", bound=BaseModel)


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


def validate_sections(model: type[Model], doc: Any) -> Model | None:
    """`doc` as `model`, leaving out each field or list entry that does not validate; None if `doc` is not
    an object or what remains still does not validate (a required field is missing or wrong)."""
    if not isinstance(doc, dict):
        return None
    doc = dict(doc)
    for _ in range(len(doc) + 1):  # each round leaves out at least one field or entry
        try:
            return model.model_validate(doc)
        except ValidationError as exc:
            if not _leave_out(doc, exc):
                return None
    return None


def _leave_out(doc: dict[str, Any], exc: ValidationError) -> bool:
    """Remove what `exc` names from `doc`: a whole field, or one entry of a list field. False: nothing to remove."""
    removed, entries = False, {}
    for error in exc.errors():
        loc = error["loc"]
        if not loc or loc[0] not in doc:
            continue
        key = loc[0]
        if len(loc) > 1 and isinstance(loc[1], int) and isinstance(doc[key], list):
            entries.setdefault(key, set()).add(loc[1])
        else:
            del doc[key]
            removed = True
    for key, bad in entries.items():
        if key in doc:
            doc[key] = [entry for i, entry in enumerate(doc[key]) if i not in bad]
            removed = True
    return removed


def _with_percent(progress: Progress) -> Progress:
    if progress.percent is not None or not progress.step or not progress.total_steps:
        return progress
    percent = min(100, progress.step * 100 // progress.total_steps)
    return progress.model_copy(update={"percent": percent})


def _reading(doc: TrainerProgress | TrainerResult) -> ProgressReport:
    outputs = doc.outputs
    return ProgressReport(STAGE_OF.get((doc.phase or "").lower()), _with_percent(doc.progress()),
                          tuple(doc.checkpoints), tuple(doc.samples), doc.data,
                          outputs.report if outputs is not None else None)


def parse_progress(doc: Any) -> ProgressReport | None:
    """A `/progress` document (already decoded), or None when it is not one."""
    report = validate_sections(TrainerProgress, doc)
    return _reading(report) if report is not None else None


def parse_result(message: str | None) -> ResultReport | None:
    """A termination message; plain text (the log tail on a crash) becomes the error."""
    if not message or not message.strip():
        return None
    try:
        doc = json.loads(message)
    except (ValueError, RecursionError):  # a hostile rank 0 may nest past the parser's depth
        return ResultReport(error=message.strip())
    result = validate_sections(TrainerResult, doc)
    if result is None:
        return ResultReport(error=message.strip())
    said = "message" in result.model_fields_set
    error = f"{result.reason or 'Failed'}: {result.message}" if result.failed and said else None
    early_stop = result.message if result.reason == EARLY_STOPPED and said else None
    has_progress = any(key in doc for key in RESULT_PROGRESS)
    return ResultReport(result.outputs, _reading(result) if has_progress else None, error, early_stop)
