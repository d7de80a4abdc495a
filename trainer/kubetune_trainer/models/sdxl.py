"""SDXL: two CLIP text encoders (penultimate hidden states, joined), the second's pooled embedding, and
each image's size and crop as the UNet's `time_ids` (micro-conditioning)."""

from __future__ import annotations

from typing import Any

from kubetune_trainer.models.family import Components, Conditioning
from kubetune_trainer.models.unet_family import UNetFamily, tokenize


class StableDiffusionXL(UNetFamily):
    name = "sdxl"
    display_name = "Stable Diffusion XL"
    short_display_name = "SDXL"
    hub_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")
    conversion_script = "convert_diffusers_to_original_sdxl.py"
    pipeline_class = "StableDiffusionXLPipeline"
    kohya_base = "sdxl_base_v1-0"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    kohya_text_prefixes = ("lora_te1", "lora_te2")
    kohya_text_roots = ("text_model.", "text_model.")

    def encode_text(self, components: Components, captions: list[str], device: Any) -> tuple[Any, ...]:
        import torch

        hidden, pooled = [], None
        for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
            out = encoder(tokenize(tokenizer, captions, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled

    def condition(self, components: Components, encoded: tuple[Any, ...], sizes: list[tuple[int, ...]],
                  device: Any) -> Conditioning:
        import torch

        hidden, pooled = encoded
        time_ids = torch.tensor([list(s) for s in sizes], dtype=hidden.dtype, device=device)
        return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids})


FAMILY = StableDiffusionXL()
