"""The FineTuneJob status: what the operator writes back and users read.

The operator computes a whole `FineTuneJobStatus` from the observed children each pass;
these classes also give the CRD its status schema.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune.api.base import StatusModel

Phase = Literal["Pending", "Staging", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]
PHASES: tuple[str, ...] = ("Pending", "Staging", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
CONDITION_TYPES: tuple[str, ...] = ("Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed")


class Condition(StatusModel):
    """A standard metav1.Condition."""

    type: str = Field(
        description="Created, Running, Restarting, Suspended, Succeeded, Failed; DataSkipped: images left out."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable details.")
    last_transition_time: str | None = Field(default=None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="Spec generation the condition reflects.")


class Workers(StatusModel):
    """Trainer pods by state."""

    active: int = Field(default=0, description="Pods running or pending.")
    ready: int = Field(default=0, description="Pods ready.")
    succeeded: int = Field(default=0, description="Pods succeeded.")
    failed: int = Field(default=0, description="Pods failed in the current attempt.")


class Progress(StatusModel):
    """Training progress reported by rank 0."""

    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    percent: int | None = Field(default=None, description="step / totalSteps in percent.")
    epoch: int | None = Field(default=None, description="Current epoch.")
    step_loss: float | None = Field(
        default=None, description="Step loss: the raw training loss of the latest optimizer step."
    )
    smoothed_loss: float | None = Field(
        default=None,
        description="Smoothed loss: exponential moving average of the step loss (0.9 x previous + 0.1 x step "
        "loss); the Loss column. Renamed from `loss`.",
    )
    validation_loss: float | None = Field(default=None, description="Latest validation loss.")
    images_per_second: float | None = Field(default=None, description="Training throughput, all ranks.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds to completion.")
    updated_at: str | None = Field(default=None, description="When this progress was read (RFC 3339).")


class CheckpointRef(StatusModel):
    """A complete checkpoint."""

    step: int = Field(description="Step the checkpoint was taken at.")
    uri: str = Field(description="Checkpoint folder URI.")
    created_at: str | None = Field(default=None, description="When it was completed (RFC 3339).")


class SampleRef(StatusModel):
    """A validation image."""

    step: int = Field(description="Step the sample was generated at.")
    prompt: str = Field(description="Prompt used.")
    uri: str = Field(description="Image URI.")


class LoraOutputs(StatusModel):
    """LoRA files written at the end."""

    diffusers: str | None = Field(
        default=None, description="pytorch_lora_weights.safetensors (pipe.load_lora_weights)."
    )
    kohya: str | None = Field(default=None, description="Single-file kohya LoRA for A1111/ComfyUI.")


class SkippedFile(StatusModel):
    """One image left out of training, and why."""

    file: str = Field(description="The file as named in the dataset (key relative to data.uri).")
    reason: str = Field(description="Why it was skipped, e.g. truncated image, missing file, caption not UTF-8.")


class DataReport(StatusModel):
    """What the trainer made of the dataset: images used and images skipped (data.maxSkipped)."""

    images: int = Field(default=0, description="Images used for training and validation.")
    skipped: int = Field(default=0, description="Images skipped as unreadable, missing or badly captioned.")
    max_skipped: int = Field(default=0, description="data.maxSkipped: more skipped images fail the job.")
    skipped_files: list[SkippedFile] = Field(
        default_factory=list, description="The first few skipped files with reasons (the log names all)."
    )


class Outputs(StatusModel):
    """Results: the report from the first validation on; the weights and their step when the job succeeds."""

    uri: str | None = Field(default=None, description="Folder holding every output.")
    lora: LoraOutputs | None = Field(default=None, description="LoRA files, for LoRA methods.")
    pipeline: str | None = Field(default=None, description="Diffusers pipeline folder, for full methods.")
    report: str | None = Field(
        default=None, description="Training report page (report/index.html), from the first validation on."
    )
    step: int | None = Field(default=None, description="The step whose weights the outputs hold.")
    reason: str | None = Field(
        default=None,
        description="Why that step: BestValidationLoss, LastStep (output.export last, or no validation split).",
    )


class FineTuneJobStatus(StatusModel):
    """Observed state, recomputed from the children on every pass."""

    phase: Phase | None = Field(
        default=None, description="Pending, Staging, Running, Restarting, Suspended, Succeeded or Failed."
    )
    message: str = Field(default="", description="Why the job is in this phase.")
    observed_generation: int | None = Field(default=None, description="Spec generation this status reflects.")
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions.")
    start_time: str | None = Field(default=None, description="When training pods were first created.")
    completion_time: str | None = Field(default=None, description="When the job finished.")
    restarts: int = Field(default=0, description="Restarts so far (node disruptions not counted).")
    workers: Workers | None = Field(default=None, description="Trainer pods by state.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    checkpoints: list[CheckpointRef] = Field(default_factory=list, description="Complete checkpoints, newest last.")
    outputs: Outputs | None = Field(default=None, description="The report while running; the weights once succeeded.")
    samples: list[SampleRef] = Field(default_factory=list, description="Latest validation images.")
    data: DataReport | None = Field(default=None, description="Images used and skipped, once the data is read.")
