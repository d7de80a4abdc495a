"""LoRA fine-tunes of tiny SD 1.x and SDXL pipelines through `run_job`, and their output files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from trainer_support import local_job

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job


def _images(pipe: Any) -> Any:
    import torch

    return pipe("a red square", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def sd_run(tiny_sd: Path, squares: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sd-run")
    job = local_job(str(tiny_sd), str(squares), str(root / "out"),
                    validation={"prompts": ["a red square"], "every": 100, "inferenceSteps": 1})
    runtime = RuntimeConfig(scratch=root / "scratch", status_file=root / "status.json", log_every=0)
    result = run_job(job, runtime)
    return {"result": result, "root": root, "status": json.loads((root / "status.json").read_text())}


def test_sd_run_succeeds_with_checkpoints_outputs_and_samples(sd_run: dict[str, Any]) -> None:
    result, root, status = sd_run["result"], sd_run["root"], sd_run["status"]
    assert (result.phase, result.exit_code) == ("Succeeded", 0), result.message
    assert status["step"] == status["totalSteps"] == 4
    assert [c["step"] for c in status["checkpoints"]] == [2]
    assert all(Path(c["uri"]).is_dir() for c in status["checkpoints"])
    lora = status["outputs"]["lora"]
    assert Path(lora["diffusers"]).name == "pytorch_lora_weights.safetensors"
    assert Path(lora["diffusers"]).is_file() and Path(lora["kohya"]).is_file()
    assert [Path(s["uri"]).is_file() for s in status["samples"]] == [True]
    assert (root / "out" / "final").is_dir()


def test_diffusers_lora_file_loads_and_changes_the_output(sd_run: dict[str, Any], tiny_sd: Path) -> None:
    import numpy as np
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.set_progress_bar_config(disable=True)
    before = _images(pipe)
    pipe.load_lora_weights(str(Path(sd_run["status"]["outputs"]["lora"]["diffusers"]).parent))
    after = _images(pipe)
    assert not np.allclose(before, after, atol=1e-4)


def test_kohya_file_has_kohya_keys_metadata_and_loads_in_diffusers(sd_run: dict[str, Any], tiny_sd: Path) -> None:
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    path = sd_run["status"]["outputs"]["lora"]["kohya"]
    with safe_open(path, "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
        alpha = handle.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in keys} == {"lora_down", "lora_up",
                                                                                        "alpha"}
    assert float(alpha) == 8.0
    assert metadata["ss_network_dim"] == "4" and metadata["ss_base_model_version"] == "sd_v1"
    diffusers_path = sd_run["status"]["outputs"]["lora"]["diffusers"]
    reference = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(Path(diffusers_path).parent))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name)
    np.testing.assert_allclose(_images(pipe), _images(reference), atol=1e-4)


def test_sdxl_trains_through_the_same_code(tiny_sdxl: Path, squares: Path, tmp_path: Path) -> None:
    job = local_job(str(tiny_sdxl), str(squares), str(tmp_path / "out"), training={"maxSteps": 2})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "scratch", log_every=0))
    assert result.exit_code == 0, result.message
    assert Path(result.progress["outputs"]["lora"]["diffusers"]).is_file()
    kohya = Path(result.progress["outputs"]["lora"]["kohya"])
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    assert pipe.get_list_adapters()["unet"]


def test_text_encoder_adapters_are_trained_and_exported(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), training={"maxSteps": 2},
                    method={"type": "lora", "lora": {"rank": 4, "alpha": 4, "trainTextEncoder": True}})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "scratch", log_every=0))
    assert result.exit_code == 0, result.message
    lora = result.progress["outputs"]["lora"]
    with safe_open(lora["diffusers"], "pt") as handle:
        diffusers_keys = handle.keys()
    with safe_open(lora["kohya"], "pt") as handle:
        kohya_keys = handle.keys()
    assert any(k.startswith("text_encoder.") for k in diffusers_keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya_keys)
    for path in (lora["diffusers"], lora["kohya"]):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
        pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name)
        assert pipe.get_list_adapters().get("text_encoder"), path
