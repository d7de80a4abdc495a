"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, the UNet conditioned on its last hidden state."""

from __future__ import annotations

from typing import Any

from kubetune_trainer.models.family import Components, Conditioning
from kubetune_trainer.models.unet_family import UNetFamily, tokenize


class StableDiffusion(UNetFamily):
    name = "sd"
    display_name = "Stable Diffusion 1.x/2.x"
    short_display_name = "SD 1.x/2.x"
    hub_tags = ("stable-diffusion", "stable-diffusion-diffusers")
    conversion_script = "convert_diffusers_to_original_stable_diffusion.py"
    pipeline_class = "StableDiffusionPipeline"
    kohya_base = "sd_v1"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    text_encoder_classes = ("CLIPTextModel",)
    kohya_text_prefixes = ("lora_te",)
    kohya_text_roots = ("text_model.",)
    pipeline_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode_text(self, components: Components, captions: list[str], device: Any) -> tuple[Any, ...]:
        ids = tokenize(components.tokenizers[0], captions, device)
        return (components.text_encoders[0](ids, return_dict=False)[0],)

    def condition(self, components: Components, encoded: tuple[Any, ...], sizes: list[tuple[int, ...]],
                  device: Any) -> Conditioning:
        return Conditioning(encoded[0])


FAMILY = StableDiffusion()
