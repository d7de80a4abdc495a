"""What every family here shares: captions through the components' text cache into conditioning, and images
through an `AutoencoderKL` into its normalised latent space (`(z - shift_factor) * scaling_factor`) and back.

`UNetFamily` and `TransformerFamily` build on `VaeLatents`; a family whose pipeline returns latents in
another layout (Flux's packed sequence) says how to unpack them (`unpacked`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from kubetune_trainer.models.family import Components, Conditioning


class VaeLatents:
    """Conditioning through the text cache; a VAE's latents, drawn, normalised and decoded. The names every
    family declares are `family.ModelFamily`'s."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    short_display_name: ClassVar[str]
    hub_tags: ClassVar[tuple[str, ...]]
    conversion_script: ClassVar[str]
    pipeline_class: ClassVar[str]
    kohya_base: ClassVar[str]
    text_encoder_names: ClassVar[tuple[str, ...]]
    tokenizer_names: ClassVar[tuple[str, ...]]

    def encode_text(self, components: Components, captions: list[str], device: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    def condition(self, components: Components, encoded: tuple[Any, ...], sizes: list[tuple[int, ...]],
                  device: Any) -> Conditioning:
        raise NotImplementedError

    def encode(self, components: Components, captions: list[str], sizes: list[tuple[int, ...]],
               device: Any) -> Conditioning:
        encoded = components.encode_text(captions, lambda texts: self.encode_text(components, texts, device))
        return self.condition(components, encoded, sizes, device)

    def encode_pixels(self, vae: Any, pixels: Any) -> Any:
        return vae.encode(pixels).latent_dist.parameters

    def latents(self, vae: Any, moments: Any, generator: Any) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = DiagonalGaussianDistribution(moments).sample(generator=generator)
        return ((latents - _shift(vae)) * vae.config.scaling_factor).float()

    def decode_latents(self, vae: Any, latents: Any, size: tuple[int, int]) -> Any:
        latents = self.unpacked(latents, size, 2 ** (len(vae.config.block_out_channels) - 1))
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + _shift(vae), return_dict=False)[0]

    def unpacked(self, latents: Any, size: tuple[int, int], vae_factor: int) -> Any:
        """The (N, C, h, w) latents from what the family's pipeline returns for `output_type="latent"`."""
        return latents

    def latent_factor(self, components: Components) -> int:
        """Pixels per latent cell along each side: the VAE's downsampling."""
        return 2 ** (len(components.vae.config.block_out_channels) - 1)


def _shift(vae: Any) -> float:
    """The VAE's latent shift (SD3's, Flux's); SD and SDXL VAEs have none."""
    return getattr(vae.config, "shift_factor", None) or 0.0
