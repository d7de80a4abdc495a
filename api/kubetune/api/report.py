"""What rank 0 of the trainer tells the operator: its `/progress` document and its result.

Two JSON documents cross from the trainer to the operator, both in the status field names
(camelCase on the wire, snake_case in Python, as every API type):

- `TrainerProgress`, served at `/progress` while the trainer runs and polled by the operator;
- `TrainerResult`, the run's end: printed, written to `--status-file` and, in a pod, to the
  termination message (at most 4096 bytes: the trainer drops older samples, skipped file names
  and older checkpoints first, see `kubetune_trainer.job.termination_message`).

Both are built from the status types (`CheckpointRef`, `SampleRef`, `Outputs`, `DataReport`), so
what the trainer writes is a piece of status the operator merges. The trainer builds these
models and serialises them with `wire()`; the operator validates what it reads against them
(`kubetune.operator.reports`), keeping the sections that validate: a garbled read must never
break the status. Like every status object they may grow fields without breaking readers.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_serializer

from kubetune.api.base import StatusModel
from kubetune.api.status import CheckpointRef, DataReport, Outputs, Progress, SampleRef

TRAINER_PHASES: tuple[str, ...] = ("Starting", "Staging", "Loading", "Resuming", "Training", "Exporting",
                                   "Succeeded", "Failed")
"""What the trainer is doing, in order; a result's phase is Succeeded or Failed."""
COMPLETED = "Completed"
"""A successful result's reason when training ran to `totalSteps`."""
EARLY_STOPPED = "EarlyStopped"
"""A successful result's reason when `training.earlyStopping` ended the run; its message says why."""


def _progress_field(name: str) -> Any:
    """A progress field as `status.progress` describes it."""
    return Field(default=None, description=Progress.model_fields[name].description)


Step = Annotated[int | None, _progress_field("step")]
TotalSteps = Annotated[int | None, _progress_field("total_steps")]
Epoch = Annotated[int | None, _progress_field("epoch")]
StepLoss = Annotated[float | None, _progress_field("step_loss")]
SmoothedLoss = Annotated[float | None, _progress_field("smoothed_loss")]
ValidationLoss = Annotated[float | None, _progress_field("validation_loss")]
Checkpoints = Annotated[list[CheckpointRef], Field(default_factory=list,
                                                   description="Complete checkpoints, newest last (the newest 32).")]
Samples = Annotated[list[SampleRef], Field(default_factory=list, description="The latest sample images.")]
ReportedOutputs = Annotated[Outputs | None, Field(
    default=None, description="The report page from the first validation on; the weights once exported.")]
Data = Annotated[DataReport | None, Field(
    default=None, description="Images used and skipped, naming the first few skipped files.")]


class _Wire(StatusModel):
    """A trainer document: `wire()` is its JSON form, every field present (null when unknown), except
    that `outputs` names only what was written."""

    @field_serializer("outputs", check_fields=False)
    def _written_outputs(self, outputs: Outputs | None) -> dict[str, Any] | None:
        return None if outputs is None else outputs.model_dump(by_alias=True, exclude_none=True)

    def wire(self) -> dict[str, Any]:
        """The document as JSON values (floats kept as they are: a NaN loss stays NaN)."""
        return self.model_dump(by_alias=True)

    def progress(self) -> Progress:
        """The `status.progress` fields this document carries (`percent` and `updatedAt` are the operator's)."""
        return Progress.model_validate({name: getattr(self, name) for name in Progress.model_fields
                                        if name in type(self).model_fields})


class TrainerProgress(_Wire):
    """The `/progress` document: where rank 0 is, both losses, throughput, and what it wrote so far."""

    phase: str | None = Field(
        default=None, validation_alias=AliasChoices("phase", "stage"),
        description="One of TRAINER_PHASES (any case); `stage` is accepted for it. The operator maps it to its "
        "stage: staging, training, saving or done.")
    step: Step
    total_steps: TotalSteps
    epoch: Epoch
    step_loss: StepLoss
    smoothed_loss: SmoothedLoss
    validation_loss: ValidationLoss
    images_per_second: float | None = _progress_field("images_per_second")
    eta_seconds: int | None = _progress_field("eta_seconds")
    loss_terms: dict[str, float] | None = Field(
        default=None, description="The step loss by term (DreamBooth: instance, prior); null for one-term methods.")
    checkpoints: Checkpoints
    samples: Samples
    outputs: ReportedOutputs
    data: Data


class TrainerResult(_Wire):
    """How a run ended: the termination message and `--status-file`. The progress fields are the last
    `/progress` reading's; `outputs` holds the exported weights (and their step) when the run succeeded."""

    phase: str | None = Field(default=None, description="Succeeded or Failed (always written).")
    exit_code: int | None = Field(default=None, description="The process's exit code (always written).")
    reason: str = Field(default="", description="CamelCase: Completed, EarlyStopped, or why it failed.")
    message: str = Field(default="", description="One line: what happened, or what to do.")
    step: Step
    total_steps: TotalSteps
    epoch: Epoch
    step_loss: StepLoss
    smoothed_loss: SmoothedLoss
    validation_loss: ValidationLoss
    checkpoints: Checkpoints
    samples: Samples
    outputs: ReportedOutputs
    data: Data

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"
