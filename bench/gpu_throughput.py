"""GPU benchmark of `make gpu-check`: images/s and MFU of LoRA and full fine-tuning at 512², SD-1.5-sized UNet.

It reuses bench/trainer_throughput.py's instrument and command lines (each trainer in its own
process under the optimizer-step clock, steady-state images/s from the median step time) on a
random-weight pipeline with SD 1.5's shapes built on the GPU (bench/gpu_models.py), and adds:

- FLOP per image measured with torch.utils.flop_counter on one forward + backward of that UNet's
  config on the meta device (LoRA: frozen base, input gradients only), printed beside ANCHORS.md's
  1,726 / 2,407 GFLOP (the count matched both to four digits when this was written);
- MFU = images/s x measured FLOP per image / peak, against the datasheet's dense bf16 peak
  (989 TFLOP/s on H100/H200 SXM) and against a bf16 matrix product timed here, the ceiling
  actually reachable on this card;
- ours against diffusers' example LoRA script when a copy matching the installed diffusers is at
  hand (`--diffusers-script`, $KUBETUNE_DIFFUSERS_EXAMPLE, the wheel folder of `make gpu-wheels`, or
  the cache bench/README.md names); otherwise one line says why the comparison was skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import trainer_throughput as throughput
from bench.gpu_models import SIZES, build_model, unet_flop_per_image
from bench.gpu_wheels import DEFAULT_FOLDER, EXAMPLE_NAME, find_example


def example_script(explicit: Path | None, version: str) -> tuple[Path | None, str]:
    """diffusers' example script for `version` and the reason when there is none (or it cannot run)."""
    carried = DEFAULT_FOLDER / "examples" / version / EXAMPLE_NAME
    script = explicit or (carried if carried.is_file() else None) or find_example(version)
    if script is None:
        return None, (f"diffusers' example {EXAMPLE_NAME} for diffusers {version} is not at hand "
                      "(bench/README.md says where to put it; `make gpu-wheels` carries it when it is there)")
    if importlib.util.find_spec("datasets") is None:
        return None, f"{script} needs the `datasets` package, which this Python lacks"
    return script, ""


def meta_unet(model: Path) -> Any:
    """The model's UNet on the meta device: shapes without weights, enough to count FLOP (any dtype counts alike)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(model / "unet")))


def matmul_tflops(size: int = 8192, repeats: int = 20) -> float:
    """Rate of a bf16 size³ matrix product on random data, timed with CUDA events (median of `repeats`)."""
    import torch

    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size**3 / sorted(times)[len(times) // 2] / 1e12


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15",
                        help="sd15 (512², the benchmark); a toy size runs the same wiring on CPU as a smoke test")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--diffusers-script", type=Path, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by device name)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model, data and logs here")
    return parser.parse_args(argv)


def device_line(cuda: bool, peak_override: float | None) -> tuple[float | None, float | None, str]:
    """Datasheet peak, measured matmul rate and the device's name (no rates on CPU)."""
    if not cuda:
        return None, None, "CPU (a smoke run of the benchmark's wiring: no MFU)"
    peak, name = throughput.gpu_peak_tflops(peak_override)
    return peak, matmul_tflops(), name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    size, cuda = SIZES[args.size], torch.cuda.is_available()
    if size.real and not cuda:
        print("gpu benchmark: no CUDA device is visible to this Python (torch "
              f"{torch.__version__}); nothing was measured")
        return 2
    import diffusers

    from kubetune_demo.tiny import build_image_dataset

    started = time.perf_counter()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="kubetune-gpu-bench-"))
    model = build_model(root / "model", size, device="cuda" if cuda else "cpu", dtype="bfloat16")
    data = build_image_dataset(root / "data", count=args.images, size=size.resolution)
    fixture = throughput.Fixture(model, data, sd15_sized=size.name == "sd15")
    peak, ceiling, name = device_line(cuda, args.peak_tflops)
    script, why_not = example_script(args.diffusers_script, diffusers.__version__)
    rates = f"datasheet dense bf16 {peak or '?'} TFLOP/s, measured 8192³ bf16 matmul {ceiling:.0f} TFLOP/s; " \
        if ceiling else ""
    print(f"device: {name}; {rates}torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"model: {size.label}, random weights, built in {time.perf_counter() - started:.0f} s")
    print(f"comparison: {script}" if script else f"comparison skipped: {why_not}")
    for method in args.methods.split(","):
        flop = unet_flop_per_image(meta_unet(model), method, size.resolution)
        settings = throughput.Settings(
            device="cuda" if cuda else "cpu", method=method, resolution=size.resolution, batch_size=args.batch_size,
            rank=4, learning_rate=1e-4, seed=0, precision="bf16", random_flip=True, steps=args.steps,
            warmup=args.warmup, repeats=1)
        runners = {"kubetune": lambda work, s=settings: throughput.our_command(s, fixture, work)}
        if method == "lora" and script:
            runners["diffusers"] = lambda work, s=settings: throughput.example_command(script, s, fixture, work)
        runs = throughput.measure(runners, settings, root)
        throughput.report(runs, settings, fixture, peak)  # its MFU column uses ANCHORS.md's FLOP per image
        ours = max(run.images_per_second(settings) for run in runs["kubetune"])
        anchors = f", ANCHORS.md {throughput.SD15_UNET_GFLOP[method]:,.0f} GFLOP" if size.name == "sd15" else ""
        counted = f"{flop / 1e9:,.0f} GFLOP" if flop >= 1e10 else f"{flop / 1e6:,.1f} MFLOP"
        print(f"  FLOP per image (UNet fwd+bwd, {method}): measured {counted}{anchors}")
        mfu = [f"{100 * ours * flop / (rate * 1e12):.1f}% of {label}" for label, rate in
               (("the datasheet peak", peak), ("the measured matmul rate", ceiling)) if rate]
        if mfu:
            print(f"  MFU of kubetune with the measured FLOP: {', '.join(mfu)}")
    print(f"gpu benchmark: {time.perf_counter() - started:.0f} s")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
