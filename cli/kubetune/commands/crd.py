"""`kubetune crd`: print the FineTuneJob CRD generated from the API model."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "crd",
        help="print the FineTuneJob CustomResourceDefinition (YAML)",
        description="Print the FineTuneJob CRD generated from the typed API model.",
    )
    parser.add_argument(
        "--format",
        choices=("yaml", "markdown"),
        default="yaml",
        help="yaml: the CRD object; markdown: the field reference (docs/api.md)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kubetune.api.crd import render_crd_yaml
    from kubetune.api.reference import render_reference

    sys.stdout.write(render_crd_yaml() if args.format == "yaml" else render_reference())
    return 0
