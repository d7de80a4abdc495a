"""Methods picked by spec.method.type: full fine-tunes, DreamBooth with prior preservation, EMA."""

from __future__ import annotations

import json
from pathlib import Path

from trainer_support import local_job

from kubetune_trainer.config import RuntimeConfig
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



def _pndm_base(tiny_sd: Path, folder: Path) -> Path:
    """tiny_sd with the PNDM scheduler real SD 1.x bases ship (tiny_sd has DDIM)."""
    import shutil

    from diffusers import PNDMScheduler

    shutil.copytree(tiny_sd, folder)
    PNDMScheduler.from_pretrained(str(tiny_sd), subfolder="scheduler", skip_prk_steps=True).save_pretrained(
        str(folder / "scheduler"))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_full_fine_tune_exports_the_base_scheduler_and_frozen_parts(tiny_sd: Path, squares: Path,
                                                                    tmp_path: Path) -> None:
    """At bf16 the frozen modules run in bf16; the export still ships them as the base has them, in float32."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    base = _pndm_base(tiny_sd, tmp_path / "base")
    job = local_job(str(base), str(squares), str(tmp_path / "out"), method={"type": "full", "lora": None},
                    training={"maxSteps": 1}, validation={"prompts": ["a red square"], "inferenceSteps": 2})
    assert job.spec.training.mixed_precision == "bf16"
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert result.exit_code == 0, result.message
    folder = Path(result.progress["outputs"]["pipeline"])

    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers", "PNDMScheduler"]
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    shipped = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    assert {k: v for k, v in config.items() if k != "_diffusers_version"} == {
        k: v for k, v in shipped.items() if k != "_diffusers_version"}
    name = "text_encoder/model.safetensors"
    exported, original = load_file(folder / name), load_file(base / name)
    assert all(torch.equal(exported[key], original[key]) for key in original)
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in [*exported.values(), *unet.values()]} == {torch.float32}
    tuned = StableDiffusionPipeline.from_pretrained(str(folder))
    image = tuned("a red square", num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)

def test_dreambooth_lora_with_generated_class_images(tiny_sd: Path, tmp_path: Path) -> None:
    from kubetune_demo.tiny import build_image_dataset

    instance = build_image_dataset(tmp_path / "instance", count=3, size=64)
    (instance / "metadata.jsonl").unlink()  # DreamBooth folders are often images only
    job = local_job(str(tiny_sd), str(instance), str(tmp_path / "out"), training={"maxSteps": 2},
                    method={"type": "dreambooth-lora", "dreambooth": {
                        "instancePrompt": "a photo of sks square", "classPrompt": "a photo of a square",
                        "numClassImages": 2, "priorLossWeight": 0.5}},
                    validation={"inferenceSteps": 1})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert result.exit_code == 0, result.message
    assert sorted(p.name for p in (tmp_path / "s" / "class-images").iterdir()) == ["class-00000.png",
                                                                                   "class-00001.png"]
    assert Path(result.progress["outputs"]["lora"]["kohya"]).is_file()


def test_dreambooth_uses_staged_class_images_and_the_full_method(tiny_sd: Path, squares: Path,
                                                                 tmp_path: Path) -> None:
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), training={"maxSteps": 1},
                    method={"type": "dreambooth", "lora": None, "dreambooth": {
                        "instancePrompt": "a photo of sks square", "classPrompt": "a photo of a square",
                        "classDataUri": str(squares), "numClassImages": 3}})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert result.exit_code == 0, result.message
    assert not (tmp_path / "s" / "class-images").exists()
    assert result.progress["outputs"]["pipeline"].endswith("/final/pipeline/")


def test_ema_weights_are_exported_and_checkpointed(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    unets = {}
    for ema in (None, {"decay": 0.5}):
        training = {"maxSteps": 3, **({"ema": ema} if ema else {})}
        job = local_job(str(tiny_sd), str(squares), str(tmp_path / f"out-{bool(ema)}"),
                        method={"type": "full", "lora": None}, training=training)
        result = run_job(job, RuntimeConfig(scratch=tmp_path / f"s-{bool(ema)}", log_every=0))
        assert result.exit_code == 0, result.message
        unets[bool(ema)] = UNet2DConditionModel.from_pretrained(result.progress["outputs"]["pipeline"] + "unet")
    state = torch.load(tmp_path / "out-True" / "checkpoints" / "step-2" / "training_state.pt", weights_only=True)
    assert state["ema"]["shadow_params"] and state["ema"]["decay"] == 0.5
    pairs = zip(unets[True].parameters(), unets[False].parameters(), strict=True)
    assert any(not torch.allclose(a, b) for a, b in pairs)
