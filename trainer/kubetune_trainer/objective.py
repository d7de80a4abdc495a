"""The denoising loss: encode images, add seeded noise, predict it, weight by min-SNR if asked.

What differs between model families (latent scaling, conditioning, how latents are noised and
what the denoiser predicts) comes from `components.family`; this module adds the latent cache,
each image's share of the loss and the loss terms.

All randomness of a step comes from the generator the trainer passes in, seeded from the
job seed and the step number, so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.spec import TrainingSpec
from kubetune_trainer.caches.latents import DiskLatentCache, NoLatentCache
from kubetune_trainer.data import Batch
from kubetune_trainer.models.family import Components


class LossTerms:
    """Each named term's part of the training loss (DreamBooth: instance, prior), mean over micro-batches.

    Batches without `terms` add nothing, so plain methods and validation never pay for it.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Any] = {}
        self._batches = 0

    def add(self, terms: list[str] | None, contributions: Any) -> None:
        import torch

        if not terms:
            return
        self._batches += 1
        for name in dict.fromkeys(terms):
            mask = torch.tensor([term == name for term in terms], device=contributions.device)
            self._sums[name] = self._sums.get(name, 0.0) + contributions[mask].sum().detach()

    def take(self) -> dict[str, float]:
        """The terms since the last call (empty when none were recorded), then start over."""
        taken = {name: float(total) / self._batches for name, total in self._sums.items()}
        self._sums, self._batches = {}, 0
        return taken


class DiffusionObjective:
    """The denoising MSE of the model family's objective (for the UNet families: epsilon or v)."""

    def __init__(self, components: Components, denoiser: Any, spec: TrainingSpec, device: Any,
                 weight_dtype: Any, latent_cache: DiskLatentCache | NoLatentCache | None = None) -> None:
        self.components, self.denoiser, self.spec = components, denoiser, spec
        self.family = components.family
        self.latent_cache = latent_cache or NoLatentCache()
        self.device, self.weight_dtype = device, weight_dtype
        self.denoising = self.family.objective(components, spec)
        self.terms = LossTerms()
        self.encoded_images = 0
        """Images the VAE encoder has run on (cache hits excluded)."""

    def _encode(self, pixels: Any) -> Any:
        vae = self.components.vae
        self.encoded_images += int(pixels.shape[0])
        return self.family.encode_pixels(vae, pixels.to(self.device, dtype=vae.dtype))

    def latents(self, batch: Batch, generator: Any) -> Any:
        import torch

        vae = self.components.vae
        with torch.no_grad():
            moments = self.latent_cache.moments(batch, self._encode).to(self.device, dtype=vae.dtype)
            return self.family.latents(vae, moments, generator)

    def loss(self, batch: Batch, generator: Any) -> Any:
        import torch
        import torch.nn.functional as F

        latents = self.latents(batch, generator)
        noise, timesteps = self.denoising.draw(latents, generator, self.spec.noise_offset, self.device)
        noisy = self.denoising.noisy(latents, noise, timesteps)
        cond = self.family.encode(self.components, batch.captions, batch.sizes, self.device)
        prediction = self.family.predict(self.denoiser, noisy, timesteps, cond)
        target = self.denoising.target(latents, noise, timesteps)
        per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        shares = torch.tensor(batch.weights, dtype=per_image.dtype, device=per_image.device)
        contributions = per_image * self.denoising.weights(timesteps, self.spec.snr_gamma) * shares
        self.terms.add(batch.terms, contributions)
        return contributions.sum()
