"""When `kubetune train` starts torchrun, and which exit code it passes on."""

from __future__ import annotations

from pathlib import Path

from kubetune_trainer.launch import needs_launcher, recorded_exit_code


def test_launcher_decisions(tmp_path: Path) -> None:
    assert needs_launcher({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1"})
    assert not needs_launcher({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1"})
    assert not needs_launcher({"PET_NPROC_PER_NODE": "4", "LOCAL_RANK": "0"})
    (tmp_path / "r").write_text('{"exitCode": 78}')
    assert recorded_exit_code(tmp_path / "r") == 78 and recorded_exit_code(tmp_path / "none") is None
