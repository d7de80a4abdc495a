"""Best weights: with a validation split, the outputs hold the best validation step's weights, read back from
its checkpoint, which `keepCheckpoints` never prunes; `output.export: last` keeps the last step's.

The runs train a tiny LoRA at a learning rate high enough that validation loss rises again before the
end (bf16 on CPU is deterministic on one machine, so the trajectory is the same every run; where the CPU has
native bf16 the loss goes on to NaN, which is never the best): validation every 2 steps,
cadence checkpoints every 3, keepCheckpoints 1.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from trainer_probe import running_trainers
from trainer_support import free_port, job_document, local_job

from kubetune.api.spec import OutputSpec
from kubetune.operator.reports import parse_result
from kubetune_trainer.checkpoint import Checkpointer, checkpoints_to_delete
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_FAILED
from kubetune_trainer.job import run_job
from kubetune_trainer.parts import StepRecord
from kubetune_trainer.storage.local import LocalStore
from kubetune_trainer.validation import BestValidation, ExportLast, build_export_choice

STEPS = 10
PAST_ITS_BEST = {"data": {"validationFraction": 0.2}, "training": {"maxSteps": STEPS, "learningRate": 10.0},
                 "validation": {"every": 2}}


def _job(out: Path, tiny_sd: Path, squares: Path, export: str = "best") -> Any:
    return local_job(str(tiny_sd), str(squares), str(out), **PAST_ITS_BEST,
                     output={"checkpointEvery": 3, "keepCheckpoints": 1, "export": export})


class Watch:
    """A step hook: the validation losses the trainer measured, and the trained weights after the last step
    (read from the running trainer, the last of `built`)."""

    def __init__(self, built: list[Any]) -> None:
        self.built = built
        self.losses: dict[int, float] = {}
        self.last: dict[str, Any] = {}

    def __call__(self, record: StepRecord) -> None:
        if record.validation_loss is not None:
            self.losses[record.step] = record.validation_loss
        if record.step == STEPS:
            self.last = {key: value.clone() for key, value in self.built[-1].trainable_state().items()}  # not views


def _exported(outputs: dict[str, Any]) -> dict[str, Any]:
    """The exported diffusers LoRA file under the trainer's own names (`unet.<module>.lora_A.default.weight`)."""
    from safetensors.torch import load_file

    weights = load_file(outputs["lora"]["diffusers"])
    return {key.replace(".lora.down.", ".lora_A.default.").replace(".lora.up.", ".lora_B.default."): value
            for key, value in weights.items()}


def _checkpoint(out: Path, step: int) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step-{step}" / "trainable.safetensors"))


def _equal(got: dict[str, Any], want: dict[str, Any]) -> bool:
    """Bit for bit, NaN equal to NaN: on a CPU with native bf16 (AVX512-BF16) this learning rate drives the
    weights to NaN after the best step, elsewhere only to a higher loss; both runs must still agree."""
    import torch

    assert got.keys() == want.keys()
    return all(torch.allclose(got[key], want[key], rtol=0, atol=0, equal_nan=True) for key in want)


def _same_loss(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (out / "checkpoints").glob("step-*"))


def test_the_best_validation_step_is_exported_and_its_checkpoint_kept_through_a_resume(
    tiny_sd: Path, squares: Path, tmp_path: Path, capsys: Any
) -> None:
    with running_trainers() as built:
        watch = Watch(built)
        straight = run_job(_job(tmp_path / "a", tiny_sd, squares),
                           RuntimeConfig(scratch=tmp_path / "sa", log_every=0, termination_path=tmp_path / "term"),
                           hooks=[watch])
    log = capsys.readouterr().out
    assert straight.exit_code == 0, straight.message
    best = min(watch.losses, key=lambda step: watch.losses[step])
    assert sorted(watch.losses) == [2, 4, 6, 8, 10] and best < STEPS, f"the run must pass its best: {watch.losses}"

    outputs = straight.progress["outputs"]
    assert (outputs["step"], outputs["reason"]) == (best, "BestValidationLoss")
    assert straight.progress["step"] == STEPS
    assert _steps(tmp_path / "a") == sorted({best, 9}), "keepCheckpoints 1 rotates the cadence's; the best stays"
    exported = _exported(straight.progress["outputs"])
    assert _equal(exported, _checkpoint(tmp_path / "a", best)), "the outputs hold the best checkpoint's weights"
    assert not _equal(exported, watch.last), "and not the last step's"
    assert re.search(rf"exporting step {best} \(best validation loss {watch.losses[best]:.4f}; "
                     rf"last step {STEPS} had {watch.losses[STEPS]:.4f}\)", log)
    with (tmp_path / "a" / "final" / "test-lora.safetensors").open("rb") as kohya:
        header = json.loads(kohya.read(int.from_bytes(kohya.read(8), "little")))
    assert header["__metadata__"]["ss_steps"] == str(best)

    report = parse_result((tmp_path / "term").read_text())  # what the operator puts in status.outputs
    assert report is not None and report.outputs is not None
    assert (report.outputs.step, report.outputs.reason) == (best, "BestValidationLoss")

    crash_at = 9  # after the best step and the cadence checkpoint of step 9: the best is known from the state only
    crashed = run_job(_job(tmp_path / "b", tiny_sd, squares), RuntimeConfig(scratch=tmp_path / "sb1", log_every=0),
                      hooks=[_crash_after(crash_at)])
    assert crashed.exit_code == EXIT_FAILED
    assert _steps(tmp_path / "b") == sorted({best, crash_at})
    with running_trainers() as built:
        resumed_watch = Watch(built)
        resumed = run_job(_job(tmp_path / "b", tiny_sd, squares),
                          RuntimeConfig(scratch=tmp_path / "sb2", log_every=0), hooks=[resumed_watch])
    assert resumed.exit_code == 0, resumed.message
    assert sorted(resumed_watch.losses) == [STEPS], "the resumed run evaluated only step 10"
    assert _same_loss(resumed_watch.losses[STEPS], watch.losses[STEPS]), "resumed training matches the straight run"
    assert _equal(resumed_watch.last, watch.last)
    assert (resumed.progress["outputs"]["step"], resumed.progress["outputs"]["reason"]) == (best, "BestValidationLoss")
    assert _equal(_exported(resumed.progress["outputs"]), exported)


def _crash_after(step: int) -> Any:
    def hook(trainer: Any) -> None:
        if trainer.step == step:
            raise RuntimeError(f"killed after step {step}")

    return hook


def test_export_last_writes_the_last_steps_weights(tiny_sd: Path, squares: Path, tmp_path: Path,
                                                    capsys: Any) -> None:
    with running_trainers() as built:
        watch = Watch(built)
        result = run_job(_job(tmp_path / "out", tiny_sd, squares, export="last"),
                         RuntimeConfig(scratch=tmp_path / "s", log_every=0), hooks=[watch])
    assert result.exit_code == 0, result.message
    assert (result.progress["outputs"]["step"], result.progress["outputs"]["reason"]) == (STEPS, "LastStep")
    assert _equal(_exported(result.progress["outputs"]), watch.last)
    assert _steps(tmp_path / "out") == [9], "no best checkpoint is saved or kept"
    assert f"exporting step {STEPS}, the last (output.export is last)" in capsys.readouterr().out


def test_an_early_stopped_full_fine_tune_exports_the_ema_average_of_its_best_step(
    tiny_sd: Path, squares: Path, tmp_path: Path
) -> None:
    """minDelta 10 lets no evaluation improve on the first: early stopping ends the run at step 3 (patience 2),
    and the outputs hold step 1's EMA average, not step 3's, as they did before best weights."""
    import torch
    from diffusers import UNet2DConditionModel

    averages: dict[int, list[Any]] = {}

    def keep_average(record: StepRecord) -> None:
        averages[record.step] = [param.detach().clone() for param in built[-1].p.ema.model.shadow_params]

    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), method={"type": "full", "lora": None},
                    data={"validationFraction": 0.2}, validation={"every": 1},
                    training={"maxSteps": 20, "ema": {"decay": 0.5},
                              "earlyStopping": {"patience": 2, "minDelta": 10.0}})
    with running_trainers() as built:
        result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0), hooks=[keep_average])
    assert (result.exit_code, result.reason, result.progress["step"]) == (0, "EarlyStopped", 3), result.message
    outputs = result.progress["outputs"]
    assert (outputs["step"], outputs["reason"]) == (1, "BestValidationLoss")
    assert _steps(tmp_path / "out") == [1, 2]  # the best step's, saved off the cadence of 2, and the cadence's
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-1" / "training_state.pt", weights_only=True)
    exported = list(UNet2DConditionModel.from_pretrained(outputs["pipeline"] + "unet").parameters())
    for got, at_best in zip(exported, state["ema"]["shadow_params"], strict=True):
        assert torch.equal(got, at_best.to(got.dtype))
    assert all(torch.equal(a, b) for a, b in zip(averages[1], state["ema"]["shadow_params"], strict=True))
    assert any(not torch.equal(got, at_stop.to(got.dtype)) for got, at_stop in zip(exported, averages[3],
                                                                                   strict=True))


def test_a_damaged_best_checkpoint_leaves_the_last_steps_weights_exported(tiny_sd: Path, squares: Path,
                                                                          tmp_path: Path, capsys: Any) -> None:
    """minDelta 10: step 1 stays best, early stopping (patience 2) ends the run at step 3. The run is killed after
    step 2, step 1's weights are damaged, and the resumed run, which knows step 1 as its best from step 2's
    state, says why it exports step 3 instead."""
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), data={"validationFraction": 0.2},
                    validation={"every": 1}, training={"maxSteps": 20, "earlyStopping": {"patience": 2,
                                                                                         "minDelta": 10.0}})
    crashed = run_job(job, RuntimeConfig(scratch=tmp_path / "s1", log_every=0), hooks=[_crash_after(2)])
    assert crashed.exit_code == EXIT_FAILED and _steps(tmp_path / "out") == [1, 2]
    weights = tmp_path / "out" / "checkpoints" / "step-1" / "trainable.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)
    capsys.readouterr()
    steps: list[int] = []
    resumed = run_job(job, RuntimeConfig(scratch=tmp_path / "s2", log_every=0),
                      hooks=[lambda trainer: steps.append(trainer.step)])
    assert (resumed.exit_code, resumed.reason, steps) == (0, "EarlyStopped", [3]), resumed.message
    assert (resumed.progress["outputs"]["step"], resumed.progress["outputs"]["reason"]) == (3, "LastStep")
    assert ("checkpoint step-1, the best validation step's, cannot be exported (trainable.safetensors does not "
            "match the sha256 in its manifest.json); exporting the last step, 3, instead") in capsys.readouterr().out


@pytest.mark.integration
def test_two_ranks_agree_on_the_best_step_and_rank_0_exports_it(tiny_sd: Path, squares: Path,
                                                                  tmp_path: Path) -> None:
    """Two CPU processes (torchrun, gloo): both ranks take rank 0's validation loss, so they save the best
    step's checkpoint together (a barrier) and stop together; rank 0 exports the best step."""
    import yaml

    doc = job_document(str(tiny_sd), str(squares), str(tmp_path / "out"), data={"validationFraction": 0.2},
                       validation={"every": 2}, output={"checkpointEvery": 3, "keepCheckpoints": 1},
                       training={"maxSteps": 20, "batchSize": 1,
                                 "earlyStopping": {"patience": 1, "minDelta": 10.0}})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_MASTER_ADDR": "127.0.0.1",
           "PET_MASTER_PORT": str(free_port())}
    command = [sys.executable, "-m", "kubetune.cli", "train", "--config", str(tmp_path / "job.yaml"),
               "--mode", "local", "--termination-log", str(tmp_path / "termination"),
               "--scratch", str(tmp_path / "scratch")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "termination").read_text())
    assert (result["reason"], result["step"]) == ("EarlyStopped", 4)
    assert (result["outputs"]["step"], result["outputs"]["reason"]) == (2, "BestValidationLoss")
    assert _steps(tmp_path / "out") == [2, 3]
    exported = _exported(result["outputs"])
    assert _equal(exported, _checkpoint(tmp_path / "out", 2))


def test_without_a_validation_split_the_last_step_is_exported(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), training={"maxSteps": 2})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert result.exit_code == 0, result.message
    assert (result.progress["outputs"]["step"], result.progress["outputs"]["reason"]) == (2, "LastStep")


@pytest.mark.parametrize(
    ("steps", "keep", "damaged", "pinned", "deleted"),
    [
        ([2, 4, 6], 1, [], [2], [4]),  # the pinned best is out of rotation: keep 1 keeps 6, and 2
        ([2, 4, 6], 2, [], [6], []),  # a pinned newest one does not count toward keep: 2 and 4 stay
        ([2, 4], 1, [], [8], [2]),  # pinning a step with no checkpoint changes nothing
        ([2, 6, 8], 1, [4], [2], [4, 6]),  # a damaged folder goes once older than the oldest kept in rotation
        ([6, 8], 1, [2], [2], [2, 6]),  # pinning protects good checkpoints only
        ([2], 1, [], [2], []),
    ],
)
def test_a_pinned_checkpoint_is_never_deleted_nor_counted(steps: list[int], keep: int, damaged: list[int],
                                                          pinned: list[int], deleted: list[int]) -> None:
    assert checkpoints_to_delete(steps, keep, damaged, pinned) == deleted


def test_the_checkpointer_keeps_the_pinned_step_and_releases_the_previous_one(tmp_path: Path) -> None:
    ckpt = Checkpointer(LocalStore(), OutputSpec(uri=str(tmp_path / "out"), checkpoint_every=3, keep_checkpoints=1),
                        tmp_path / "scratch")
    payload = tmp_path / "w.bin"
    payload.write_bytes(b"w")
    for step, best in ((2, True), (3, False), (4, True), (6, False), (9, False)):
        if best:
            ckpt.pin(step)
        ckpt.save(step, {"w.bin": payload})
    assert [ref.step for ref in ckpt.complete()] == [4, 9]


@pytest.mark.parametrize(
    ("losses", "min_delta", "news", "best"),
    [
        ([1.0, 0.9, 0.8, 0.85, 0.95], 0.0, [1, 2, 3], (3, 0.8)),
        ([1.0, 0.95, 0.93, 0.5], 0.1, [1, 4], (4, 0.5)),  # 0.05 and 0.07 better do not count with minDelta 0.1
        ([1.0, 1.0], 0.0, [1], (1, 1.0)),  # an equal loss is no improvement: the earlier step stays best
    ],
)
def test_the_best_step_follows_early_stoppings_rule(losses: list[float], min_delta: float, news: list[int],
                                                    best: tuple[int, float]) -> None:
    tracker = BestValidation(min_delta)
    assert [step for step, loss in enumerate(losses, start=1) if tracker.update(step, loss)] == news
    assert (tracker.step, tracker.loss) == best
    restored = BestValidation(min_delta)
    restored.load_state_dict(tracker.state_dict())
    assert (restored.step, restored.loss, restored.latest) == (tracker.step, tracker.loss, tracker.latest)


def test_the_export_log_line_names_the_best_and_the_last() -> None:
    tracker = BestValidation()
    for step, loss in ((6, 0.1234), (12, 0.1301)):
        tracker.update(step, loss)
    assert tracker.explain(12) == "exporting step 6 (best validation loss 0.1234; last step 12 had 0.1301)"
    assert tracker.explain(13) == "exporting step 6 (best validation loss 0.1234; last step 13 was not evaluated)"
    assert BestValidation().explain(4) == "exporting step 4, the last (no validation loss was measured)"
    old = BestValidation()
    old.load_state_dict({})  # a checkpoint written before best tracking
    assert old.step is None


@pytest.mark.parametrize(
    ("export", "fraction", "early", "chosen"),
    [
        ("best", 0.2, None, "best 0"),
        ("best", 0.2, {"patience": 2, "minDelta": 0.05}, "best 0.05"),
        ("best", 0.0, None, "last: no validation split"),
        ("last", 0.2, None, "last: output.export is last"),
    ],
)
def test_export_choice(export: str, fraction: float, early: dict[str, Any] | None, chosen: str) -> None:
    training: dict[str, Any] = {"earlyStopping": early} if early else {}
    job = local_job("/m", "/d", "/o", output={"export": export}, data={"validationFraction": fraction},
                    training=training)
    choice = build_export_choice(job.spec, validating=fraction > 0)
    if isinstance(choice, BestValidation):
        assert f"best {choice.min_delta:g}" == chosen
    else:
        assert isinstance(choice, ExportLast) and chosen.startswith("last: ") and chosen[6:] in choice.why
