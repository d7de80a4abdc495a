"""Cached VAE latents give the same training as encoding every step, and are reused."""

from __future__ import annotations

from pathlib import Path

from trainer_support import local_job

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job


def test_cached_and_uncached_latents_train_the_same_adapter(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    adapters = {}
    for cache in (True, False):
        job = local_job(str(tiny_sd), str(squares), str(tmp_path / f"out-{cache}"),
                        data={"centerCrop": True, "randomFlip": False},
                        training={"maxSteps": 6, "cacheLatents": cache})
        result = run_job(job, RuntimeConfig(scratch=tmp_path / f"s-{cache}", log_every=0))
        assert result.exit_code == 0, result.message
        adapters[cache] = load_file(result.progress["outputs"]["lora"]["diffusers"])
    assert len(list((tmp_path / "s-True" / "latents").glob("*.pt"))) == 6
    assert not (tmp_path / "s-False" / "latents").exists()
    for key, value in adapters[True].items():
        torch.testing.assert_close(value, adapters[False][key], rtol=1e-4, atol=1e-5)
