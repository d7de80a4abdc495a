"""SD3 and Flux (flow-matching transformers) at toy sizes: every method resumes to the uninterrupted run's
weights, the LoRA files load into the family's own diffusers pipeline and reproduce the trainer's samples,
and the objective and text encodings are diffusers' own.

Runs are at the API's default precision (bf16 autocast on CPU), like every trainer test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_probe import running_trainers
from trainer_support import local_job

from kubetune.api.spec import FlowMatchingSpec, ModelSpec
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_CONFIG, EXIT_FAILED
from kubetune_trainer.job import run_job
from kubetune_trainer.reporting import aspect_buckets

FAMILIES = ["sd3", "flux"]
DREAMBOOTH = {"instancePrompt": "a photo of sks square", "classPrompt": "a photo of a square",
              "numClassImages": 2, "priorLossWeight": 0.5}
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"type": "lora"},
    "dreambooth-lora": {"type": "dreambooth-lora", "dreambooth": DREAMBOOTH},
    "full": {"type": "full", "lora": None},
}
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


class Crash(RuntimeError):
    """Stands in for the pod being killed."""


def _crash_after(step: int) -> Any:
    def hook(record: Any) -> None:
        if record.step == step:
            raise Crash(f"killed after step {step}")

    return hook


def _trained(result: Any) -> dict[str, Any]:
    """The run's trained weights: its LoRA file, or its exported transformer."""
    from safetensors.torch import load_file

    outputs = result.progress["outputs"]
    if "lora" in outputs:
        return load_file(outputs["lora"]["diffusers"])
    return load_file(Path(outputs["pipeline"]) / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_runs_weights(
        family: str, method: str, squares: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import torch

    model: Path = request.getfixturevalue(f"tiny_{family}")
    spec = {**METHODS[method]}
    if "dreambooth" in spec:
        spec["dreambooth"] = {**DREAMBOOTH, "classDataUri": str(squares)}
    training = {"maxSteps": 4, "gradientAccumulationSteps": 2, "lrScheduler": {"type": "cosine", "warmupSteps": 1}}

    def job(out: str) -> Any:
        return local_job(str(model), str(squares), str(tmp_path / out), method=spec, training=training)

    straight = run_job(job("a"), RuntimeConfig(scratch=tmp_path / "sa", log_every=0))
    assert straight.exit_code == 0, straight.message
    crashed = run_job(job("b"), RuntimeConfig(scratch=tmp_path / "sb1", log_every=0), hooks=[_crash_after(3)])
    assert crashed.exit_code == EXIT_FAILED
    assert [c["step"] for c in crashed.progress["checkpoints"]] == [2]
    steps: list[int] = []
    resumed = run_job(job("b"), RuntimeConfig(scratch=tmp_path / "sb2", log_every=0),
                      hooks=[lambda record: steps.append(record.step)])
    assert resumed.exit_code == 0, resumed.message
    assert steps == [3, 4]

    want, got = _trained(straight), _trained(resumed)
    assert want.keys() == got.keys() and want
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)
    base = _trained_base(model) if method == "full" else None
    if base is not None:
        assert any(not torch.equal(want[key], base[key]) for key in base)


def _trained_base(model: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module", params=FAMILIES)
def lora_run(request: pytest.FixtureRequest, squares: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A LoRA run of each family with text-encoder adapters and one sample of its last step."""
    family = request.param
    model: Path = request.getfixturevalue(f"tiny_{family}")
    root = tmp_path_factory.mktemp(f"{family}-lora")
    job = local_job(str(model), str(squares), str(root / "out"),
                    method={"type": "lora", "lora": {"rank": 4, "alpha": 8, "trainTextEncoder": True}},
                    training={"maxSteps": 3, "learningRate": 1.0e-2},
                    validation={"prompts": ["a red square"], "every": 100, "inferenceSteps": 2,
                                "guidanceScale": 3.0})
    result = run_job(job, RuntimeConfig(scratch=root / "scratch", log_every=0))
    assert result.exit_code == 0, result.message
    return {"family": family, "model": model, "job": job, "result": result}


def _pipeline(run: dict[str, Any]) -> Any:
    import diffusers
    import torch

    pipe = getattr(diffusers, PIPELINES[run["family"]]).from_pretrained(str(run["model"]), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _transformer_output(pipe: Any, family: str) -> Any:
    """The transformer's prediction for fixed inputs, through the trainer's own family call."""
    import torch

    from kubetune_trainer.models.family import Conditioning
    from kubetune_trainer.models.registry import FAMILIES as REGISTRY

    entry = next(f for f in REGISTRY.values() if f.name == family)
    generator = torch.Generator().manual_seed(3)
    config = pipe.transformer.config
    latents = torch.randn(1, 16, 16, 16, generator=generator)
    hidden = torch.randn(1, 12, config.joint_attention_dim, generator=generator)
    extra: dict[str, Any] = {"pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator)}
    if family == "flux":
        extra |= {"txt_ids": torch.zeros(12, 3), "guidance": torch.tensor([3.5])}
    with torch.no_grad():
        return entry.predict(pipe.transformer, latents, torch.tensor([0.6]), Conditioning(hidden, extra))


def test_the_lora_files_load_into_the_familys_pipeline_without_stray_keys(lora_run: dict[str, Any]) -> None:
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    outputs = lora_run["result"].progress["outputs"]["lora"]
    written = load_file(outputs["diffusers"])
    pipe = _pipeline(lora_run)
    before = _transformer_output(pipe, lora_run["family"])
    pipe.load_lora_weights(str(Path(outputs["diffusers"]).parent))  # a stray key would warn, and fail the test
    loaded = {f"{name}.{key}" for name, adapters in pipe.get_list_adapters().items() for adapter in adapters
              for key in get_peft_model_state_dict(getattr(pipe, name), adapter_name=adapter)}
    assert loaded == set(written)
    assert any(key.startswith("text_encoder.") for key in written)
    diffusers_out = _transformer_output(pipe, lora_run["family"])
    assert not torch.allclose(before, diffusers_out, atol=1e-4)

    single = _pipeline(lora_run)  # the single file: alpha baked in, read as diffusers reads any file
    single.load_lora_weights(outputs["kohya"])
    torch.testing.assert_close(_transformer_output(single, lora_run["family"]), diffusers_out, rtol=1e-4, atol=1e-5)


def test_the_trainers_sample_is_reproduced_from_the_exported_lora(lora_run: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from accelerate import Accelerator
    from PIL import Image

    from kubetune_trainer.models.pipelines import build_pipeline, generate
    from kubetune_trainer.models.registry import load_components

    job, result = lora_run["job"], lora_run["result"]
    components = load_components(lora_run["model"], None, job.spec.model)
    pipe = build_pipeline(components)
    pipe.load_lora_weights(str(Path(result.progress["outputs"]["lora"]["diffusers"]).parent))
    for module in components.modules().values():  # as the trainer runs at bf16: adapters and VAE in float32
        for name, param in module.named_parameters():
            if "lora_" not in name and module is not components.vae:
                param.data = param.data.to(torch.bfloat16)
    components.compute_dtype = torch.bfloat16
    Accelerator(mixed_precision="bf16", cpu=True).prepare(components.denoiser)  # the trainer's bf16 forward
    validation = job.spec.validation
    image = generate(components, pipe, validation.prompts[0], height=64, width=64,
                     num_inference_steps=validation.inference_steps, guidance_scale=validation.guidance_scale,
                     generator=torch.Generator().manual_seed(job.spec.training.seed))[0]

    sample = result.progress["samples"][-1]
    assert sample["step"] == 3
    written = np.asarray(Image.open(sample["uri"]).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - written).max() <= 1


def test_fixed_shift_sigmas_are_the_schedulers_and_flux_shifts_by_resolution(tiny_sd3: Path, tiny_flux: Path) -> None:
    import math

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    from kubetune_trainer.models.flow import FlowMatching

    sd3 = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tiny_sd3), subfolder="scheduler")
    grid = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    objective = FlowMatching(sd3, FlowMatchingSpec(), lambda latents: 64)
    torch.testing.assert_close(objective.shifted(grid, 64).float(), sd3.sigmas, rtol=0, atol=1e-6)

    flux = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tiny_flux), subfolder="scheduler")
    objective = FlowMatching(flux, FlowMatchingSpec(), lambda latents: 4096)
    mu = 1.15  # the pipeline's calculate_shift at the largest sequence length
    torch.testing.assert_close(objective.shifted(grid, 4096), flux.time_shift(mu, 1.0, grid), rtol=0, atol=1e-9)
    assert objective.shifted(torch.tensor([0.5], dtype=torch.float64), 4096).item() == pytest.approx(
        math.exp(1.15) / (math.exp(1.15) + 1))

    noise, sigmas = FlowMatching(sd3, FlowMatchingSpec(timestepSampling="uniform", lossWeighting="cosmap"),
                                 lambda latents: 64).draw(torch.zeros(4, 16, 8, 8), torch.Generator().manual_seed(0),
                                                          0.0, "cpu")
    assert noise.shape == (4, 16, 8, 8) and ((sigmas > 0) & (sigmas <= 1)).all()
    weights = FlowMatching(sd3, FlowMatchingSpec(lossWeighting="cosmap"), lambda latents: 64).weights(sigmas, None)
    torch.testing.assert_close(weights, compute_loss_weighting_for_sd3("cosmap", sigmas).float())


@pytest.mark.parametrize("family", FAMILIES)
def test_caption_encodings_are_the_pipelines_own(family: str, request: pytest.FixtureRequest) -> None:
    import diffusers
    import torch

    from kubetune_trainer.models.registry import load_components

    model: Path = request.getfixturevalue(f"tiny_{family}")
    components = load_components(model, None, ModelSpec(uri=str(model), maxSequenceLength=24))
    ours = components.family.encode_text(components, ["a red square", "the blue one"], "cpu")
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(str(model))
    with torch.no_grad():
        theirs = pipe.encode_prompt(["a red square", "the blue one"], prompt_2=None, **(
            {"prompt_3": None, "do_classifier_free_guidance": False} if family == "sd3" else {}),
            max_sequence_length=24)
    hidden, pooled = theirs[0], theirs[2 if family == "sd3" else 1]
    torch.testing.assert_close(ours[0], hidden)
    torch.testing.assert_close(ours[1], pooled)


def test_sd3_trains_and_samples_without_t5(tiny_sd3: Path, squares: Path, tmp_path: Path) -> None:
    job = local_job(str(tiny_sd3), str(squares), str(tmp_path / "out"), model={"withoutT5": True},
                    training={"maxSteps": 2}, validation={"prompts": ["a red square"], "every": 100,
                                                          "inferenceSteps": 1})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert result.exit_code == 0, result.message
    assert len(result.progress["samples"]) == 1


@pytest.mark.parametrize(("family", "section", "values", "says"), [
    ("flux", "training", {"snrGamma": 5.0}, "training.snrGamma"),
    ("flux", "model", {"withoutT5": True}, "model.withoutT5"),
    ("sd", "training", {"flowMatching": {"lossWeighting": "cosmap"}}, "training.flowMatching"),
    ("sd", "model", {"maxSequenceLength": 77}, "model.maxSequenceLength"),
])
def test_a_setting_the_family_cannot_honour_is_a_configuration_error(
        family: str, section: str, values: dict[str, Any], says: str, squares: Path, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    model: Path = request.getfixturevalue(f"tiny_{family}")
    job = local_job(str(model), str(squares), str(tmp_path / "out"), **{section: values})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert result.exit_code == EXIT_CONFIG
    assert says in result.message


@pytest.mark.parametrize("family", FAMILIES)
def test_buckets_validation_ema_and_the_best_step_export_work_as_for_the_unet_families(
        family: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import json

    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    sizes = [(96, 64), (64, 96), (64, 64), (96, 64), (64, 96), (64, 64), (80, 64), (64, 80)]
    for i, (width, height) in enumerate(sizes):
        pixels = np.random.default_rng(i).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"a thing {i}"}) + "\n"
                                                 for i in range(len(sizes))))
    model: Path = request.getfixturevalue(f"tiny_{family}")
    job = local_job(str(model), str(data), str(tmp_path / "out"), method={"type": "full", "lora": None},
                    data={"aspectBuckets": True, "validationFraction": 0.25},
                    training={"maxSteps": 4, "ema": {"decay": 0.9}},
                    validation={"prompts": ["a thing"], "every": 2, "inferenceSteps": 1})
    with running_trainers() as built:
        result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert result.exit_code == 0, result.message
    outputs = result.progress["outputs"]
    assert outputs["reason"] == "BestValidationLoss" and Path(outputs["pipeline"], "transformer").is_dir()
    assert [s["step"] for s in result.progress["samples"]] == [2, 4]
    assert len(aspect_buckets(built[-1].p.data)) > 1  # wide, tall and square images keep their shapes
