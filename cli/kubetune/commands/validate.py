"""`kubetune validate`: check FineTuneJob files and say, per problem, which field and how to fix it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_INVALID = 1
EXIT_UNREADABLE = 2


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "validate",
        help="check FineTuneJob YAML files (exit 0 when all are valid)",
        description=(
            "Validate every YAML document in FILE... as a FineTuneJob: schema, cross-field rules "
            "and URI schemes. Prints one line per problem with the field path."
        ),
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="YAML files; - reads standard input")
    parser.add_argument(
        "--local",
        action="store_true",
        help="validate for `kubetune run` on this machine (allows file:// and plain paths)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    parser.set_defaults(handler=run)


def _read(name: str) -> str:
    return sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")


def _check_file(name: str, mode: str, quiet: bool) -> int:
    from kubetune.api.validation import load_documents, validate_document, yaml_problem

    try:
        docs = load_documents(_read(name))
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{name}: cannot read: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    except Exception as exc:  # yaml.YAMLError and its subclasses carry the position
        print(f"{name}: not valid YAML: {yaml_problem(exc)}", file=sys.stderr)
        return EXIT_INVALID
    if not docs:
        print(f"{name}: no YAML documents found", file=sys.stderr)
        return EXIT_INVALID
    worst = 0
    for index, doc in enumerate(docs):
        result = validate_document(doc, mode=mode)
        label = _label(name, index, doc, len(docs))
        for problem in result.problems:
            print(f"{label}: {problem}", file=sys.stderr)
        if result.ok and not quiet:
            print(f"{label}: valid")
        worst = worst if result.ok else EXIT_INVALID
    return worst


def _label(name: str, index: int, doc: object, count: int) -> str:
    metadata = doc.get("metadata") if isinstance(doc, dict) else None
    job = metadata.get("name") if isinstance(metadata, dict) else None
    where = f"{name}#{index + 1}" if count > 1 else name
    return f"{where} ({job})" if isinstance(job, str) else where


def run(args: argparse.Namespace) -> int:
    mode = "local" if args.local else "cluster"
    return max(_check_file(name, mode, args.quiet) for name in args.files)
