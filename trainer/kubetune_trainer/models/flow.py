"""The objective the flow-matching families (SD3, Flux) train on: predict the velocity from data to noise.

A noise level sigma in (0, 1] is drawn per image from the density `training.flowMatching` names
(diffusers' `compute_density_for_timestep_sampling`, on the scheduler's 1,000-step grid as diffusers'
examples index it), shifted towards noise as the base model's scheduler shifts it, and the latents are
interpolated `(1 - sigma) * x0 + sigma * noise`; the target is `noise - x0`, weighted per image by
`compute_loss_weighting_for_sd3`. The "timesteps" this objective hands the family are these sigmas;
each family scales them to what its transformer reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from kubetune.api.spec import FlowMatchingSpec
from kubetune_trainer.models.ddpm import offset_noise


class FlowMatching:
    """Rectified-flow training over `scheduler`'s configuration (its shift, or its dynamic shifting)."""

    def __init__(self, scheduler: Any, settings: FlowMatchingSpec, tokens: Callable[[Any], int]) -> None:
        self.config, self.settings = scheduler.config, settings
        self.tokens = tokens
        """The transformer's image sequence length for a latent batch, which a dynamic shift depends on."""

    def draw(self, latents: Any, generator: Any, noise_offset: float, device: Any) -> tuple[Any, Any]:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        noise = offset_noise(latents, generator, noise_offset, device)
        s = self.settings
        u = compute_density_for_timestep_sampling(s.timestep_sampling, latents.shape[0], logit_mean=s.logit_mean,
                                                  logit_std=s.logit_std, mode_scale=s.mode_scale,
                                                  generator=generator)
        steps = int(self.config.num_train_timesteps)
        grid = (steps - (u * steps).long().clamp(0, steps - 1)).double() / steps  # 1.0 down to 1/steps
        return noise, self.shifted(grid, self.tokens(latents)).float().to(device)

    def shifted(self, sigmas: Any, tokens: int) -> Any:
        """The scheduler's shift of unshifted sigmas: fixed, or by image sequence length (dynamic shifting)."""
        shift, config = self.settings.shift, self.config
        if shift is None and config.get("use_dynamic_shifting"):
            slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
            mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        shift = shift if shift is not None else float(config.get("shift", 1.0))
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def noisy(self, latents: Any, noise: Any, sigmas: Any) -> Any:
        sigma = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents: Any, noise: Any, sigmas: Any) -> Any:
        return noise - latents

    def weights(self, sigmas: Any, snr_gamma: float | None) -> Any:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.settings.loss_weighting, sigmas).float()
