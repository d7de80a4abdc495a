"""Stable Diffusion 3 / 3.5 (Medium, Large): an MMDiT transformer conditioned on CLIP-L, CLIP-G and T5.

The captions' conditioning is the pipeline's: both CLIPs' penultimate hidden states side by side,
padded to T5's width, followed by T5's tokens (zeros when `model.withoutT5` leaves T5 out), and
the two CLIPs' pooled projections side by side. The transformer reads timesteps on 0..1000.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.spec import ModelSpec
from kubetune_trainer.models.family import Components, Conditioning
from kubetune_trainer.models.transformer_family import TransformerFamily, t5_encode
from kubetune_trainer.models.unet_family import tokenize


class StableDiffusion3(TransformerFamily):
    name = "sd3"
    display_name = "Stable Diffusion 3"
    short_display_name = "SD3"
    hub_tags = ("stable-diffusion-3", "sd3", "sd3-diffusers")
    conversion_script = ""
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"
    kohya_base = "sd3"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_encoder_classes = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
    tokenizer_classes = ("CLIPTokenizer", "CLIPTokenizer", "T5Tokenizer")
    lora_text_encoder_names = ("text_encoder", "text_encoder_2")
    default_sequence_length = 256

    def encoders_to_load(self, model: ModelSpec) -> tuple[str, ...]:
        return self.text_encoder_names[:2] if model.without_t5 else self.text_encoder_names

    def encode_text(self, components: Components, captions: list[str], device: Any) -> tuple[Any, ...]:
        import torch
        import torch.nn.functional as F

        hidden, pooled = [], []
        for tokenizer, encoder in zip(components.tokenizers[:2], components.text_encoders[:2], strict=True):
            out = encoder(tokenize(tokenizer, captions, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        width = components.denoiser.config.joint_attention_dim
        length = self.sequence_length(components)
        if len(components.text_encoders) > 2:
            t5 = t5_encode(components.tokenizers[2], components.text_encoders[2], captions, length, device)
        else:
            t5 = torch.zeros((len(captions), length, width), dtype=clip.dtype, device=clip.device)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def condition(self, components: Components, encoded: tuple[Any, ...], sizes: list[tuple[int, ...]],
                  device: Any) -> Conditioning:
        hidden, pooled = encoded
        return Conditioning(hidden, {"pooled_projections": pooled})

    def predict(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning) -> Any:
        return denoiser(hidden_states=noisy, timestep=timesteps * 1000,
                        encoder_hidden_states=cond.encoder_hidden_states, return_dict=False,
                        **(cond.added_cond_kwargs or {}))[0]


FAMILY = StableDiffusion3()
