"""Diffusers pipelines around the trainer's components: for samples and class images, and for export.

Training draws noise with the family's training scheduler; images are made with the scheduler
the base model was published with, so samples and exported pipelines behave like the base.
"""

from __future__ import annotations

from typing import Any

from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.models.family import Components


def base_scheduler(components: Components) -> Any:
    """A fresh copy of the scheduler the base model ships (its own class and config), for inference."""
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

    family = components.family
    pipeline_class = getattr(diffusers, family.pipeline_class)
    absent = set(components.extra.get("absent", ()))  # an encoder the job leaves out (SD3 without T5)
    pairs = list(zip(family.tokenizer_names, family.text_encoder_names, strict=True))
    loaded = [tokenizer for tokenizer, encoder in pairs if encoder not in absent]
    missing = {name: None for tokenizer, encoder in pairs if encoder in absent for name in (tokenizer, encoder)}
    pipe = pipeline_class(**components.modules(), scheduler=base_scheduler(components),
                          **dict(zip(loaded, components.tokenizers, strict=True)), **missing,
                          **family.pipeline_extras)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(components: Components, pipe: Any, prompt: str, *, height: int, width: int, **call: Any) -> list[Any]:
    """PIL images of `prompt` from a `build_pipeline` pipeline, at any training precision.

    A diffusers pipeline hands each module's output to the next without casting, but the trainer
    mixes dtypes: frozen text encoders and UNet in `compute_dtype` (bf16/fp16), trained weights
    and the VAE in float32 (SDXL's VAE overflows in fp16). So the pipeline only denoises, under
    autocast in `compute_dtype` as training runs, and stops at latents; the family then decodes them
    with the VAE in its own dtype outside autocast, undoing the scaling it applies for training.
    """
    import torch

    dtype = components.compute_dtype or torch.float32
    vae = components.vae
    with torch.no_grad(), components.evaluating():
        with torch.autocast(vae.device.type, dtype=dtype, enabled=dtype != torch.float32):
            latents = pipe(prompt, output_type="latent", height=height, width=width,
                           **components.family.sampling_arguments(components), **call).images
        with torch.autocast(vae.device.type, enabled=False):
            pixels = components.family.decode_latents(vae, latents, (height, width))
    # A diverged model (NaN weights) decodes to NaN pixels: they are drawn mid-grey instead of failing the
    # cast to 8 bits; the losses (NaN) already say what happened, and the run goes on to its checkpoints.
    pixels = torch.nan_to_num(pixels.float(), nan=0.0, posinf=1.0, neginf=-1.0)
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def export_pipeline(components: Components, variant: str | None) -> Any:
    """The base pipeline with the trained UNet, every other part (scheduler included) as the base ships it.

    The frozen parts are loaded again from the base folder rather than taken from memory, where
    they were cast to `compute_dtype`; the export is float32 throughout, as the trained UNet is.
    """
    import diffusers
    import torch

    family = components.family
    pipeline_class = getattr(diffusers, family.pipeline_class)
    pipe = pipeline_class.from_pretrained(str(components.path), variant=variant,
                                          dtype=torch.float32, local_files_only=True, **family.pipeline_extras,
                                          **{family.denoiser_name: components.denoiser})
    pipe.set_progress_bar_config(disable=True)
    return pipe
