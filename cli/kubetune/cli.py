"""The `kubetune` console script: one parser, one module per subcommand.

Subcommand modules only define arguments here; anything heavy (torch, kopf) is imported
when that subcommand runs, so `kubetune validate` stays fast and works in the operator image.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kubetune.api.release import __version__
from kubetune.commands import COMMANDS

DESCRIPTION = """\
Fine-tune diffusion models (Stable Diffusion 1.x/2.x, SDXL) from a FineTuneJob:
on a Kubernetes cluster through the operator, or on this machine with `kubetune run`.
"""

EPILOG = """\
examples:
  kubetune validate examples/*.yaml     check jobs before applying them
  kubetune crd | kubectl apply -f -     install the FineTuneJob CRD
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
