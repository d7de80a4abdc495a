"""`kubetune train --config FILE`: the trainer pod's entry point.

Reads the resolved FineTuneJob the operator mounts, trains (resuming from the newest
checkpoint), serves /metrics and /progress, and writes the result to the container
termination message. Exit code 78 means the job can never succeed as written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="trainer pod entry point: run the FineTuneJob in --config",
        description=(
            "Run one FineTuneJob inside a trainer pod. When PET_NNODES x PET_NPROC_PER_NODE > 1 it "
            "re-runs itself under torchrun (which reads the PET_* variables). Exit codes, of every process "
            "and every pod: 0 success, 1 failure (retryable), 75 storage unreachable (retryable), 76 a peer "
            "rank was lost or timed out in a collective (retryable), 78 configuration error (not "
            "retryable), 143 stopped by SIGTERM after a checkpoint every rank agreed on (retryable)."
        ),
    )
    parser.add_argument("--config", required=True, type=Path, metavar="FILE",
                        help="resolved FineTuneJob (YAML or JSON)")
    parser.add_argument("--scratch", type=Path, default=Path(os.environ.get("KUBETUNE_SCRATCH", "/scratch")),
                        help="staging folder for model, data and checkpoints (default: $KUBETUNE_SCRATCH or /scratch)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("KUBETUNE_STATUS_PORT", "8080")),
                        help="port for /metrics and /progress on rank 0 (0 = any free port)")
    parser.add_argument("--termination-log", type=Path,
                        default=Path(os.environ.get("KUBETUNE_TERMINATION_LOG", "/dev/termination-log")),
                        help="where the final result JSON goes: the container's terminationMessagePath "
                             "(default: $KUBETUNE_TERMINATION_LOG or /dev/termination-log; '' = nowhere)")
    parser.add_argument("--mode", choices=("cluster", "local"), default="cluster",
                        help="which URI schemes are allowed (default: cluster)")
    parser.set_defaults(handler=run)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("PET_NODE_RANK", "0")))


def _cli_args(args: argparse.Namespace) -> list[str]:
    return ["train", "--config", str(args.config), "--scratch", str(args.scratch), "--port", str(args.port),
            "--termination-log", str(args.termination_log), "--mode", args.mode]


def run(args: argparse.Namespace) -> int:
    from kubetune_trainer.config import RuntimeConfig
    from kubetune_trainer.exitcodes import ConfigError
    from kubetune_trainer.job import RunResult, load_job_file, run_job, write_result
    from kubetune_trainer.launch import launch_workers, needs_launcher, worker_status_file

    main, launcher = _rank() == 0, needs_launcher()
    termination = args.termination_log if str(args.termination_log) not in ("", ".") else None
    runtime = RuntimeConfig(scratch=args.scratch, port=args.port if main else None,
                            termination_path=termination if main or launcher else None,
                            status_file=worker_status_file(), quiet=not main)
    try:
        job = load_job_file(args.config, mode=args.mode)
    except ConfigError as exc:
        print(f"kubetune train: {exc}", file=sys.stderr)
        write_result(RunResult("Failed", exc.exit_code, exc.reason, str(exc)), runtime)
        return exc.exit_code
    if launcher:
        return launch_workers(_cli_args(args), termination, args.scratch / "worker-results",
                              job.spec.run_policy.termination_grace_period_seconds)
    result = run_job(job, runtime)
    print(f"kubetune train: {result.phase}: {result.message}", file=sys.stderr if result.exit_code else sys.stdout)
    return result.exit_code
