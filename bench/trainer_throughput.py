"""Training images/s of `kubetune train` against diffusers' example LoRA script, same settings, same run.

Both trainers run as separate processes, one after the other, on the same model folder and
the same imagefolder dataset (images + metadata.jsonl with a `text` column): same resolution,
batch size, LoRA rank (alpha = rank, the example's choice), learning rate, seed, precision,
centre crop and random flip, constant schedule, no validation, no checkpoints mid-run.

How it measures: each training process runs under a small clock (`clock` below) that records
the time after every optimizer step through torch's global optimizer-step hook, the same
instrument for both sides. Steady-state throughput is

    images/s = (steps - warmup) * batch size / (time after the last step - time after step `warmup`)

so imports, model loading, dataset preparation, the first epoch (where our latent cache fills)
and the final save stay out of it; each side's whole wall time is printed beside it. With
`--repeats N` the sides alternate N times, each run in fresh folders, and the best run of
each side counts (the one least disturbed by other load on the machine).

CPU mode (default): the tiny random-weight SD 1.x pipeline from `kubetune_demo.tiny`.
GPU mode (`--device cuda`): a random-weight pipeline with the SD 1.5 UNet config (860M
parameters), the SD 1.5 VAE config and a full-width CLIP text encoder (768 hidden, 12 layers,
with the tiny character tokenizer) at 512²: LoRA against the example, full fine-tune ours
alone, with model-FLOPs utilisation from the FLOP counts in ANCHORS.md.

The example script is not part of this repository; bench/README.md says how to get the copy
matching the installed diffusers version.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

EXAMPLE_PATH = "examples/text_to_image/train_text_to_image_lora.py"
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the example's fixed choice

SD15_UNET_GFLOP = {"full": 2407.0, "lora": 1726.0}
"""Forward + backward GFLOP per image of the SD 1.5 UNet at 512² (ANCHORS.md)."""
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]
"""Dense bf16/fp16 tensor-core peaks by device-name part, first match wins (H100/H200 SXM: 989)."""


@dataclass(frozen=True)
class Settings:
    """What both trainers are told; one place, so the two command lines cannot drift apart."""

    device: str
    method: str
    resolution: int
    batch_size: int
    rank: int
    learning_rate: float
    seed: int
    precision: str
    random_flip: bool
    steps: int
    warmup: int
    repeats: int


@dataclass(frozen=True)
class Fixture:
    model: Path
    data: Path
    sd15_sized: bool


# --- model and data --------------------------------------------------------------------------


def build_cpu_fixture(root: Path, images: int, image_size: int) -> Fixture:
    from kubetune_demo.tiny import build_image_dataset, build_tiny_pipeline

    model = build_tiny_pipeline(root / "model", family="sd", seed=0)
    data = build_image_dataset(root / "data", count=images, size=image_size, layout="imagefolder")
    return Fixture(model, data, sd15_sized=False)


def build_sd15_sized_fixture(root: Path, images: int, image_size: int) -> Fixture:
    """Random weights in SD 1.5's shapes; only the tokenizer (and so the vocabulary) is tiny."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from kubetune_demo.tiny import build_image_dataset, write_tokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(root / "tokenizer-src")))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_attention_heads=12,
        num_hidden_layers=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(root / "model"))
    shutil.rmtree(root / "tokenizer-src", ignore_errors=True)
    data = build_image_dataset(root / "data", count=images, size=image_size, layout="imagefolder")
    return Fixture(root / "model", data, sd15_sized=True)


# --- the two command lines -------------------------------------------------------------------


def our_job(settings: Settings, fixture: Fixture, output: Path, steps: int) -> dict:
    method: dict = {"type": settings.method}
    if settings.method == "lora":
        method["lora"] = {"rank": settings.rank, "alpha": settings.rank, "targetModules": LORA_TARGETS}
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "throughput", "namespace": "bench"},
        "spec": {
            "model": {"uri": str(fixture.model)},
            "method": method,
            "data": {"uri": str(fixture.data), "format": "imagefolder", "resolution": settings.resolution,
                     "aspectBuckets": False, "centerCrop": True, "randomFlip": settings.random_flip},
            "output": {"uri": str(output), "checkpointEvery": 10_000_000, "keepCheckpoints": 1,
                       **({"formats": ["diffusers"]} if settings.method == "lora" else {})},
            "training": {"maxSteps": steps, "batchSize": settings.batch_size,
                         "learningRate": settings.learning_rate, "lrScheduler": {"type": "constant"},
                         "weightDecay": 1.0e-2, "maxGradNorm": 1.0, "mixedPrecision": settings.precision,
                         "seed": settings.seed},
        },
    }


def our_command(settings: Settings, fixture: Fixture, work: Path) -> list[str]:
    """`kubetune train` (the module behind the console script) on a job file written into `work`."""
    job_file = work / "job.json"
    job_file.write_text(json.dumps(our_job(settings, fixture, work / "output", settings.steps)), encoding="utf-8")
    return ["kubetune.cli", "train", "--config", str(job_file), "--mode", "local",
            "--scratch", str(work / "scratch"), "--port", "0", "--termination-log", str(work / "result.json")]


def example_command(script: Path, settings: Settings, fixture: Fixture, work: Path) -> list[str]:
    command = [
        str(script),
        "--pretrained_model_name_or_path", str(fixture.model), "--train_data_dir", str(fixture.data),
        "--caption_column", "text", "--resolution", str(settings.resolution), "--center_crop",
        "--train_batch_size", str(settings.batch_size), "--max_train_steps", str(settings.steps),
        "--learning_rate", str(settings.learning_rate), "--lr_scheduler", "constant", "--rank", str(settings.rank),
        "--seed", str(settings.seed), "--mixed_precision", settings.precision,
        "--checkpointing_steps", "10000000", "--output_dir", str(work / "output"),
        "--cache_dir", str(work / "datasets-cache"), "--report_to", "all",  # "all" = only installed trackers
    ]
    return command + (["--random_flip"] if settings.random_flip else [])


# --- running and timing ----------------------------------------------------------------------


def clock_main(argv: list[str]) -> None:
    """`clock OUT SYNC_STEPS TARGET ARGS...`: run TARGET (a .py file or a module) as __main__ and write
    the time after every optimizer step to OUT. The same instrument for both trainers: a global
    torch optimizer hook, so neither trainer's own logging is parsed or trusted.

    On a GPU the clock waits for the device at the steps in SYNC_STEPS (the window's ends) so that
    queued work is counted; elsewhere it adds no synchronisation.
    """
    import atexit
    import runpy

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    out, sync_steps, target, *rest = argv
    sync = {int(step) for step in sync_steps.split(",") if step}
    stamps: list[float] = []

    def after_step(optimizer: object, args: object, kwargs: object) -> None:
        if len(stamps) + 1 in sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    register_optimizer_step_post_hook(after_step)
    atexit.register(lambda: Path(out).write_text(json.dumps(stamps), encoding="utf-8"))
    sys.argv = [target, *rest]
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)


def child_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HOME=str(work / "hf-home"), PYTHONUNBUFFERED="1")
    return env


@dataclass
class Run:
    """One training process: its optimizer-step times and its whole wall time."""

    stamps: list[float]
    wall_seconds: float

    def step_seconds(self, settings: Settings) -> list[float]:
        """Durations of steps `warmup + 1` to the last, each from the end of the step before."""
        if len(self.stamps) != settings.steps:
            raise SystemExit(f"expected {settings.steps} optimizer steps, the clock saw {len(self.stamps)}")
        window = self.stamps[settings.warmup - 1 :]
        return [end - start for start, end in itertools.pairwise(window)]

    def images_per_second(self, settings: Settings) -> float:
        """Batch size / the median step time: steady state, robust to bursts of other load on the machine."""
        return settings.batch_size / statistics.median(self.step_seconds(settings))

    def mean_images_per_second(self, settings: Settings) -> float:
        """Images of the window / the window's wall time."""
        steps = self.step_seconds(settings)
        return len(steps) * settings.batch_size / sum(steps)


def timed_run(name: str, command: list[str], work: Path, settings: Settings) -> Run:
    """Run `command` (target and its arguments) under the clock; output to `work/log.txt`, shown on failure."""
    log, stamps = work / "log.txt", work / "step-times.json"
    clocked = [sys.executable, str(Path(__file__).resolve()), "clock", str(stamps),
               f"{settings.warmup},{settings.steps}", *command]
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        code = subprocess.call(clocked, cwd=work, env=child_env(work), stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if code != 0 or not stamps.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"{name} failed with exit code {code}:\n{tail}\ncommand: {' '.join(clocked)}")
    return Run(json.loads(stamps.read_text(encoding="utf-8")), seconds)


def measure(runners: dict[str, Callable[[Path], list[str]]], settings: Settings, root: Path) -> dict[str, list[Run]]:
    """Every side once per repeat, alternating, each run in a fresh folder (no cache carries over)."""
    runs: dict[str, list[Run]] = {name: [] for name in runners}
    for repeat in range(settings.repeats):
        for name, command_for in runners.items():
            work = root / f"{name}-{settings.method}-{repeat}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            run = timed_run(name, command_for(work), work, settings)
            runs[name].append(run)
            print(f"  {name:<9} run {repeat + 1}: {run.images_per_second(settings):8.2f} images/s "
                  f"(window mean {run.mean_images_per_second(settings):.2f}), {run.wall_seconds:6.1f} s wall, "
                  f"load {load_average()}", flush=True)
            shutil.rmtree(work / "scratch", ignore_errors=True)
    return runs


# --- reporting -------------------------------------------------------------------------------


def gpu_peak_tflops(override: float | None) -> tuple[float | None, str]:
    import torch

    name = torch.cuda.get_device_name(0)
    if override:
        return override, name
    return next((peak for part, peak in PEAK_TFLOPS if part in name), None), name


def mfu(images_per_second: float, settings: Settings, fixture: Fixture, peak_tflops: float | None) -> str:
    if not fixture.sd15_sized or settings.resolution != 512 or not peak_tflops:
        return "n/a"
    flop = images_per_second * SD15_UNET_GFLOP[settings.method] * 1e9
    return f"{100 * flop / (peak_tflops * 1e12):.1f}%"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def report(runs: dict[str, list[Run]], settings: Settings, fixture: Fixture, peak: float | None) -> None:
    print(f"\n{settings.method}: {settings.resolution}px, batch {settings.batch_size}, precision {settings.precision}, "
          f"steps {settings.warmup + 1}-{settings.steps} of {settings.steps}, best of {settings.repeats}")
    print(f"  {'trainer':<9} {'images/s':>9} {'MFU':>7} {'window mean':>12} {'whole run':>10}")
    rates = {}
    for name, side in runs.items():
        best = max(side, key=lambda run: run.images_per_second(settings))
        rates[name] = best.images_per_second(settings)
        print(f"  {name:<9} {rates[name]:9.2f} {mfu(rates[name], settings, fixture, peak):>7} "
              f"{best.mean_images_per_second(settings):12.2f} {best.wall_seconds:8.1f} s")
    if "diffusers" in rates:
        print(f"  ratio kubetune / diffusers example: {rates['kubetune'] / rates['diffusers']:.2f}x")


# --- entry point -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-script", type=Path, required=True,
                        help=f"diffusers' {EXAMPLE_PATH} matching the installed diffusers version")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--methods", default=None,
                        help="comma-separated: lora (against the example), full (ours alone); "
                             "default lora on CPU, lora,full on CUDA")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 on CPU, 512 on CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 on CPU, 8 on CUDA")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("no", "fp16", "bf16"), default=None,
                        help="mixed precision; default no (fp32) on CPU, bf16 on CUDA")
    parser.add_argument("--no-flip", action="store_true", help="turn random horizontal flip off for both")
    parser.add_argument("--images", type=int, default=16, help="dataset size")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run; default 60 (CPU), 80 (CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps left out of the timed window; default 10 (CPU), 20 (CUDA)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per side; the best counts")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="GPU dense bf16/fp16 peak for MFU (default: from the device name)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for both trainers (1 steadies figures on a busy shared machine); "
                             "default: torch's own choice")
    parser.add_argument("--workdir", type=Path, default=None, help="keep fixtures and logs here")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> tuple[Settings, list[str]]:
    gpu = args.device == "cuda"
    methods = (args.methods or ("lora,full" if gpu else "lora")).split(",")
    settings = Settings(
        device=args.device, method=methods[0], resolution=args.resolution or (512 if gpu else 64),
        batch_size=args.batch_size or (8 if gpu else 4), rank=args.rank, learning_rate=args.learning_rate,
        seed=args.seed, precision=args.precision or ("bf16" if gpu else "no"), random_flip=not args.no_flip,
        steps=args.steps or (80 if gpu else 60), warmup=args.warmup or (20 if gpu else 10), repeats=args.repeats,
    )
    if not 1 <= settings.warmup < settings.steps:
        raise SystemExit("--warmup must be at least 1 and below --steps")
    return settings, methods


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if device == "cpu" and torch.cuda.is_available():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # both trainers take a visible GPU by themselves


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    script = args.diffusers_script.resolve()
    if not script.is_file():
        raise SystemExit(f"{script} not found; bench/README.md (trainer throughput) says how to get it")
    settings, methods = settings_from(args)
    check_device(settings.device)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by both trainers' processes
    import diffusers
    import torch

    root = args.workdir or Path(tempfile.mkdtemp(prefix="kubetune-throughput-"))
    root.mkdir(parents=True, exist_ok=True)
    gpu = settings.device == "cuda"
    build = build_sd15_sized_fixture if gpu else build_cpu_fixture
    fixture = build(root / "fixture", args.images, settings.resolution)
    peak, device_name = gpu_peak_tflops(args.peak_tflops) if gpu else (None, "CPU")
    threads = args.threads or torch.get_num_threads()
    print(f"device: {device_name}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} threads), "
          f"diffusers {diffusers.__version__}")
    print(f"example: {script}")
    print(f"images/s = batch size / median time of steps {settings.warmup + 1}..{settings.steps}, timed by the same "
          "optimizer-step hook in both processes; best run of each side")
    for method in methods:
        run_settings = replace(settings, method=method)
        runners = {"kubetune": lambda work, s=run_settings: our_command(s, fixture, work)}
        if method == "lora":
            runners["diffusers"] = lambda work, s=run_settings: example_command(script, s, fixture, work)
        report(measure(runners, run_settings, root), run_settings, fixture, peak)
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["clock"]:
        clock_main(sys.argv[2:])
    else:
        sys.exit(main())
