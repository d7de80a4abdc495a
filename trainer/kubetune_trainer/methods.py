"""Training methods, picked by `spec.method.type` from `METHODS`: what trains and what is exported.

A method attaches or unfreezes the trainable weights on already-loaded components and
writes the final files. The training loop is the same for every method.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from kubetune.api.resource import FineTuneJob
from kubetune.api.spec import LoraSpec
from kubetune_trainer import lora_files
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.models.family import Components
from kubetune_trainer.models.pipelines import export_pipeline


class TrainingMethod(Protocol):
    def prepare(self, components: Components) -> dict[str, Any]:
        """Make the method's weights trainable; return the modules that hold them, by `Components.modules` name."""

    def export(self, components: Components, folder: Path, job: FineTuneJob, step: int) -> dict[str, Path]:
        """Write the final files into `folder`; return {output kind: file or folder}."""


class LoraMethod:
    """Low-rank adapters (peft) on the UNet attention projections, optionally the text encoders
    (on the layers their family names in `text_lora_targets`)."""

    def __init__(self, spec: LoraSpec) -> None:
        self.spec = spec

    def _config(self, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(r=self.spec.rank, lora_alpha=self.spec.alpha, lora_dropout=self.spec.dropout,
                          init_lora_weights="gaussian", target_modules=targets)

    def prepare(self, components: Components) -> dict[str, Any]:
        if self.spec.train_text_encoder and not components.family.lora_text_encoder_names:
            raise ConfigError(f"method.lora.trainTextEncoder: {components.family.display_name}'s LoRA file carries "
                              "no text-encoder adapters; remove the field")
        components.denoiser.add_adapter(self._config(list(self.spec.target_modules)))
        trained = {components.family.denoiser_name: components.denoiser}
        if self.spec.train_text_encoder:
            for name, encoder in lora_files.lora_text_encoders(components).items():
                encoder.add_adapter(self._config(list(components.family.text_lora_targets)))
                trained[name] = encoder
        for module in trained.values():
            for param in module.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        return trained

    def export(self, components: Components, folder: Path, job: FineTuneJob, step: int) -> dict[str, Path]:
        formats = job.spec.output.formats or ["diffusers", "kohya"]
        layers = lora_files.adapter_layers(components, self.spec.train_text_encoder)
        writers = {"diffusers": lora_files.write_diffusers, "kohya": lora_files.write_kohya}
        return {fmt: writers[fmt](components, layers, self.spec, folder, job, step) for fmt in formats}


class FullMethod:
    """Every UNet weight trains; the output is a complete diffusers pipeline folder."""

    def prepare(self, components: Components) -> dict[str, Any]:
        components.denoiser.requires_grad_(True)
        components.denoiser.float()
        return {components.family.denoiser_name: components.denoiser}

    def export(self, components: Components, folder: Path, job: FineTuneJob, step: int) -> dict[str, Path]:
        target = folder / "pipeline"
        export_pipeline(components, job.spec.model.variant).save_pretrained(str(target))
        return {"pipeline": target}


def _lora(job: FineTuneJob) -> TrainingMethod:
    return LoraMethod(job.spec.method.lora or LoraSpec())


def _full(job: FineTuneJob) -> TrainingMethod:
    return FullMethod()


METHODS: dict[str, Callable[[FineTuneJob], TrainingMethod]] = {
    "lora": _lora, "dreambooth-lora": _lora, "full": _full, "dreambooth": _full,
}
"""DreamBooth differs in its data (see `dreambooth`), not in what trains."""


def build_method(job: FineTuneJob) -> TrainingMethod:
    """The method `spec.method.type` names, or a ConfigError for one this trainer lacks."""
    kind = job.spec.method.type
    if kind not in METHODS:
        raise ConfigError(f"method.type {kind!r} is not implemented by this trainer; available: {', '.join(METHODS)}")
    return METHODS[kind](job)
