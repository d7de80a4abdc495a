"""The stateful parts a checkpoint saves (`checkpoint_state`), and the step record step hooks receive (`parts`)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from trainer_support import local_job

from kubetune.api.spec import OutputSpec
from kubetune_trainer.caches.mirror import CacheMirror
from kubetune_trainer.checkpoint import Checkpointer
from kubetune_trainer.checkpoint_state import STATE_FILE, TRAINABLE_FILE, CheckpointDamaged, RngState, TrainingState
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.job import run_job
from kubetune_trainer.parts import StepRecord
from kubetune_trainer.storage.local import LocalStore


class Counter:
    """A stateful part: its state is one number."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = int(state.get("value", -1))


def test_each_registered_part_is_saved_under_its_name_beside_the_step() -> None:
    state = TrainingState()
    state.register("optimizer", Counter(3))
    state.register("ema", Counter(5), required=False)
    assert state.state_dict(12) == {"step": 12, "optimizer": {"value": 3}, "ema": {"value": 5}}
    assert state.required() == {"step", "optimizer"}


def test_a_restore_loads_every_part_and_an_optional_one_missing_from_an_older_checkpoint_loads_empty() -> None:
    optimizer, ema = Counter(), Counter()
    state = TrainingState()
    state.register("optimizer", optimizer)
    state.register("ema", ema, required=False)
    assert state.load_state_dict({"step": 7, "optimizer": {"value": 9}}) == 7
    assert (optimizer.value, ema.value) == (9, -1)
    assert state.load_state_dict({"step": 8, "optimizer": {"value": 1}, "ema": {"value": 2}}, only=("ema",)) == 8
    assert (optimizer.value, ema.value) == (9, 2), "only the named part"


def test_the_random_streams_continue_where_they_were_saved() -> None:
    import numpy as np
    import torch

    rng = RngState()
    saved = rng.state_dict()
    drawn = (torch.rand(3), random.random(), np.random.rand(2))
    _ = (torch.rand(5), random.random(), np.random.rand(4))  # every stream moves on
    rng.load_state_dict(saved)
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(drawn[0], again[0]) and drawn[1] == again[1] and (drawn[2] == again[2]).all()


def _checkpointer(tmp_path: Path) -> tuple[Checkpointer, Counter]:
    output = OutputSpec(uri=str(tmp_path / "out"), checkpoint_every=2, keep_checkpoints=2)
    checkpointer, data = Checkpointer(LocalStore(), output, tmp_path / "scratch"), Counter(4)
    checkpointer.register("data", data)
    return checkpointer, data


def test_the_checkpointer_saves_weights_and_parts_and_reads_them_back(tmp_path: Path) -> None:
    import torch

    checkpointer, data = _checkpointer(tmp_path)
    ref, _ = checkpointer.save_training(2, {"unet.w": torch.ones(2, 3)})
    assert sorted(p.name for p in Path(ref.uri).iterdir()) == sorted(["manifest.json", STATE_FILE, TRAINABLE_FILE])
    assert not (tmp_path / "scratch" / "checkpoint-out" / "step-2").exists(), "the local copy goes once uploaded"
    data.value = 0
    weights, state = checkpointer.read_training(ref, {"unet.w": (2, 3)})
    assert torch.equal(weights["unet.w"], torch.ones(2, 3)) and checkpointer.restore(state) == 2 and data.value == 4
    assert not (tmp_path / "scratch" / "resume" / "step-2").exists(), "the download goes once loaded"


def test_a_checkpoint_that_does_not_fit_is_a_config_error_when_its_bytes_verified(tmp_path: Path) -> None:
    import torch

    checkpointer, _ = _checkpointer(tmp_path)
    ref, _ = checkpointer.save_training(2, {"unet.w": torch.ones(2, 3)})
    with pytest.raises(ConfigError, match="holds other tensors than this job trains"):
        checkpointer.read_training(ref, {"unet.w": (3, 3)})
    checkpointer.register("lr_scheduler", Counter())  # a required part the checkpoint lacks
    with pytest.raises(ConfigError, match="lacks lr_scheduler"):
        checkpointer.read_training(ref, {"unet.w": (2, 3)})


def test_a_listed_file_that_is_missing_is_damage(tmp_path: Path) -> None:
    import torch

    checkpointer, _ = _checkpointer(tmp_path)
    ref, _ = checkpointer.save_training(2, {"unet.w": torch.ones(2, 3)})
    (Path(ref.uri) / STATE_FILE).unlink()
    with pytest.raises(CheckpointDamaged, match="missing"):
        checkpointer.read_training(ref, {"unet.w": (2, 3)})


def _record(step: int, **fields: Any) -> StepRecord:
    return StepRecord(step=step, total_steps=10, step_loss=0.5, smoothed_loss=0.5, learning_rate=1e-4, **fields)


@pytest.mark.parametrize(("record", "last"), [
    (_record(3), False),
    (_record(10), True),
    (_record(3, early_stop="no better for 2 validations"), True),
    (_record(3, stop_signal="SIGTERM"), True),
])
def test_a_record_knows_whether_training_ends_with_its_step(record: StepRecord, last: bool) -> None:
    assert record.last is last


@pytest.mark.parametrize(("record", "published"), [
    (_record(3), False),
    (_record(4, checkpoint_due=True), True),
    (_record(10), True),
    (_record(3, early_stop="no better"), True),
    (_record(3, stop_signal="SIGTERM"), True),
])
def test_the_cache_mirror_publishes_when_a_checkpoint_is_due_and_at_the_end(record: StepRecord,
                                                                            published: bool) -> None:
    calls: list[int] = []
    mirror = CacheMirror.__new__(CacheMirror)  # only its hook is under test
    mirror.publish = lambda: calls.append(1) or 0  # type: ignore[method-assign]
    mirror.step_hook(record)
    assert bool(calls) is published


def test_hooks_receive_a_record_of_each_step(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    records: list[StepRecord] = []
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), data={"validationFraction": 0.25},
                    training={"maxSteps": 3}, validation={"every": 2}, output={"checkpointEvery": 2})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0), hooks=[records.append])
    assert result.exit_code == 0, result.message
    assert [(r.step, r.total_steps, r.checkpoint_due, r.checkpoint_saved) for r in records] == [
        (1, 3, False, False), (2, 3, True, True), (3, 3, False, False)]  # the last step's weights are exported
    assert [r.validation_loss is not None for r in records] == [False, True, True]
    assert all(r.learning_rate > 0 and r.smoothed_loss > 0 for r in records)
    assert records[-1].last and not records[0].last
    assert result.progress["stepLoss"] == round(records[-1].step_loss, 6)
