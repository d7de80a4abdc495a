"""One trainer process per GPU: `kubetune train` re-runs itself under torchrun when asked to.

The operator sets Kubeflow's PET_* variables (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT), which torchrun reads as its own flags. When they ask for
more than one process and this process was not started by torchrun, `launch_workers` starts
torchrun with the same arguments, forwards stop signals, and exits with the code rank 0
recorded in its result, because torchrun itself reports any worker failure as 1 and the
operator must still see 78 for a configuration error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def requested_processes(env: dict[str, str] | None = None) -> int:
    """Processes the whole job asks for: nodes times processes per node."""
    env = os.environ if env is None else env
    return int(env.get("PET_NNODES", "1")) * int(env.get("PET_NPROC_PER_NODE", "1"))


def needs_launcher(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return requested_processes(env) > 1 and "LOCAL_RANK" not in env


def recorded_exit_code(result_file: Path | None) -> int | None:
    """The exit code rank 0 wrote into its result, if it wrote one."""
    if result_file is None:
        return None
    try:
        code = json.loads(result_file.read_text(encoding="utf-8")).get("exitCode")
    except (OSError, ValueError, AttributeError):
        return None
    return code if isinstance(code, int) else None


def launch_workers(cli_args: list[str], result_file: Path | None) -> int:
    """Run `python -m kubetune.cli <cli_args>` under torchrun; return rank 0's exit code."""
    if result_file is not None and result_file.is_file():
        result_file.write_text("", encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "-m", "kubetune.cli", *cli_args]
    proc = subprocess.Popen(command)

    def forward(signum: int, frame: object) -> None:
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    recorded = recorded_exit_code(result_file)
    return recorded if recorded is not None else code
