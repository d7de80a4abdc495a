"""Checkpoint retention policy and the complete/incomplete rules, on the local store."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.spec import OutputSpec
from kubetune_trainer.checkpoint import MANIFEST, Checkpointer, checkpoints_to_delete
from kubetune_trainer.storage import LocalStore


@pytest.mark.parametrize(
    ("steps", "keep", "deleted"),
    [
        ([], 3, []),
        ([10], 1, []),
        ([10, 20, 30], 3, []),
        ([10, 20, 30, 40], 3, [10]),
        ([40, 10, 30, 20], 2, [10, 20]),
        ([5, 5, 6], 1, [5]),
    ],
)
def test_checkpoints_to_delete_keeps_the_newest(steps: list[int], keep: int, deleted: list[int]) -> None:
    assert checkpoints_to_delete(steps, keep) == deleted


def _checkpointer(tmp_path: Path, keep: int = 2) -> Checkpointer:
    output = OutputSpec(uri=str(tmp_path / "out"), checkpoint_every=2, keep_checkpoints=keep)
    return Checkpointer(LocalStore(), output, tmp_path / "scratch")


def _payload(tmp_path: Path, step: int) -> dict[str, Path]:
    path = tmp_path / f"weights-{step}.bin"
    path.write_bytes(bytes([step]) * 10)
    return {"weights.bin": path}


def test_save_prunes_and_lists_complete_checkpoints(tmp_path: Path) -> None:
    ckpt = _checkpointer(tmp_path, keep=2)
    for step in (2, 4, 6):
        ckpt.save(step, _payload(tmp_path, step))
    assert [ref.step for ref in ckpt.complete()] == [4, 6]
    assert not (tmp_path / "out" / "checkpoints" / "step-2").exists()
    assert ckpt.complete()[-1].uri.endswith("/checkpoints/step-6/")


def test_a_folder_without_manifest_is_ignored_and_cleaned(tmp_path: Path) -> None:
    ckpt = _checkpointer(tmp_path)
    ckpt.save(2, _payload(tmp_path, 2))
    partial = tmp_path / "out" / "checkpoints" / "step-4"
    partial.mkdir(parents=True)
    (partial / "weights.bin").write_bytes(b"half")
    assert [ref.step for ref in ckpt.complete()] == [2]
    assert ckpt.clean_incomplete() == [4]
    assert not partial.exists()
    assert (tmp_path / "out" / "checkpoints" / "step-2" / MANIFEST).is_file()


def test_load_returns_the_saved_files(tmp_path: Path) -> None:
    ckpt = _checkpointer(tmp_path)
    ref, seconds = ckpt.save(8, _payload(tmp_path, 8))
    files = ckpt.load(ref, tmp_path / "restored")
    assert files["weights.bin"].read_bytes() == bytes([8]) * 10
    assert seconds >= 0
