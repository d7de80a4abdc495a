"""Z-Image (Tongyi-MAI's single-stream diffusion transformer): flow matching over Flux's 16-channel VAE,
conditioned on the penultimate hidden states of a Qwen3 language model reading the chat-formatted caption.

The transformer takes lists (one latent and one caption embedding per image, each caption only its
own tokens) and reads time as 1 - sigma; its output points from noise to data, so `predict` negates
it into the velocity the flow-matching target uses, as `ZImagePipeline` does when it samples. Its
LoRA file carries the transformer's adapters only.
"""

from __future__ import annotations

from typing import Any

from kubetune_trainer.models.family import Components, Conditioning
from kubetune_trainer.models.transformer_family import TransformerFamily


class ZImage(TransformerFamily):
    name = "z-image"
    display_name = "Z-Image"
    short_display_name = "Z-Image"
    hub_tags = ("z-image", "z-image-diffusers")
    conversion_script = ""
    pipeline_class = "ZImagePipeline"
    transformer_class = "ZImageTransformer2DModel"
    kohya_base = "z_image"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    text_encoder_classes = ("Qwen3Model",)
    tokenizer_classes = ("AutoTokenizer",)
    lora_text_encoder_names = ()
    default_sequence_length = 512

    def encode_text(self, components: Components, captions: list[str], device: Any) -> tuple[Any, ...]:
        tokenizer, encoder = components.tokenizers[0], components.text_encoders[0]
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True)
                 for caption in captions]
        tokens = tokenizer(chats, padding="max_length", max_length=self.sequence_length(components),
                           truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device).bool()
        hidden = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask,
                         output_hidden_states=True).hidden_states[-2]
        return hidden, mask

    def condition(self, components: Components, encoded: tuple[Any, ...], sizes: list[tuple[int, ...]],
                  device: Any) -> Conditioning:
        hidden, mask = encoded
        return Conditioning([row[keep] for row, keep in zip(hidden, mask.bool(), strict=True)])

    def predict(self, denoiser: Any, noisy: Any, timesteps: Any, cond: Conditioning) -> Any:
        import torch

        images = list(noisy.unsqueeze(2).unbind(dim=0))  # one (C, 1, h, w) latent per image
        out = denoiser(images, 1 - timesteps, cond.encoder_hidden_states, return_dict=False)[0]
        return -torch.stack([image.float() for image in out]).squeeze(2)

    def patch_size(self, components: Components) -> int:
        return int(components.denoiser.config.all_patch_size[0])


FAMILY = ZImage()
