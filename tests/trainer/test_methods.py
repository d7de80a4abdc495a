"""Methods picked by spec.method.type: full fine-tunes export a pipeline; unknown ones are config errors."""

from __future__ import annotations

from pathlib import Path

from trainer_support import local_job

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_CONFIG
from kubetune_trainer.job import run_job


def test_full_fine_tune_exports_a_loadable_pipeline(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), method={"type": "full", "lora": None},
                    training={"maxSteps": 2})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert result.exit_code == 0, result.message
    folder = result.progress["outputs"]["pipeline"]
    tuned = StableDiffusionPipeline.from_pretrained(folder.rstrip("/"))
    base = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    changed = [not torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), base.unet.parameters(), strict=True)]
    assert any(changed)


def test_unimplemented_method_is_a_config_error(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"),
                    method={"type": "dreambooth", "lora": None,
                            "dreambooth": {"instancePrompt": "a sks square", "priorPreservation": False}})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert result.exit_code == EXIT_CONFIG
    assert "dreambooth" in result.message and "not implemented" in result.message
