"""`kubetune demo`: a short LoRA fine-tune of a tiny model from a loopback S3 server, offline."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="run a tiny LoRA fine-tune end to end on this machine (no GPU, cluster or network)",
        description=(
            "Build a tiny random-weight Stable Diffusion pipeline and a synthetic captioned image set, "
            "serve them from an embedded S3-compatible server on 127.0.0.1, run a short LoRA job "
            "through the same code as `kubetune run`, and print where the checkpoints, LoRA files "
            "and status are."
        ),
    )
    parser.add_argument("--workdir", type=Path, help="folder for inputs, scratch and outputs (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=12, help="training steps (default: 12)")
    parser.add_argument("--family", choices=("sd", "sdxl"), default="sd", help="tiny model family")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kubetune_trainer.demo import run_demo

    result, _ = run_demo(args.workdir, steps=args.steps, family=args.family)
    return result.exit_code
