"""Cross-field rules, each written once as CEL (for the API server) and as Python (for local runs).

The CRD generator attaches every rule to the schema of the class it is declared `on`; the
validator applies the Python side to every instance of that class. Transition rules
(immutability) exist only on the API server, where an old object exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetune.api.spec import (
    DREAMBOOTH_METHODS,
    FULL_METHODS,
    LORA_METHODS,
    DataSpec,
    DreamBoothSpec,
    FineTuneJobSpec,
    MethodSpec,
    TrainingSpec,
)


@dataclass(frozen=True)
class Rule:
    """One cross-field rule. `holds` is None for transition rules (they need oldSelf)."""

    on: type
    cel: str
    message: str
    field_path: str
    holds: Callable[[Any], bool] | None

    def as_validation(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _formats_fit(spec: FineTuneJobSpec) -> bool:
    return "kohya" not in spec.output.formats or spec.method.type in LORA_METHODS


RULES: tuple[Rule, ...] = (
    Rule(
        MethodSpec,
        f"!(self.type in {_cel_list(DREAMBOOTH_METHODS)}) || has(self.dreambooth)",
        "method.dreambooth is required when method.type is dreambooth or dreambooth-lora: "
        "add method.dreambooth.instancePrompt",
        ".dreambooth",
        lambda m: m.type not in DREAMBOOTH_METHODS or m.dreambooth is not None,
    ),
    Rule(
        MethodSpec,
        f"!has(self.dreambooth) || self.type in {_cel_list(DREAMBOOTH_METHODS)}",
        "method.dreambooth applies only to method.type dreambooth or dreambooth-lora: remove it or change method.type",
        ".dreambooth",
        lambda m: m.dreambooth is None or m.type in DREAMBOOTH_METHODS,
    ),
    Rule(
        MethodSpec,
        f"!has(self.lora) || self.type in {_cel_list(LORA_METHODS)}",
        "method.lora applies only to method.type lora or dreambooth-lora: remove it or change method.type",
        ".lora",
        lambda m: m.lora is None or m.type in LORA_METHODS,
    ),
    Rule(
        DreamBoothSpec,
        "!self.priorPreservation || has(self.classPrompt)",
        "method.dreambooth.classPrompt is required when priorPreservation is true: set it "
        '(e.g. "a photo of a dog") or set priorPreservation: false',
        ".classPrompt",
        lambda d: not d.prior_preservation or d.class_prompt is not None,
    ),
    Rule(
        TrainingSpec,
        "has(self.maxSteps) != has(self.epochs)",
        "set exactly one of training.maxSteps and training.epochs",
        ".maxSteps",
        lambda t: (t.max_steps is None) != (t.epochs is None),
    ),
    Rule(
        TrainingSpec,
        "!has(self.maxSteps) || self.lrScheduler.warmupSteps < self.maxSteps",
        "training.lrScheduler.warmupSteps must be less than training.maxSteps",
        ".lrScheduler.warmupSteps",
        lambda t: t.max_steps is None or t.lr_scheduler.warmup_steps < t.max_steps,
    ),
    Rule(
        DataSpec,
        "self.resolution % 8 == 0",
        "data.resolution must be a multiple of 8 (the VAE downsamples by 8), e.g. 512, 768 or 1024",
        ".resolution",
        lambda d: d.resolution % 8 == 0,
    ),
    Rule(
        FineTuneJobSpec,
        "!has(self.training.earlyStopping) || self.data.validationFraction > 0.0",
        "training.earlyStopping needs held-out data: set data.validationFraction above 0 (e.g. 0.05)",
        ".training.earlyStopping",
        lambda s: s.training.early_stopping is None or s.data.validation_fraction > 0,
    ),
    Rule(
        FineTuneJobSpec,
        f"!has(self.training.ema) || self.method.type in {_cel_list(FULL_METHODS)}",
        "training.ema applies to full fine-tunes only (method.type full or dreambooth): remove it",
        ".training.ema",
        lambda s: s.training.ema is None or s.method.type in FULL_METHODS,
    ),
    Rule(
        FineTuneJobSpec,
        f"!has(self.training.parallelism) || self.training.parallelism != 'fsdp' || "
        f"self.method.type in {_cel_list(FULL_METHODS)}",
        "training.parallelism fsdp shards a full fine-tune (method.type full or dreambooth); a LoRA's few weights "
        "train with ddp: remove it",
        ".training.parallelism",
        lambda s: s.training.parallelism != "fsdp" or s.method.type in FULL_METHODS,
    ),
    Rule(
        TrainingSpec,
        "!has(self.parallelism) || self.parallelism != 'fsdp' || !has(self.optimizer) || self.optimizer == 'adamw'",
        "training.parallelism fsdp needs optimizer adamw: adamw8bit cannot update sharded weights and prodigy would "
        "estimate its step size from each rank's shard alone",
        ".optimizer",
        lambda t: t.parallelism != "fsdp" or t.optimizer == "adamw",
    ),
    Rule(
        TrainingSpec,
        "!has(self.fsdp) || self.parallelism == 'fsdp'",
        "training.fsdp configures parallelism fsdp: set training.parallelism to fsdp or remove it",
        ".fsdp",
        lambda t: t.fsdp is None or t.parallelism == "fsdp",
    ),
    Rule(
        TrainingSpec,
        "!has(self.ema) || !has(self.parallelism) || self.parallelism != 'fsdp'",
        "training.ema is not available with parallelism fsdp yet (the average would need sharding too): "
        "remove one of them",
        ".ema",
        lambda t: t.ema is None or t.parallelism != "fsdp",
    ),
    Rule(
        FineTuneJobSpec,
        "self.resources.gpusPerNode > 0 || !has(self.training.fsdp) || !self.training.fsdp.cpuOffload",
        "training.fsdp.cpuOffload needs GPUs: remove it when resources.gpusPerNode is 0",
        ".training.fsdp.cpuOffload",
        lambda s: s.resources.gpus_per_node > 0 or s.training.fsdp is None or not s.training.fsdp.cpu_offload,
    ),
    Rule(
        FineTuneJobSpec,
        f"!has(self.output.formats) || !('kohya' in self.output.formats) || "
        f"self.method.type in {_cel_list(LORA_METHODS)}",
        "output.formats kohya is a LoRA format: use it with method.type lora or dreambooth-lora",
        ".output.formats",
        _formats_fit,
    ),
    Rule(
        FineTuneJobSpec,
        "self.resources.gpusPerNode > 0 || self.training.mixedPrecision != 'fp16'",
        "training.mixedPrecision fp16 needs GPUs: use bf16 or no when resources.gpusPerNode is 0",
        ".training.mixedPrecision",
        lambda s: s.resources.gpus_per_node > 0 or s.training.mixed_precision != "fp16",
    ),
    Rule(
        FineTuneJobSpec,
        "self.model == oldSelf.model",
        "spec.model is immutable; create a new FineTuneJob",
        ".model",
        None,
    ),
    Rule(
        FineTuneJobSpec,
        "self.method == oldSelf.method",
        "spec.method is immutable; create a new FineTuneJob",
        ".method",
        None,
    ),
    Rule(
        FineTuneJobSpec, "self.data == oldSelf.data", "spec.data is immutable; create a new FineTuneJob", ".data", None
    ),
)


def rules_for(cls: type) -> list[Rule]:
    return [r for r in RULES if r.on is cls]
