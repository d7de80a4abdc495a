"""Each module runs in the dtype the job's precision gives it, images come out of the trainer's
mixed-dtype modules at every precision, and a DreamBooth-LoRA job with generated class images
runs through `kubetune run` at the API's default precision (bf16).

The trainer keeps frozen modules in the compute dtype, trained weights and the VAE in float32;
a diffusers pipeline called on such modules fails in `vae.decode` (`Input type (c10::BFloat16)
and bias type (float)`). `models.generate` is the one way the trainer makes images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from trainer_probe import running_trainers
from trainer_support import job_document, local_job

from kubetune.api.validation import validate_document
from kubetune.cli import main
from kubetune_trainer.assembly import _place
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job
from kubetune_trainer.models.pipelines import build_pipeline, generate
from kubetune_trainer.models.registry import load_components


@pytest.mark.parametrize("unet", ["frozen", "trained"])
@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_generate_makes_images_from_modules_placed_at_each_precision(family: str, precision: str, unet: str,
                                                                     request: pytest.FixtureRequest) -> None:
    """fp16 trains only on CUDA, but the placement and autocast path is the same, so it runs here on CPU."""
    import numpy as np
    import torch

    components = load_components(request.getfixturevalue(f"tiny_{family}"), None)
    if unet == "trained":  # a full fine-tune: the UNet trains in float32 among frozen bf16/fp16 modules
        components.denoiser.requires_grad_(True)
    dtype = _place(components, SimpleNamespace(device=torch.device("cpu")), precision)
    assert components.text_encoders[0].dtype == dtype and components.vae.dtype == torch.float32
    assert components.denoiser.dtype == (torch.float32 if unet == "trained" else dtype)

    images = generate(components, build_pipeline(components), "a red square", num_inference_steps=2,
                      height=64, width=64, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0))

    pixels = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    assert pixels.shape == (2, 64, 64, 3)
    assert pixels.std() > 0  # NaN latents decode to a uniform (black) image


def test_a_diverged_unet_draws_grey_samples_instead_of_failing(tiny_sd: Path) -> None:
    """NaN weights (a run that diverged, e.g. a learning rate far too high) decode to NaN pixels; the samples are
    mid-grey and the cast to 8 bits raises no warning (warnings are errors here), so the run keeps its checkpoints."""
    import numpy as np
    import torch

    components = load_components(tiny_sd, None)
    with torch.no_grad():
        for param in components.denoiser.parameters():
            param.fill_(float("nan"))
    images = generate(components, build_pipeline(components), "a red square", num_inference_steps=1,
                      height=64, width=64, generator=torch.Generator().manual_seed(0))
    pixels = np.asarray(images[0])
    assert pixels.shape == (64, 64, 3) and set(np.unique(pixels)) <= {127, 128}, np.unique(pixels)



@pytest.mark.parametrize(("precision", "frozen"), [("no", "float32"), ("bf16", "bfloat16")])
def test_frozen_modules_run_in_the_job_precision_and_trained_weights_in_float32(
        precision: str, frozen: str, tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    """Both in one process: a float32 job may follow a bf16 one (see conftest's accelerate reset)."""
    seen: list[dict[str, set[str]]] = []

    def dtypes(record: Any) -> None:
        components = built[-1].p.components
        seen.append({"frozen": {str(p.dtype) for p in components.text_encoders[0].parameters()},
                     "trained": {str(p.dtype) for p in components.denoiser.parameters() if p.requires_grad},
                     "vae": {str(p.dtype) for p in components.vae.parameters()}})

    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), training={"maxSteps": 1,
                                                                                  "mixedPrecision": precision})
    with running_trainers() as built:
        result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0), hooks=[dtypes])
    assert result.exit_code == 0, result.message
    assert seen == [{"frozen": {f"torch.{frozen}"}, "trained": {"torch.float32"}, "vae": {"torch.float32"}}]

def test_dreambooth_lora_with_generated_class_images_through_kubetune_run(tiny_sdxl: Path, squares: Path,
                                                                          tmp_path: Path) -> None:
    """Issue 12's acceptance: the job `examples/dreambooth-lora-sdxl.yaml` describes, at toy size."""
    doc = job_document(str(tiny_sdxl), str(squares), str(tmp_path / "out"),
                       method={"type": "dreambooth-lora", "dreambooth": {
                           "instancePrompt": "a photo of sks square", "classPrompt": "a photo of a square",
                           "priorPreservation": True, "numClassImages": 2, "priorLossWeight": 1.0}},
                       data={"validationFraction": 0.2},
                       training={"maxSteps": 2},
                       validation={"prompts": ["a photo of sks square"], "every": 2, "inferenceSteps": 2})
    assert "mixedPrecision" not in doc["spec"]["training"]
    job = validate_document(doc, mode="local").job
    assert job is not None and job.spec.training.mixed_precision == "bf16"
    path, status, scratch = tmp_path / "job.yaml", tmp_path / "status.json", tmp_path / "scratch"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")

    code = main(["run", str(path), "--status-file", str(status), "--no-progress", "--scratch", str(scratch)])

    progress = json.loads(status.read_text())
    assert (code, progress["phase"]) == (0, "Succeeded"), progress.get("message")
    assert progress["step"] == 2
    assert sorted(p.name for p in (scratch / "class-images").glob("*.png")) == ["class-00000.png",
                                                                                 "class-00001.png"]
    assert math.isfinite(progress["smoothedLoss"]) and math.isfinite(progress["validationLoss"])
    assert [Path(s["uri"]).is_file() for s in progress["samples"]] == [True]
    lora = progress["outputs"]["lora"]
    assert Path(lora["diffusers"]).is_file() and Path(lora["kohya"]).is_file()
