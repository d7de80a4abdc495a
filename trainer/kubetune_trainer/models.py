"""Model families: detect SD 1.x/2.x or SDXL from model_index.json and assemble its components.

Each family knows how to load its parts from a diffusers folder, turn captions into the
UNet's conditioning, and rebuild a pipeline for sampling and export. The trainer receives
`Components` already built and never asks which family it has. While every text encoder is
frozen, each caption's encoding is computed once and kept (`PromptCache`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubetune_trainer.exitcodes import ConfigError


@dataclass
class Conditioning:
    """What the UNet needs besides the noisy latents and timesteps."""

    encoder_hidden_states: Any
    added_cond_kwargs: dict[str, Any] | None = None


class PromptCache:
    """Text-encoder outputs per caption, on the device, up to `limit_bytes`; the rest is encoded each time.

    Only valid while the text encoders are frozen (eval mode, no dropout): `Components.encode_text`
    bypasses it as soon as any text-encoder weight trains.
    """

    def __init__(self, limit_bytes: int = 1 << 30) -> None:
        self.rows: dict[str, tuple[Any, ...]] = {}
        self.limit_bytes, self.bytes = limit_bytes, 0
        self.hits = self.misses = 0

    def lookup(self, captions: list[str], encode: Callable[[list[str]], tuple[Any, ...]]) -> tuple[Any, ...]:
        """`encode(captions)` gives tensors with one row per caption; cached rows are not encoded again."""
        import torch

        missing = list(dict.fromkeys(c for c in captions if c not in self.rows))
        fresh: dict[str, tuple[Any, ...]] = {}
        if missing:
            outputs = encode(missing)
            for index, caption in enumerate(missing):
                fresh[caption] = tuple(output[index].detach() for output in outputs)
                size = sum(t.numel() * t.element_size() for t in fresh[caption])
                if self.bytes + size <= self.limit_bytes:
                    self.rows[caption] = tuple(t.clone() for t in fresh[caption])
                    self.bytes += size
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        rows = [self.rows[c] if c in self.rows else fresh[c] for c in captions]
        return tuple(torch.stack([row[part] for row in rows]) for part in range(len(rows[0])))


@dataclass
class Components:
    """A loaded model: every module the training method and the family need."""

    family: ModelFamily
    path: Path
    unet: Any
    vae: Any
    noise_scheduler: Any
    tokenizers: list[Any]
    text_encoders: list[Any]
    extra: dict[str, Any] = field(default_factory=dict)
    prompts: PromptCache = field(default_factory=PromptCache)
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
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        return {"unet": self.unet, "vae": self.vae, **dict(zip(names, self.text_encoders, strict=True))}

    def encode_text(self, captions: list[str], encode: Callable[[list[str]], tuple[Any, ...]]) -> tuple[Any, ...]:
        """`encode(captions)`, through the prompt cache while no text-encoder weight trains."""
        if any(p.requires_grad for encoder in self.text_encoders for p in encoder.parameters()):
            return encode(captions)
        return self.prompts.lookup(captions, encode)


class ModelFamily(Protocol):
    name: str
    pipeline_class: str
    kohya_base: str

    def load(self, path: Path, variant: str | None) -> Components: ...

    def encode(self, components: Components, captions: list[str], sizes: list[tuple[int, ...]],
               device: Any) -> Conditioning: ...


def _load(kind: Any, path: Path, subfolder: str, variant: str | None) -> Any:
    try:
        return kind.from_pretrained(str(path), subfolder=subfolder, variant=variant, local_files_only=True)
    except Exception as exc:  # diffusers/transformers raise OSError, ValueError, EnvironmentError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load {subfolder} from model folder {path}: {first}") from exc


def _tokenize(tokenizer: Any, captions: list[str], device: Any) -> Any:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


def _common(path: Path, variant: str | None, encoders: list[tuple[str, Any, str, Any]]) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    return dict(
        path=path,
        unet=_load(UNet2DConditionModel, path, "unet", variant),
        vae=_load(AutoencoderKL, path, "vae", variant),
        noise_scheduler=_load(DDPMScheduler, path, "scheduler", None),
        tokenizers=[_load(tok_cls, path, tok_dir, None) for tok_dir, tok_cls, _, _ in encoders],
        text_encoders=[_load(enc_cls, path, enc_dir, variant) for _, _, enc_dir, enc_cls in encoders],
    )


class StableDiffusion:
    """SD 1.x and 2.x: one CLIP text encoder, conditioning on its last hidden state."""

    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    kohya_base = "sd_v1"

    def load(self, path: Path, variant: str | None) -> Components:
        from transformers import CLIPTextModel, CLIPTokenizer

        parts = _common(path, variant, [("tokenizer", CLIPTokenizer, "text_encoder", CLIPTextModel)])
        return Components(family=self, **parts)

    def encode(self, components: Components, captions: list[str], sizes: list[tuple[int, ...]],
               device: Any) -> Conditioning:
        def hidden_states(texts: list[str]) -> tuple[Any, ...]:
            ids = _tokenize(components.tokenizers[0], texts, device)
            return (components.text_encoders[0](ids, return_dict=False)[0],)

        return Conditioning(components.encode_text(captions, hidden_states)[0])


class StableDiffusionXL:
    """SDXL: two text encoders (penultimate hidden states), pooled embeds and add_time_ids."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    kohya_base = "sdxl_base_v1-0"

    def load(self, path: Path, variant: str | None) -> Components:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        parts = _common(path, variant, [
            ("tokenizer", CLIPTokenizer, "text_encoder", CLIPTextModel),
            ("tokenizer_2", CLIPTokenizer, "text_encoder_2", CLIPTextModelWithProjection),
        ])
        return Components(family=self, **parts)

    def encode(self, components: Components, captions: list[str], sizes: list[tuple[int, ...]],
               device: Any) -> Conditioning:
        import torch

        def hidden_and_pooled(texts: list[str]) -> tuple[Any, ...]:
            hidden, pooled = [], None
            for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
                out = encoder(_tokenize(tokenizer, texts, device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]
            return torch.cat(hidden, dim=-1), pooled

        hidden, pooled = components.encode_text(captions, hidden_and_pooled)
        time_ids = torch.tensor([list(s) for s in sizes], dtype=hidden.dtype, device=device)
        return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids})


FAMILIES: dict[str, ModelFamily] = {
    "StableDiffusionPipeline": StableDiffusion(),
    "StableDiffusionXLPipeline": StableDiffusionXL(),
}


def detect_family(path: Path) -> ModelFamily:
    """The family named by `_class_name` in `path/model_index.json`."""
    index = Path(path) / "model_index.json"
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"model folder {path} has no readable model_index.json: "
                          f"{type(exc).__name__}") from exc
    family = FAMILIES.get(str(class_name))
    if family is None:
        raise ConfigError(f"model {path} is a {class_name}; supported: {', '.join(FAMILIES)}")
    return family


def load_components(path: Path, variant: str | None) -> Components:
    """Detect the family and load every component, frozen; the method decides what trains."""
    components = detect_family(path).load(Path(path), variant)
    for module in components.modules().values():
        module.requires_grad_(False)
    return components


def base_scheduler(components: Components) -> Any:
    """A fresh copy of the scheduler the base model ships (its own class and config), for inference.

    Training draws noise with `noise_scheduler` (DDPM over the same betas); images are made with
    the one the base was published with, so samples and exported pipelines behave like the base.
    """
    import diffusers

    path = components.path
    config = diffusers.DDPMScheduler.load_config(str(path), subfolder="scheduler", local_files_only=True)
    kind = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(kind, type) and issubclass(kind, diffusers.SchedulerMixin)):
        raise ConfigError(f"model {path} names scheduler class {config.get('_class_name')!r}, "
                          "which this diffusers lacks")
    return kind.from_config(config)


def build_pipeline(components: Components) -> Any:
    """A diffusers pipeline around the (possibly adapted) components and the base's scheduler, for sampling.

    Its modules keep the dtypes the trainer gave them (frozen ones in `compute_dtype`, the VAE and
    trained weights in float32), so run it through `generate`, not by calling it.
    """
    import diffusers

    pipeline_class = getattr(diffusers, components.family.pipeline_class)
    kwargs = dict(components.modules(), scheduler=base_scheduler(components), tokenizer=components.tokenizers[0])
    if len(components.tokenizers) > 1:
        kwargs["tokenizer_2"] = components.tokenizers[1]
    else:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_class(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(components: Components, pipe: Any, prompt: str, **call: Any) -> list[Any]:
    """PIL images of `prompt` from a `build_pipeline` pipeline, at any training precision.

    A diffusers pipeline hands each module's output to the next without casting, but the trainer
    mixes dtypes: frozen text encoders and UNet in `compute_dtype` (bf16/fp16), trained weights
    and the VAE in float32 (SDXL's VAE overflows in fp16). So the pipeline only denoises, under
    autocast in `compute_dtype` as training runs, and stops at latents; the VAE then decodes them
    in its own dtype outside autocast, undoing the scaling the objective applies when it encodes.
    """
    import torch

    dtype = components.compute_dtype or torch.float32
    vae = components.vae
    with torch.no_grad(), components.evaluating():
        with torch.autocast(vae.device.type, dtype=dtype, enabled=dtype != torch.float32):
            latents = pipe(prompt, output_type="latent", **call).images
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with torch.autocast(vae.device.type, enabled=False):
            pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def export_pipeline(components: Components, variant: str | None) -> Any:
    """The base pipeline with the trained UNet, every other part (scheduler included) as the base ships it.

    The frozen parts are loaded again from the base folder rather than taken from memory, where
    they were cast to `compute_dtype`; the export is float32 throughout, as the trained UNet is.
    """
    import diffusers
    import torch

    pipeline_class = getattr(diffusers, components.family.pipeline_class)
    extra = {} if len(components.tokenizers) > 1 else dict(safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False)
    pipe = pipeline_class.from_pretrained(str(components.path), unet=components.unet, variant=variant,
                                          dtype=torch.float32, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe
