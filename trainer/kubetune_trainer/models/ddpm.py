"""The objective the UNet families train on: predict the DDPM noise (epsilon) or velocity (v).

Which one follows the scheduler's `prediction_type`; timesteps are drawn uniformly over its
training steps, and min-SNR weighting (`training.snrGamma`) is adjusted for v-prediction.
"""

from __future__ import annotations

from typing import Any


def offset_noise(latents: Any, generator: Any, noise_offset: float, device: Any) -> Any:
    """Gaussian noise shaped like `latents`, plus `training.noiseOffset` times a per-channel constant
    (what lets a model learn much darker or brighter images), all drawn from `generator`."""
    import torch

    noise = torch.randn(latents.shape, generator=generator).to(device)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + noise_offset * offset.to(device)
    return noise


class NoisePrediction:
    """Noise-prediction (epsilon or v) over `scheduler`'s betas."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def draw(self, latents: Any, generator: Any, noise_offset: float, device: Any) -> tuple[Any, Any]:
        import torch

        noise = offset_noise(latents, generator, noise_offset, device)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
        return noise, timesteps

    def noisy(self, latents: Any, noise: Any, timesteps: Any) -> Any:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: Any, noise: Any, timesteps: Any) -> Any:
        if self.scheduler.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def weights(self, timesteps: Any, snr_gamma: float | None) -> Any:
        import torch
        from diffusers.training_utils import compute_snr

        if snr_gamma is None:
            return torch.ones_like(timesteps, dtype=torch.float32)
        snr = compute_snr(self.scheduler, timesteps)
        clipped = torch.clamp(snr, max=snr_gamma)
        if self.scheduler.config.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped / snr
