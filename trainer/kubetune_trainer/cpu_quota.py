"""Match torch's CPU threads to the container's CPU limit (cgroup quota), not to the node's cores.

In a pod limited to `resources.cpu: 4` on a 64-core node, torch starts a thread per core and the
kernel throttles them all to four CPUs' worth of time, which is slower than four threads. The
limit is shared by the processes torchrun starts in the pod. An explicit OMP_NUM_THREADS wins.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the container may use (cgroup v2 `cpu.max`, else v1 CFS quota); None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text(encoding="utf-8").split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
            period = int((folder / "cpu.cfs_period_us").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def threads_for_limit(limit: float | None, current: int, env: Mapping[str, str]) -> int | None:
    """The thread count to set, or None to leave torch's choice alone."""
    if limit is None or env.get("OMP_NUM_THREADS"):
        return None
    processes = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    threads = max(1, math.floor(limit / processes))
    return threads if threads < current else None


def fit_threads_to_cpu_limit(root: Path = CGROUP_ROOT, env: Mapping[str, str] = os.environ) -> int | None:
    """Lower torch's intra-op threads to this process's share of the CPU limit; the count set, or None."""
    import torch

    threads = threads_for_limit(cgroup_cpu_limit(root), torch.get_num_threads(), env)
    if threads is not None:
        torch.set_num_threads(threads)
    return threads
