"""Held-out validation loss and early stopping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_support import local_job

from kubetune.api.spec import EarlyStoppingSpec
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.data import Dataset, Example, split_dataset
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.job import run_job
from kubetune_trainer.validation import EarlyStopper


@pytest.mark.parametrize(
    ("losses", "patience", "min_delta", "stops_at"),
    [
        ([1.0, 0.9, 0.8, 0.7], 2, 0.0, None),
        ([1.0, 1.1, 1.2], 2, 0.0, 2),
        ([1.0, 0.95, 0.93], 1, 0.1, 1),
        ([1.0, 1.0, 0.5, 0.6, 0.7, 0.8], 3, 0.0, 5),
    ],
)
def test_early_stopper(losses: list[float], patience: int, min_delta: float, stops_at: int | None) -> None:
    stopper = EarlyStopper(EarlyStoppingSpec(patience=patience, min_delta=min_delta))
    decisions = [stopper.update(loss) for loss in losses]
    assert (decisions.index(True) if True in decisions else None) == stops_at


def test_split_is_seeded_and_disjoint() -> None:
    dataset = Dataset([Example(Path(f"{i}.png"), str(i)) for i in range(20)], 0, "captions")
    train, held = split_dataset(dataset, 0.1, seed=5)
    assert len(held) == 2 and len(train.examples) == 18
    assert not {e.image for e in held} & {e.image for e in train.examples}
    assert held == split_dataset(dataset, 0.1, seed=5)[1]
    with pytest.raises(ConfigError, match="leaves no training images"):
        split_dataset(Dataset(dataset.examples[:1], 0, "captions"), 0.5, seed=5)


def test_run_reports_validation_loss_and_stops_early(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"),
                    data={"validationFraction": 0.2},
                    training={"maxSteps": 40, "learningRate": 1.0, "earlyStopping": {"patience": 1, "minDelta": 10.0}},
                    validation={"every": 1})
    runtime = RuntimeConfig(scratch=tmp_path / "s", log_every=0, termination_path=tmp_path / "termination")
    result = run_job(job, runtime)
    assert result.exit_code == 0, result.message
    assert result.progress["validationLoss"] is not None
    assert result.progress["step"] == 2
    assert Path(result.progress["outputs"]["lora"]["diffusers"]).is_file()
    final = json.loads((tmp_path / "termination").read_text())
    assert (final["phase"], final["reason"], final["step"]) == ("Succeeded", "EarlyStopped", 2)
    assert (final["outputs"]["step"], final["outputs"]["reason"]) == (1, "BestValidationLoss")  # not the last step
    assert final["message"].startswith("stopped early at step 2 of 40: validation loss has not improved")
    assert "for 1 evaluation(s)" in final["message"]


def test_a_run_without_early_stopping_completes(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), data={"validationFraction": 0.2},
                    training={"maxSteps": 2}, validation={"every": 1})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert (result.exit_code, result.reason, result.message) == (0, "Completed", "training finished")
    assert result.progress["step"] == 2
    assert result.progress["outputs"]["reason"] == "BestValidationLoss"


def test_a_diverged_evaluation_is_never_the_best() -> None:
    from kubetune_trainer.validation import BestValidation
    best = BestValidation()
    assert best.update(2, float("nan")) is False and best.step is None
    assert best.update(4, 0.5) is True and best.update(6, float("inf")) is False
    assert (best.step, best.loss, best.latest) == (4, 0.5, (6, float("inf")))
