"""The real sizes of the GPU tier fit the trainer's model families, checked on the meta device in CI.

The CUDA tests are the only ones that train these models; this keeps their shapes from rotting
unseen: built from bench/gpu_models.py's configs without weights, each pipeline's captions go
through the trainer's own conditioning (`ModelFamily.encode`) into the UNet and images into the
VAE, as a training step does, in shapes only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.gpu_models import SIZES, real_pipeline
from kubetune_trainer.models.family import Components
from kubetune_trainer.models.registry import FAMILIES


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_a_real_size_conditions_its_unet_through_the_trainers_family(name: str, tmp_path: Path) -> None:
    import torch

    size = SIZES[name]
    with torch.device("meta"):
        pipe = real_pipeline(tmp_path, size)
    family = FAMILIES[type(pipe).__name__]
    assert family.name == size.family
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    components = Components(family=family, path=tmp_path, denoiser=pipe.unet, vae=pipe.vae,
                            noise_scheduler=pipe.scheduler, tokenizers=[pipe.tokenizer] * len(encoders),
                            text_encoders=encoders)
    side, batch = size.resolution, size.batch_size
    with torch.no_grad():
        cond = family.encode(components, ["a red square"] * batch, [(side, side, 0, 0, side, side)] * batch, "meta")
        latents = pipe.vae.encode(torch.empty(batch, 3, side, side, device="meta")).latent_dist.sample()
        prediction = pipe.unet(latents, torch.zeros(batch, dtype=torch.long, device="meta"),
                               cond.encoder_hidden_states, added_cond_kwargs=cond.added_cond_kwargs,
                               return_dict=False)[0]
    assert tuple(latents.shape) == (batch, 4, side // 8, side // 8)
    assert prediction.shape == latents.shape
    parameters = sum(p.numel() for p in pipe.unet.parameters())
    assert parameters == {"sd15": 859_520_964, "sdxl": 2_567_463_684}[name]  # the published UNets' counts
