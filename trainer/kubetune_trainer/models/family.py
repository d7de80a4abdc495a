"""What a model family provides (`ModelFamily`) and what it builds (`Components`).

A family is one diffusers pipeline class (SD 1.x/2.x, SDXL). It loads its parts from a
diffusers folder and says everything that differs between families: how captions become
the denoiser's conditioning, how images become training latents and back, which objective
the denoiser trains on, how pipelines and LoRA files name its parts, what the model card
calls it. The trainer receives `Components` already built and asks its family, never which
family it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubetune.api.spec import ModelSpec, TrainingSpec

TextEncode = Callable[[list[str]], tuple[Any, ...]]
"""Captions to tensors with one row per caption (what a text cache stores per caption)."""


@dataclass
class Conditioning:
    """What the denoiser needs besides the noisy latents and timesteps."""

    encoder_hidden_states: Any
    added_cond_kwargs: dict[str, Any] | None = None


class TextCache(Protocol):
    """Keeps each caption's encoding while every text encoder is frozen (`caches.text.DiskTextCache`)."""

    def encodings(self, captions: list[str], encode: TextEncode) -> tuple[Any, ...]: ...


class Denoising(Protocol):
    """The training objective of a family's denoiser: how latents are noised and what it must predict."""

    def draw(self, latents: Any, generator: Any, noise_offset: float, device: Any) -> tuple[Any, Any]:
        """Noise and timesteps for `latents`, all drawn from `generator`."""

    def noisy(self, latents: Any, noise: Any, timesteps: Any) -> Any: ...

    def target(self, latents: Any, noise: Any, timesteps: Any) -> Any: ...

    def weights(self, timesteps: Any, snr_gamma: float | None) -> Any:
        """Each image's loss weight (min-SNR when `snr_gamma` is set, else ones)."""


class ModelFamily(Protocol):
    """One entry of `registry.FAMILIES`: everything the trainer does differently per family."""

    name: str
    """Short name ("sd", "sdxl"): part of the text cache's key."""
    display_name: str
    """What the model card calls the family ("Stable Diffusion XL")."""
    short_display_name: str
    """What AUTOMATIC1111 and ComfyUI users call it ("SDXL"): the base a kohya LoRA file is for."""
    hub_tags: tuple[str, ...]
    """The Hugging Face Hub's tags for models of this family, in the model card's metadata."""
    conversion_script: str
    """The script in diffusers' `scripts/` that turns a pipeline folder of this family into one checkpoint
    file, as the model card tells readers of a full fine-tune; "" where diffusers has none (SD3, Flux)."""
    pipeline_class: str
    """The diffusers pipeline class, as `_class_name` in model_index.json names it."""
    denoiser_name: str
    """The denoiser's module name ("unet", "transformer"): its subfolder, pipeline argument and LoRA key prefix."""
    kohya_base: str
    """`ss_base_model_version` of a kohya LoRA file."""
    text_encoder_names: tuple[str, ...]
    """Text encoders' module names (diffusers subfolders and pipeline arguments), in order."""
    tokenizer_names: tuple[str, ...]
    """Their tokenizers' names, in the same order."""
    kohya_text_prefixes: tuple[str, ...]
    """Kohya key prefixes of the text encoders' adapters, in the same order."""
    kohya_text_roots: tuple[str, ...]
    """The module path each text encoder's kohya keys start with, in the same order ("text_model." for
    CLIP, whose classic layout kohya names follow); an adapter key without it gets it."""
    lora_text_encoder_names: tuple[str, ...]
    """The text encoders LoRA adapts when `trainTextEncoder` is set (those the family's LoRA file carries)."""
    lora_key_format: str
    """How the diffusers LoRA file names adapter weights: "diffusers" (`lora_linear_layer.down/up`, what the
    UNet families' loaders expect) or "peft" (`lora_A/lora_B`, the transformer families')."""
    single_file_layout: str
    """The layout of the single LoRA file ComfyUI and AUTOMATIC1111 load: "kohya" (`lora_unet_*` keys, alpha
    tensors) or "diffusers" (ComfyUI reads the diffusers keys; alpha/rank is baked into the up weights)."""
    text_lora_targets: tuple[str, ...]
    """The text encoders' layers LoRA adapts when `trainTextEncoder` is set."""
    pipeline_extras: dict[str, Any]
    """Arguments besides modules, tokenizers and scheduler that build a pipeline of this family."""

    def load(self, path: Path, variant: str | None, model: ModelSpec | None = None) -> Components:
        """Every component from a diffusers folder, as `model`'s family settings ask (text encoders, lengths)."""

    def encode_text(self, components: Components, captions: list[str], device: Any) -> tuple[Any, ...]:
        """The text encoders' outputs, one row per caption; cached per caption while they are frozen."""

    def condition(self, components: Components, encoded: tuple[Any, ...], sizes: list[tuple[int, ...]],
                  device: Any) -> Conditioning:
        """The denoiser's conditioning from `encode_text`'s outputs and each image's size record."""

    def encode(self, components: Components, captions: list[str], sizes: list[tuple[int, ...]],
               device: Any) -> Conditioning:
        """Captions to conditioning, through the components' text cache."""

    def encode_pixels(self, vae: Any, pixels: Any) -> Any:
        """Pixels (N, 3, H, W) to what the latent cache stores per image (the encoder's distribution)."""

    def latents(self, vae: Any, moments: Any, generator: Any) -> Any:
        """Training latents drawn from `encode_pixels`' output."""

    def decode_latents(self, vae: Any, latents: Any, size: tuple[int, int]) -> Any:
        """Pixels (`size` = height, width) from latents a pipeline made (undoing what `latents` applies)."""

    def objective(self, components: Components, training: TrainingSpec) -> Denoising:
        """The family's objective, configured by `training` (a ConfigError for a setting it cannot honour)."""

    def sampling_arguments(self, components: Components) -> dict[str, Any]:
        """Pipeline call arguments that make samples condition as training does."""

    def predict(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning) -> Any:
        """The denoiser's prediction for `noisy` at `timesteps`."""

    def latent_factor(self, components: Components) -> int:
        """Pixels per latent cell along each side."""

    def size_multiple(self, components: Components) -> int:
        """Image sides must divide by this."""


@dataclass
class Components:
    """A loaded model: every module the training method and the family need."""

    family: ModelFamily
    path: Path
    denoiser: Any
    """The network that denoises latents (a UNet or a transformer); the pipeline calls it `family.denoiser_name`."""
    vae: Any
    noise_scheduler: Any
    tokenizers: list[Any]
    text_encoders: list[Any]
    extra: dict[str, Any] = field(default_factory=dict)
    text_cache: TextCache | None = None
    """Where caption encodings are kept while every text encoder is frozen; None encodes every time."""
    compute_dtype: Any = None
    """The dtype frozen weights run in (set by the trainer from `training.mixedPrecision`); None is float32."""

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Every module in eval mode for a while (sampling, validation), then as it was.

        Trained modules run in training mode, where adapter dropout applies; an image or a
        validation loss must not depend on dropout's draw.
        """
        modules = list(self.modules().values())
        modes = [module.training for module in modules]
        for module in modules:
            module.eval()
        try:
            yield
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)

    def modules(self) -> dict[str, Any]:
        """Named modules, the names used for trainable-state keys and LoRA file prefixes."""
        return {self.family.denoiser_name: self.denoiser, "vae": self.vae, **self.named_text_encoders()}

    def named_text_encoders(self) -> dict[str, Any]:
        """The loaded text encoders by name (a family may leave one out, as SD3 without T5)."""
        names = [name for name in self.family.text_encoder_names if name not in self.extra.get("absent", ())]
        return dict(zip(names, self.text_encoders, strict=True))

    def text_encoders_frozen(self) -> bool:
        return not any(p.requires_grad for encoder in self.text_encoders for p in encoder.parameters())

    def encode_text(self, captions: list[str], encode: TextEncode) -> tuple[Any, ...]:
        """`encode(captions)`, through the text cache while no text-encoder weight trains."""
        if self.text_cache is None or not self.text_encoders_frozen():
            return encode(captions)
        return self.text_cache.encodings(captions, encode)
