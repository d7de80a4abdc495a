"""`kubetune demo`: a short LoRA fine-tune of a tiny model from a loopback S3 server, offline."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from kubetune.api.exitcodes import CONFIG_ERROR_EXIT_CODE

PROPS = ("kubetune_demo", "moto", "kubetune_trainer")
"""What the demo needs beyond the CLI: its props (a tiny model, a dataset, an S3 server on loopback)
and the trainer. The props are not part of the product packages; the `demo` extra installs them."""


def missing_props() -> list[str]:
    return [name for name in PROPS if importlib.util.find_spec(name) is None]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="run a tiny LoRA fine-tune end to end on this machine (no GPU, cluster or network)",
        description=(
            "Build a tiny random-weight pipeline of the chosen family and a synthetic captioned image set, "
            "serve them from an embedded in-memory S3-compatible server on 127.0.0.1 and run a short LoRA job "
            "through the same code as `kubetune run`. The outputs (LoRA weights, checkpoints, samples, report), "
            "the base pipeline it trained (base/) and the final status are copied to --out; the last lines "
            "print their paths and two lines of Python that load the LoRA into the base pipeline."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("kubetune-demo"),
                        help="where the results stay (default: ./kubetune-demo); a folder a previous demo "
                             "wrote is replaced, any other non-empty folder refused")
    parser.add_argument("--workdir", type=Path,
                        help="folder for inputs and staging, kept afterwards (default: a temp dir, removed)")
    parser.add_argument("--steps", type=int, default=12, help="training steps (default: 12)")
    parser.add_argument("--family", choices=("sd", "sdxl", "sd3", "flux"), default="sd",
                        help="tiny model family: SD 1.x, SDXL, SD3.5 or Flux.1 (default: sd)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    missing = missing_props()
    if missing:
        print(f"kubetune demo: {', '.join(missing)} not installed here; the demo needs the trainer and its props: "
              "pip install 'kubetune[trainer,demo]' (in a checkout: make demo)", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    from kubetune_demo.demo import run_demo
    from kubetune_trainer.exitcodes import ConfigError

    try:
        result, _ = run_demo(args.out, args.workdir, steps=args.steps, family=args.family)
    except ConfigError as exc:
        print(f"kubetune demo: {exc}", file=sys.stderr)
        return exc.exit_code
    return result.exit_code
