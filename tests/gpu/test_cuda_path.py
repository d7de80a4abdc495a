"""The trainer's CUDA path at real sizes, each test with a toy-size CPU twin through the same body.

Every test runs a FineTuneJob through the trainer's own entry points (`run_job`, or `kubetune
train` under torchrun) with gradient checkpointing on and attention restricted to SDPA's fused
kernels (no math fallback), and reads what happened from the trainer's parts in a step hook:
precision and gradient scaling, the optimizer's state, the attention processors, the weights.
The real sizes (marked `gpu`) are an SD-1.5-sized UNet at 512² and an SDXL-sized UNet at 1024²;
the toy sizes run in CI. fp16's CPU twin checks the trainer's refusal: accelerate runs fp16
mixed precision on CUDA only.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from gpu_support import Models, device, job_document, local_job, size_param

from bench.gpu_models import ModelSize
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_CONFIG, EXIT_FAILED
from kubetune_trainer.job import RunResult, run_job
from kubetune_trainer.parts import StepRecord
from tests.trainer.trainer_probe import running_trainers

COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
STEPS = 2
"""Optimizer steps of a test's job (gpu_support.job_document): enough to see weights move."""
FP16_STEPS = 6
"""fp16 starts at a loss scale of 65536 and skips each step that overflows, halving the scale: room for five."""


class Watch:
    """A step hook: what the trainer's parts looked like after its first and last steps (the running trainer
    is the last of `built`, which `train` fills)."""

    def __init__(self) -> None:
        self.built: list[Any] = []
        self.steps: list[int] = []
        self.scales: list[float] = []
        self.first: dict[str, Any] = {}
        self.last_weights: dict[str, Any] = {}

    def __call__(self, record: StepRecord) -> None:
        trainer = self.built[-1]
        parts = trainer.p
        self.steps.append(record.step)
        if parts.accelerator.scaler is not None:
            self.scales.append(float(parts.accelerator.scaler.get_scale()))
        if not self.first:
            self.first = self.describe(trainer)
        if record.step == record.total_steps:
            unet = parts.components.denoiser
            self.last_weights = {"conv_in.weight": unet.conv_in.weight.detach().float().cpu()}

    @staticmethod
    def describe(trainer: Any) -> dict[str, Any]:
        parts = trainer.p
        unet = parts.components.denoiser
        trained = trainer.trainable_parameters()
        largest = max(trained, key=lambda p: p.numel())
        optimizer = getattr(parts.optimizer, "optimizer", parts.optimizer)  # accelerate's wrapper
        state = optimizer.state.get(largest, {})
        return {
            "device": largest.device.type,
            "trained_dtypes": {str(p.dtype) for p in trained},
            "frozen_dtypes": {str(p.dtype) for p in unet.parameters() if not p.requires_grad},
            "attention": {type(p).__name__ for p in unet.attn_processors.values()},
            "checkpointing": bool(unet.is_gradient_checkpointing),
            "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
            "state_dtypes": {key: str(value.dtype) for key, value in state.items() if hasattr(value, "dtype")},
        }


@contextmanager
def fused_attention_only() -> Iterator[None]:
    """SDPA may use its flash, memory-efficient or cuDNN kernels, never the math fallback (which raises)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        yield


def train(job: Any, scratch: Path, hooks: list[Any]) -> RunResult:
    with fused_attention_only(), running_trainers() as built:
        for hook in hooks:
            if isinstance(hook, Watch):
                hook.built = built
        return run_job(job, RuntimeConfig(scratch=scratch, log_every=0), hooks=hooks)


def lora_b_norm(result: RunResult) -> float:
    """Norm of the exported adapter's up-projections (zero at peft's initialisation)."""
    from safetensors.torch import load_file

    weights = load_file(result.progress["outputs"]["lora"]["diffusers"])
    return math.sqrt(sum(float(w.float().square().sum()) for k, w in weights.items() if "lora_B" in k
                         or "lora.up" in k))


def base_tensor(folder: Path, name: str) -> Any:
    """Tensor `name` of the model as saved (any shard), in float32."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as weights:
            if name in weights.keys():  # noqa: SIM118 (safe_open has keys(), not __contains__)
                return weights.get_tensor(name).float()
    raise AssertionError(f"{name} is in no safetensors file of {folder}")


def assert_trained_on_device(watch: Watch, steps: int) -> None:
    assert watch.steps == list(range(1, steps + 1))
    assert watch.first["device"] == device()
    assert watch.first["attention"] == {"AttnProcessor2_0"}, "every attention layer goes through SDPA"
    assert watch.first["checkpointing"]


@pytest.mark.parametrize(("size", "precision"), [
    size_param("toy-sd", "bf16"), size_param("toy-sd", "fp16"), size_param("toy-sdxl", "bf16"),
    size_param("sd15", "bf16"), size_param("sd15", "fp16"), size_param("sdxl", "bf16"),
])
def test_lora_at_mixed_precision(size: ModelSize, precision: str, models: Models, tmp_path: Path) -> None:
    steps = FP16_STEPS if precision == "fp16" else STEPS
    job = local_job(models, size, tmp_path / "out", training={"mixedPrecision": precision, "maxSteps": steps})
    watch = Watch()
    result = train(job, tmp_path / "scratch", [watch])
    if precision == "fp16" and device() == "cpu":
        assert (result.exit_code, result.reason) == (EXIT_CONFIG, "InvalidConfiguration"), result.message
        assert "fp16 needs a GPU" in result.message
        return
    assert result.exit_code == 0, result.message
    assert_trained_on_device(watch, steps)
    assert watch.first["trained_dtypes"] == {"torch.float32"}, "adapters train in float32 under autocast"
    assert watch.first["frozen_dtypes"] == {f"torch.{COMPUTE_DTYPES[precision]}"}
    if precision == "fp16":  # gradient scaling: a GradScaler whose scale stays finite
        assert len(watch.scales) == steps and all(0 < s < math.inf for s in watch.scales), watch.scales
    else:
        assert watch.scales == []
    assert math.isfinite(result.progress["stepLoss"])
    assert lora_b_norm(result) > 0, "no optimizer step reached the adapters"


@pytest.mark.parametrize("size", [size_param("toy-sd"), size_param("toy-sdxl"), size_param("sd15"),
                                  size_param("sdxl")])
def test_full_fine_tune_with_8bit_adam(size: ModelSize, models: Models, tmp_path: Path) -> None:
    job = local_job(models, size, tmp_path / "out", method={"type": "full"},
                    training={"optimizer": "adamw8bit", "mixedPrecision": "bf16"})
    watch = Watch()
    result = train(job, tmp_path / "scratch", [watch])
    assert result.exit_code == 0, result.message
    assert_trained_on_device(watch, STEPS)
    assert watch.first["optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit"
    assert watch.first["state_dtypes"]["state1"] == "torch.uint8", watch.first["state_dtypes"]
    assert watch.first["trained_dtypes"] == {"torch.float32"}
    before = base_tensor(models.model(size) / "unet", "conv_in.weight")
    assert not before.equal(watch.last_weights["conv_in.weight"]), "the UNet's weights did not change"
    assert math.isfinite(result.progress["stepLoss"])
    assert (Path(result.progress["outputs"]["pipeline"]) / "model_index.json").is_file()


@pytest.mark.parametrize("size", [size_param("toy-sd"), size_param("sd15")])
def test_resume_from_a_checkpoint_reaches_the_uninterrupted_weights(size: ModelSize, models: Models,
                                                                   tmp_path: Path) -> None:
    """Crash after step 3 (checkpoint at 2), resume: the adapter equals an uninterrupted 4-step run's.

    On CPU the two agree to float rounding; on CUDA, where kernels such as the attention backward
    may sum in a different order from run to run, to 1e-2 of the adapter's norm, while a resume
    that lost the optimizer state or the random streams is off by tens of percent.
    """
    import torch
    from safetensors.torch import load_file

    training = {"maxSteps": 4, "mixedPrecision": "bf16"}
    output = {"checkpointEvery": 2}

    def crash_after_three(record: StepRecord) -> None:
        if record.step == 3:
            raise RuntimeError("killed after step 3")

    straight = train(local_job(models, size, tmp_path / "a", training=training, output=output),
                     tmp_path / "scratch-a", [])
    assert straight.exit_code == 0, straight.message
    job = local_job(models, size, tmp_path / "b", training=training, output=output)
    crashed = train(job, tmp_path / "scratch-b1", [crash_after_three])
    assert crashed.exit_code == EXIT_FAILED
    assert [c["step"] for c in crashed.progress["checkpoints"]] == [2]
    watch = Watch()
    resumed = train(job, tmp_path / "scratch-b2", [watch])
    assert resumed.exit_code == 0, resumed.message
    assert watch.steps == [3, 4] and watch.first["device"] == device()

    want, got = (load_file(r.progress["outputs"]["lora"]["diffusers"]) for r in (straight, resumed))
    assert want.keys() == got.keys()
    want_all = torch.cat([want[k].float().flatten() for k in sorted(want)])
    got_all = torch.cat([got[k].float().flatten() for k in sorted(want)])
    relative = float((got_all - want_all).norm() / want_all.norm())
    assert relative < (1e-5 if device() == "cpu" else 1e-2), relative


@pytest.mark.parametrize("size", [size_param("toy-sd", marks=[pytest.mark.integration]), size_param("sd15")])
def test_kubetune_train_under_torchrun(size: ModelSize, models: Models, tmp_path: Path) -> None:
    """`kubetune train` as torchrun starts it in a one-GPU pod: NCCL on CUDA (gloo on CPU), world size 1."""
    doc = job_document(models, size, tmp_path / "out", training={"mixedPrecision": "bf16"})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    probe, termination = tmp_path / "probe.json", tmp_path / "termination.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(Path(__file__).with_name("step_probe.py")), str(probe),
               "train", "--config", str(tmp_path / "job.yaml"), "--mode", "local", "--port", "0",
               "--scratch", str(tmp_path / "scratch"), "--termination-log", str(termination)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(termination.read_text())
    assert result["phase"] == "Succeeded" and result["step"] == STEPS, result
    seen = json.loads(probe.read_text())
    backend = "nccl" if device() == "cuda" else "gloo"
    assert seen == {"steps": STEPS, "backend": backend, "world_size": 1, "device": device()}, seen
