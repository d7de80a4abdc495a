"""What the flow-matching transformer families (SD3, Flux) share: a diffusion transformer over an
`AutoencoderKL`'s 16-channel latents, CLIP and T5 text encoders, trained on the flow-matching objective.

A family of this kind subclasses `TransformerFamily`, names its transformer and text encoders, and
says how their outputs condition the transformer (`encode_text`, `condition`) and how it is called
(`predict`). Its T5 reads `model.maxSequenceLength` tokens (the family's default when omitted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from kubetune.api.spec import FlowMatchingSpec, ModelSpec, TrainingSpec
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.models.family import Components, Conditioning
from kubetune_trainer.models.flow import FlowMatching
from kubetune_trainer.models.latent_space import VaeLatents
from kubetune_trainer.models.unet_family import load_part

T5_TOKENS = "max_sequence_length"
"""`Components.extra` key: the T5 sequence length this job encodes captions to."""


def t5_encode(tokenizer: Any, encoder: Any, captions: list[str], length: int, device: Any) -> Any:
    """T5's last hidden state over `length` tokens (padded, cut), as the families' pipelines encode."""
    ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    return encoder(ids.to(device), output_hidden_states=False)[0]


class TransformerFamily(VaeLatents):
    """The parts every flow-matching transformer family shares; subclasses add their text encoders."""

    denoiser_name: ClassVar[str] = "transformer"
    transformer_class: ClassVar[str]
    """The diffusers class of the transformer."""
    text_encoder_classes: ClassVar[tuple[str, ...]]
    tokenizer_classes: ClassVar[tuple[str, ...]]
    lora_text_encoder_names: ClassVar[tuple[str, ...]]
    """The CLIP encoders: the ones the family's LoRA file can carry adapters for (never T5)."""
    kohya_text_prefixes: ClassVar[tuple[str, ...]] = ()
    kohya_text_roots: ClassVar[tuple[str, ...]] = ()
    text_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    pipeline_extras: ClassVar[dict[str, Any]] = {}
    default_sequence_length: ClassVar[int]
    single_file_layout: ClassVar[str] = "diffusers"
    lora_key_format: ClassVar[str] = "peft"
    """ComfyUI reads these families' diffusers LoRA keys; the single file is that layout with alpha baked in."""

    def load(self, path: Path, variant: str | None, model: ModelSpec | None = None) -> Components:
        import diffusers
        import transformers

        model = model or ModelSpec(uri=str(path))
        names = self.encoders_to_load(model)
        parts = zip(self.tokenizer_names, self.text_encoder_names, self.tokenizer_classes, self.text_encoder_classes,
                    strict=True)
        chosen = [part for part in parts if part[1] in names]
        return Components(
            family=self,
            path=path,
            denoiser=load_part(getattr(diffusers, self.transformer_class), path, self.denoiser_name, variant),
            vae=load_part(diffusers.AutoencoderKL, path, "vae", variant),
            noise_scheduler=load_part(diffusers.FlowMatchEulerDiscreteScheduler, path, "scheduler", None),
            tokenizers=[load_part(getattr(transformers, tok_cls), path, tok_dir, None)
                        for tok_dir, _, tok_cls, _ in chosen],
            text_encoders=[load_part(getattr(transformers, enc_cls), path, enc_dir, variant)
                           for _, enc_dir, _, enc_cls in chosen],
            extra={T5_TOKENS: model.max_sequence_length or self.default_sequence_length,
                   "absent": tuple(name for name in self.text_encoder_names if name not in names)},
        )

    def encoders_to_load(self, model: ModelSpec) -> tuple[str, ...]:
        """The text encoders this job uses (all of the family's unless `model.withoutT5` drops one)."""
        if model.without_t5:
            raise ConfigError(f"model.withoutT5: only SD3 can leave its T5 text encoder out; {self.display_name} "
                              "cannot: remove the field")
        return self.text_encoder_names

    def sequence_length(self, components: Components) -> int:
        return int(components.extra.get(T5_TOKENS, self.default_sequence_length))

    def predict(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning) -> Any:
        raise NotImplementedError

    def objective(self, components: Components, training: TrainingSpec) -> FlowMatching:
        if training.snr_gamma is not None:
            raise ConfigError(f"training.snrGamma: min-SNR weighting is for the UNet families' DDPM objective; "
                              f"{self.display_name} trains on flow matching: remove it, or weight by "
                              "training.flowMatching.lossWeighting (sigma_sqrt, cosmap)")
        settings = training.flow_matching or FlowMatchingSpec()
        return FlowMatching(components.noise_scheduler, settings, lambda latents: self.tokens(components, latents))

    def tokens(self, components: Components, latents: Any) -> int:
        """The transformer's image tokens for one latent image (its patches)."""
        patch = self.patch_size(components)
        return (latents.shape[-2] // patch) * (latents.shape[-1] // patch)

    def patch_size(self, components: Components) -> int:
        return int(components.denoiser.config.patch_size)

    def size_multiple(self, components: Components) -> int:
        """The VAE's downsampling times the transformer's patch."""
        return self.latent_factor(components) * self.patch_size(components)

    def sampling_arguments(self, components: Components) -> dict[str, Any]:
        """What the family's pipeline needs to sample as training conditions (its T5 sequence length)."""
        return {T5_TOKENS: self.sequence_length(components)}
