"""Kill-and-resume: a run stopped after its second checkpoint continues from it (or from the one before, when it
is damaged) and ends where an uninterrupted run with the same seed ends, with no step trained twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_support import local_job

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_CONFIG, EXIT_FAILED
from kubetune_trainer.job import run_job


class Crash(RuntimeError):
    """Stands in for the pod being killed."""


def _record(steps: list[int]) -> Any:
    return lambda trainer: steps.append(trainer.step)


def _crash_after(step: int) -> Any:
    def hook(trainer: Any) -> None:
        if trainer.step == step:
            raise Crash(f"killed after step {step}")

    return hook


def _adapter(result: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(result.progress["outputs"]["lora"]["diffusers"])


def test_resume_after_second_checkpoint_matches_an_uninterrupted_run(
    tiny_sd: Path, squares: Path, tmp_path: Path
) -> None:
    import torch

    training = {"maxSteps": 6, "batchSize": 2, "gradientAccumulationSteps": 2,
                "lrScheduler": {"type": "cosine", "warmupSteps": 2}}
    straight = run_job(local_job(str(tiny_sd), str(squares), str(tmp_path / "a"), training=training),
                       RuntimeConfig(scratch=tmp_path / "scratch-a", log_every=0))
    assert straight.exit_code == 0, straight.message

    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "b"), training=training)
    first_steps: list[int] = []
    crashed = run_job(job, RuntimeConfig(scratch=tmp_path / "scratch-b1", log_every=0),
                      hooks=[_record(first_steps), _crash_after(4)])
    assert (crashed.exit_code, first_steps) == (EXIT_FAILED, [1, 2, 3, 4])
    assert [c["step"] for c in crashed.progress["checkpoints"]] == [2, 4]

    second_steps: list[int] = []
    resumed = run_job(job, RuntimeConfig(scratch=tmp_path / "scratch-b2", log_every=0),
                      hooks=[_record(second_steps)])
    assert resumed.exit_code == 0, resumed.message
    assert second_steps == [5, 6]
    assert resumed.progress["step"] == 6

    want, got = _adapter(straight), _adapter(resumed)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)  # bf16 on CPU is deterministic


def test_sigterm_checkpoints_and_stops_with_a_retryable_code(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    import os
    import signal

    from kubetune_trainer.exitcodes import EXIT_INTERRUPTED

    def preempt_after_two(trainer: Any) -> None:  # a signal during step 2's hooks: the ranks agree after step 3
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), training={"maxSteps": 6},
                    validation={"prompts": ["a red square"], "every": 1, "inferenceSteps": 1})
    stopped = run_job(job, RuntimeConfig(scratch=tmp_path / "s1", log_every=0), hooks=[preempt_after_two])
    assert (stopped.exit_code, stopped.reason) == (EXIT_INTERRUPTED, "Interrupted")
    assert "SIGTERM after step 3" in stopped.message
    assert [c["step"] for c in stopped.progress["checkpoints"]] == [2, 3]
    assert [s["step"] for s in stopped.progress["samples"]] == [1, 2]  # the grace period goes to the checkpoint
    steps: list[int] = []
    resumed = run_job(job, RuntimeConfig(scratch=tmp_path / "s2", log_every=0), hooks=[_record(steps)])
    assert resumed.exit_code == 0 and steps == [4, 5, 6]


def _legacy_manifest_with_garbage_weights(folder: Path) -> None:
    """A manifest as written before digests (sizes only), beside weights replaced by same-size garbage."""
    import json

    from kubetune_trainer.checkpoint import MANIFEST

    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = {name: entry["size"] for name, entry in manifest["files"].items()}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    weights = folder / "trainable.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)


def test_a_checkpoint_that_fails_to_load_is_skipped_for_the_previous_one(
    tiny_sd: Path, squares: Path, tmp_path: Path, capsys: Any
) -> None:
    import torch

    training = {"maxSteps": 6, "batchSize": 2, "lrScheduler": {"type": "cosine", "warmupSteps": 2}}
    straight = run_job(local_job(str(tiny_sd), str(squares), str(tmp_path / "a"), training=training),
                       RuntimeConfig(scratch=tmp_path / "scratch-a", log_every=0))
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "b"), training=training)
    crashed = run_job(job, RuntimeConfig(scratch=tmp_path / "scratch-b1", log_every=0), hooks=[_crash_after(4)])
    assert [c["step"] for c in crashed.progress["checkpoints"]] == [2, 4]
    _legacy_manifest_with_garbage_weights(tmp_path / "b" / "checkpoints" / "step-4")
    capsys.readouterr()

    steps: list[int] = []
    resumed = run_job(job, RuntimeConfig(scratch=tmp_path / "scratch-b2", log_every=0), hooks=[_record(steps)])
    log = capsys.readouterr().out
    assert resumed.exit_code == 0, resumed.message
    assert steps == [3, 4, 5, 6]
    assert "checkpoint step-4 skipped: trainable.safetensors does not load: SafetensorError" in log
    assert not (tmp_path / "scratch-b2" / "resume" / "step-4").exists()  # a skipped download leaves scratch
    want, got = _adapter(straight), _adapter(resumed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def _verified_but_unusable(folder: Path, how: str) -> None:
    """Replace the weights with bytes that do not load (or load as other tensors) and record their sha256,
    as a checkpoint looks to a trainer that cannot read what an intact checkpoint holds."""
    import hashlib
    import json

    import torch
    from safetensors.torch import save_file

    from kubetune_trainer.checkpoint import MANIFEST

    weights = folder / "trainable.safetensors"
    if how == "does not load":
        weights.write_bytes(b"\xff" * weights.stat().st_size)
    else:
        save_file({"other.weight": torch.zeros(3)}, str(weights))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["trainable.safetensors"] = {"size": weights.stat().st_size,
                                                  "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(("how", "code", "says"), [
    ("does not load", EXIT_FAILED, "trainable.safetensors matches the sha256 it was saved with but does not load"),
    ("other tensors", EXIT_CONFIG, "trainable.safetensors holds other tensors than this job trains, though its "
                                   "bytes match the sha256"),
])
def test_a_verified_checkpoint_that_cannot_be_used_stops_the_run_instead_of_resuming_from_an_older_one(
    tiny_sd: Path, squares: Path, tmp_path: Path, how: str, code: int, says: str,
) -> None:
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), training={"maxSteps": 6})
    crashed = run_job(job, RuntimeConfig(scratch=tmp_path / "s1", log_every=0), hooks=[_crash_after(4)])
    assert [c["step"] for c in crashed.progress["checkpoints"]] == [2, 4]
    _verified_but_unusable(tmp_path / "out" / "checkpoints" / "step-4", how)
    steps: list[int] = []
    stopped = run_job(job, RuntimeConfig(scratch=tmp_path / "s2", log_every=0), hooks=[_record(steps)])
    assert (stopped.exit_code, steps) == (code, []), stopped.message  # no step repeated from step 2
    assert says in stopped.message and "checkpoints/step-4/" in stopped.message
    assert (tmp_path / "out" / "checkpoints" / "step-4" / "trainable.safetensors").is_file()  # kept
