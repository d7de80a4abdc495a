"""What the UNet latent-diffusion families (SD 1.x/2.x, SDXL) share: a `UNet2DConditionModel` over an
`AutoencoderKL`'s latents, CLIP text encoders, trained on the DDPM objective.

A family of this kind subclasses `UNetFamily` and adds its names, its text encoders and how
their outputs condition the UNet (`encode_text`, `condition`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from kubetune.api.spec import ModelSpec, TrainingSpec
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.models.ddpm import NoisePrediction
from kubetune_trainer.models.family import Components, Conditioning
from kubetune_trainer.models.latent_space import VaeLatents


def load_part(kind: Any, path: Path, subfolder: str, variant: str | None) -> Any:
    try:
        return kind.from_pretrained(str(path), subfolder=subfolder, variant=variant, local_files_only=True)
    except Exception as exc:  # diffusers/transformers raise OSError, ValueError, EnvironmentError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load {subfolder} from model folder {path}: {first}") from exc


def tokenize(tokenizer: Any, captions: list[str], device: Any) -> Any:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


class UNetFamily(VaeLatents):
    """The parts every UNet latent-diffusion family shares; subclasses name their text encoders."""

    denoiser_name: ClassVar[str] = "unet"
    kohya_text_prefixes: ClassVar[tuple[str, ...]]
    kohya_text_roots: ClassVar[tuple[str, ...]]
    text_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    """CLIP's attention projections."""
    pipeline_extras: ClassVar[dict[str, Any]] = {}
    text_encoder_classes: ClassVar[tuple[str, ...]]
    """The transformers class of each text encoder, in order (their tokenizers are CLIPTokenizer)."""
    single_file_layout: ClassVar[str] = "kohya"
    lora_key_format: ClassVar[str] = "diffusers"

    @property
    def lora_text_encoder_names(self) -> tuple[str, ...]:
        return self.text_encoder_names

    def load(self, path: Path, variant: str | None, model: ModelSpec | None = None) -> Components:
        import transformers

        if model is not None:
            for field, value in (("maxSequenceLength", model.max_sequence_length), ("withoutT5", model.without_t5)):
                if value:
                    raise ConfigError(f"model.{field}: {self.display_name} has no T5 text encoder; "
                                      "the field is for SD3 and Flux: remove it")
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        encoders = zip(self.tokenizer_names, self.text_encoder_names, self.text_encoder_classes, strict=True)
        pairs = [(tok_dir, enc_dir, getattr(transformers, enc_cls)) for tok_dir, enc_dir, enc_cls in encoders]
        return Components(
            family=self,
            path=path,
            denoiser=load_part(UNet2DConditionModel, path, "unet", variant),
            vae=load_part(AutoencoderKL, path, "vae", variant),
            noise_scheduler=load_part(DDPMScheduler, path, "scheduler", None),
            tokenizers=[load_part(transformers.CLIPTokenizer, path, tok_dir, None) for tok_dir, _, _ in pairs],
            text_encoders=[load_part(enc_cls, path, enc_dir, variant) for _, enc_dir, enc_cls in pairs],
        )

    def objective(self, components: Components, training: TrainingSpec) -> NoisePrediction:
        if training.flow_matching is not None:
            raise ConfigError(f"training.flowMatching: {self.display_name} trains on the DDPM objective; the "
                              "section is for the flow-matching families (SD3, Flux): remove it")
        return NoisePrediction(components.noise_scheduler)

    def sampling_arguments(self, components: Components) -> dict[str, Any]:
        return {}

    def predict(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning) -> Any:
        return denoiser(noisy, timesteps, cond.encoder_hidden_states, added_cond_kwargs=cond.added_cond_kwargs,
                        return_dict=False)[0]

    def size_multiple(self, components: Components) -> int:
        """The VAE's downsampling times the UNet's."""
        return self.latent_factor(components) * 2 ** (len(components.denoiser.config.down_block_types) - 1)
