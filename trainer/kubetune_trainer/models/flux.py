"""Flux.1 (dev, schnell): a rectified-flow transformer over 2x2-packed latents, conditioned on T5's tokens
and CLIP-L's pooled output, with a guidance embedding on the guidance-distilled dev model.

The transformer reads latents packed into a sequence of 2x2 patches with their (row, column) ids and
timesteps on 0..1, as `FluxPipeline` calls it; `predict` packs, calls and unpacks, so the objective
sees ordinary (N, C, h, w) latents. The dev model's guidance is `training.flowMatching.guidance`.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.spec import FlowMatchingSpec, TrainingSpec
from kubetune_trainer.models.family import Components, Conditioning
from kubetune_trainer.models.flow import FlowMatching
from kubetune_trainer.models.transformer_family import TransformerFamily, t5_encode
from kubetune_trainer.models.unet_family import tokenize


def pack(latents: Any) -> Any:
    """(N, C, h, w) latents to the (N, h/2 * w/2, 4C) sequence of 2x2 patches Flux reads."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(sequence: Any, h: int, w: int) -> Any:
    """`pack`'s inverse for latents of `h` x `w` cells."""
    n, _, channels = sequence.shape
    patches = sequence.view(n, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, channels // 4, h, w)


def image_ids(h: int, w: int, device: Any, dtype: Any) -> Any:
    """Each packed patch's (0, row, column): the positions Flux's rotary embedding reads."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class Flux(TransformerFamily):
    name = "flux"
    display_name = "FLUX.1"
    short_display_name = "Flux.1"
    hub_tags = ("flux", "flux-diffusers")
    conversion_script = ""
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    kohya_base = "flux1"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    text_encoder_classes = ("CLIPTextModel", "T5EncoderModel")
    tokenizer_classes = ("CLIPTokenizer", "T5Tokenizer")
    lora_text_encoder_names = ("text_encoder",)
    default_sequence_length = 512

    def encode_text(self, components: Components, captions: list[str], device: Any) -> tuple[Any, ...]:
        clip = components.text_encoders[0](tokenize(components.tokenizers[0], captions, device),
                                           output_hidden_states=False)
        t5 = t5_encode(components.tokenizers[1], components.text_encoders[1], captions,
                       self.sequence_length(components), device)
        return t5, clip.pooler_output

    def condition(self, components: Components, encoded: tuple[Any, ...], sizes: list[tuple[int, ...]],
                  device: Any) -> Conditioning:
        import torch

        t5, pooled = encoded
        extra: dict[str, Any] = {"pooled_projections": pooled, "txt_ids": torch.zeros(t5.shape[1], 3, device=device)}
        if components.denoiser.config.guidance_embeds:
            guidance = components.extra.get("guidance", FlowMatchingSpec().guidance)
            extra["guidance"] = torch.full((t5.shape[0],), guidance, device=device)
        return Conditioning(t5, extra)

    def objective(self, components: Components, training: TrainingSpec) -> FlowMatching:
        components.extra["guidance"] = (training.flow_matching or FlowMatchingSpec()).guidance
        return super().objective(components, training)

    def predict(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning) -> Any:
        h, w = noisy.shape[-2:]
        extra = dict(cond.added_cond_kwargs or {})
        packed = denoiser(hidden_states=pack(noisy), timestep=timesteps,
                          encoder_hidden_states=cond.encoder_hidden_states,
                          img_ids=image_ids(h, w, noisy.device, noisy.dtype), return_dict=False, **extra)[0]
        return unpack(packed, h, w)

    def patch_size(self, components: Components) -> int:
        return 2  # the pipeline's 2x2 packing; the transformer's own patch is 1

    def tokens_of(self, latents: Any) -> int:
        """The packed sequence length of one latent image (what the dynamic shift reads)."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def unpacked(self, latents: Any, size: tuple[int, int], vae_factor: int) -> Any:
        return unpack(latents, size[0] // vae_factor, size[1] // vae_factor)


FAMILY = Flux()
