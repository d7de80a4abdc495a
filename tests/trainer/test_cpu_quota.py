"""Torch's CPU threads follow the container's CPU limit (cgroup v2 or v1), shared by local ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_trainer.cpu_quota import cgroup_cpu_limit, fit_threads_to_cpu_limit, threads_for_limit


@pytest.mark.parametrize(("files", "limit"), [
    ({"cpu.max": "400000 100000\n"}, 4.0),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_cpu_limit(tmp_path: Path, files: dict[str, str], limit: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit


@pytest.mark.parametrize(("limit", "current", "env", "want"), [
    (4.0, 64, {}, 4),
    (1.5, 64, {}, 1),
    (0.5, 8, {}, 1),
    (8.0, 64, {"LOCAL_WORLD_SIZE": "2"}, 4),
    (16.0, 8, {}, None),  # never more threads than torch chose
    (4.0, 64, {"OMP_NUM_THREADS": "12"}, None),  # the user's choice stands
    (None, 64, {}, None),
])
def test_threads_for_limit(limit: float | None, current: int, env: dict[str, str], want: int | None) -> None:
    assert threads_for_limit(limit, current, env) == want


def test_fit_threads_sets_torch_threads(tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    try:
        assert fit_threads_to_cpu_limit(tmp_path, env={}) == (1 if before > 1 else None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
