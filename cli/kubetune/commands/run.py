"""`kubetune run JOB.yaml`: train a FineTuneJob on this machine through the trainer's own code path."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ENDPOINTS_OFF = "[kubetune] /metrics and /progress are off; add --port PORT (0 = any free port) to serve them"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="train a FineTuneJob on this machine (no cluster needed)",
        description=(
            "Validate JOB as a local job (file:// and plain paths allowed), stage its model and data, "
            "train with a progress bar, and print the final status. Re-running the same job (same name and "
            "weight-shaping fields) resumes from the newest checkpoint under spec.output.uri that verifies; "
            "an output another job wrote is refused, untouched. /metrics (Prometheus) and /progress (JSON) are "
            "served on 127.0.0.1 only with --port; the URLs are printed when training starts. Exit code 0 only "
            "on success; 78 for a configuration error."
        ),
    )
    parser.add_argument("job", metavar="JOB", type=Path, help="FineTuneJob YAML or JSON file")
    parser.add_argument("--status-file", type=Path, help="write the final status JSON here")
    parser.add_argument("--scratch", type=Path, help="staging folder (default: .kubetune/<job name>)")
    parser.add_argument("--port", type=int, default=None,
                        help="serve /metrics and /progress on 127.0.0.1 at this port (0 = any free port; the URLs "
                             "are printed). Without --port neither is served")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kubetune_trainer.config import RuntimeConfig
    from kubetune_trainer.exitcodes import ConfigError
    from kubetune_trainer.job import load_job_file, run_job

    try:
        job = load_job_file(args.job, mode="local")
    except ConfigError as exc:
        print(f"kubetune run: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.port is None:
        print(ENDPOINTS_OFF, flush=True)
    runtime = RuntimeConfig(scratch=args.scratch or Path(".kubetune") / job.metadata.name, port=args.port,
                            host="127.0.0.1", status_file=args.status_file, progress_bar=not args.no_progress)
    result = run_job(job, runtime)
    print(json.dumps(result.as_dict(), indent=2))
    line = f"kubetune run: {result.phase}" + (f" ({result.reason}): {result.message}" if result.exit_code else "")
    print(line, file=sys.stderr if result.exit_code else sys.stdout)
    return result.exit_code
