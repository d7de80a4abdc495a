"""Operator-wide settings: what is not in a FineTuneJob but shapes every child it gets.

One frozen object, built once from the command line and environment, passed to the pure
render and status functions so that they never read globals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kubetune.api.release import __version__

DEFAULT_IMAGE = f"ghcr.io/kubetune/kubetune-trainer:{__version__}"


@dataclass(frozen=True)
class OperatorSettings:
    """Defaults and ports the operator applies to every FineTuneJob."""

    default_image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    metrics_port: int = 9090
    """The trainer's `/metrics` and `/progress` port (container port named `metrics`)."""
    master_port: int = 29500
    """PyTorch rendezvous port on rank 0."""
    resync_seconds: float = 10.0
    """How often each job is reconciled and rank 0's progress is read."""
    progress_timeout_seconds: float = 3.0
    """The whole of one `/progress` read (connect, headers, body): a pod that drips bytes is cut off here."""
    progress_max_bytes: int = 64 << 10
    """A `/progress` answer longer than this is refused unread. The trainer's is a few KiB (16 samples, its
    checkpoints, 10 skipped files); a cap near it keeps a hostile answer's decoding cheap."""
    progress_backoff_max_seconds: float = 60.0
    """A job whose reads keep failing waits longer before each next one (doubling), at most this."""
    stuck_pass_seconds: float = 180.0
    """`/healthz` fails once a reconcile pass has run this long, or queued work has waited this long for a
    worker: the kubelet then restarts the operator. Six times the API client's 30 s request timeout."""
    pass_workers: int = 64
    """FineTuneJobs reconciled at once: the work queue's workers, which run every pass."""
    restart_backoff_seconds: float = 10.0
    """Wait before a retried attempt: this, doubled per counted restart, capped at five minutes."""

    @property
    def progress_interval_seconds(self) -> float:
        """Rank 0 is read at most this often: half a resync period, so every resync pass finds the read it
        asked for done and asks for the next one."""
        return self.resync_seconds / 2

    @classmethod
    def from_env(cls, **overrides: object) -> OperatorSettings:
        """Settings from `KUBETUNE_*` environment variables, then explicit overrides."""
        values: dict[str, object] = {}
        if image := os.environ.get("KUBETUNE_TRAINER_IMAGE"):
            values["default_image"] = image
        if resync := os.environ.get("KUBETUNE_RESYNC_SECONDS"):
            values["resync_seconds"] = float(resync)
        if stuck := os.environ.get("KUBETUNE_STUCK_PASS_SECONDS"):
            values["stuck_pass_seconds"] = float(stuck)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
