"""The denoising loss: encode images, add seeded noise, predict it, weight by min-SNR if asked.

All randomness of a step comes from the generator the trainer passes in, seeded from the
job seed and the step number, so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.spec import TrainingSpec
from kubetune_trainer.caches.latents import DiskLatentCache, NoLatentCache
from kubetune_trainer.data import Batch
from kubetune_trainer.models import Components


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
    """Noise-prediction (epsilon or v) MSE for latent diffusion UNets."""

    def __init__(self, components: Components, unet: Any, spec: TrainingSpec, device: Any,
                 weight_dtype: Any, latent_cache: DiskLatentCache | NoLatentCache | None = None) -> None:
        self.components, self.unet, self.spec = components, unet, spec
        self.latent_cache = latent_cache or NoLatentCache()
        self.device, self.weight_dtype = device, weight_dtype
        self.scheduler = components.noise_scheduler
        self.terms = LossTerms()
        self.encoded_images = 0
        """Images the VAE encoder has run on (cache hits excluded)."""

    def _encode(self, pixels: Any) -> Any:
        vae = self.components.vae
        self.encoded_images += int(pixels.shape[0])
        return vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist.parameters

    def latents(self, batch: Batch, generator: Any) -> Any:
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        vae = self.components.vae
        with torch.no_grad():
            moments = self.latent_cache.moments(batch, self._encode).to(self.device, dtype=vae.dtype)
            latents = DiagonalGaussianDistribution(moments).sample(generator=generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def noise(self, latents: Any, generator: Any) -> tuple[Any, Any]:
        import torch

        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        if self.spec.noise_offset:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
            noise = noise + self.spec.noise_offset * offset.to(self.device)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(self.device)
        return noise, timesteps

    def loss(self, batch: Batch, generator: Any) -> Any:
        import torch
        import torch.nn.functional as F

        latents = self.latents(batch, generator)
        noise, timesteps = self.noise(latents, generator)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        cond = self.components.family.encode(self.components, batch.captions, batch.sizes, self.device)
        prediction = self.unet(noisy, timesteps, cond.encoder_hidden_states,
                               added_cond_kwargs=cond.added_cond_kwargs, return_dict=False)[0]
        target = self._target(latents, noise, timesteps)
        per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        shares = torch.tensor(batch.weights, dtype=per_image.dtype, device=per_image.device)
        contributions = per_image * self._weights(timesteps) * shares
        self.terms.add(batch.terms, contributions)
        return contributions.sum()

    def _target(self, latents: Any, noise: Any, timesteps: Any) -> Any:
        if self.scheduler.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def _weights(self, timesteps: Any) -> Any:
        import torch
        from diffusers.training_utils import compute_snr

        if self.spec.snr_gamma is None:
            return torch.ones_like(timesteps, dtype=torch.float32)
        snr = compute_snr(self.scheduler, timesteps)
        clipped = torch.clamp(snr, max=self.spec.snr_gamma)
        if self.scheduler.config.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped / snr
