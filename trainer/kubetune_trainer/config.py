"""Runtime settings of one trainer process: what the FineTuneJob spec does not say.

The spec says what to train; this says where this process keeps scratch files, which
port serves progress, where the termination message goes. Built once by the CLI, then
read-only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

POD_TERMINATION_LOG = Path("/dev/termination-log")
TERMINATION_LIMIT_BYTES = 4096


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how this process runs the job."""

    scratch: Path
    port: int | None = None
    """Port for /metrics and /progress; 0 picks a free one; None serves nothing."""
    host: str = "0.0.0.0"
    termination_path: Path | None = None
    status_file: Path | None = None
    pvc_root: Path = Path(os.environ.get("KUBETUNE_PVC_ROOT", "/mnt/pvc"))
    progress_bar: bool = False
    log_every: int = 10
    """0 = no step lines; otherwise, without a bar, a step line every 30 s and at every 5% (reporting.LogLines)."""
    quiet: bool = False
    """No log lines or bar at all: ranks other than 0 leave the talking to rank 0."""
