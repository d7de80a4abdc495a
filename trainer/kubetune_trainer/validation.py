"""Validation loss on held-out images, early stopping on it, and which step's weights to export.

The held-out loss uses fixed noise and fixed augmentations, so two evaluations differ only
because the weights changed. `NullValidator` stands in when nothing is held out.
`BestValidation` remembers the step with the lowest validation loss (`output.export: best`);
`ExportLast` stands in when the last step is exported (`output.export: last`, or nothing held out).
"""

from __future__ import annotations

import math
import random
from typing import Any

from kubetune.api.spec import DataSpec, EarlyStoppingSpec, FineTuneJobSpec
from kubetune_trainer.data import Example, make_batch
from kubetune_trainer.objective import DiffusionObjective


class NullValidator:
    def due(self, step: int, last: bool) -> bool:
        return False

    def evaluate(self, denoiser: Any) -> float:
        raise NotImplementedError


class LossValidator:
    """Mean denoising loss over the held-out examples, every `every` steps and at the end."""

    def __init__(self, examples: list[Example], objective: DiffusionObjective, spec: DataSpec,
                 batch_size: int, every: int, seed: int) -> None:
        self.examples, self.objective, self.spec = examples, objective, spec
        self.batch_size, self.every, self.seed = batch_size, every, seed

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def evaluate(self, denoiser: Any) -> float:
        import torch

        losses = []
        with torch.no_grad(), torch.random.fork_rng(devices=[]), self.objective.components.evaluating():
            for start in range(0, len(self.examples), self.batch_size):
                chunk = self.examples[start : start + self.batch_size]
                items = [(ex, random.Random(f"val-{self.seed}-{start + i}")) for i, ex in enumerate(chunk)]
                generator = torch.Generator().manual_seed(self.seed + start)
                loss = self.objective.loss(make_batch(items, self.spec), generator)
                losses.append(float(loss) * len(chunk))
        return sum(losses) / len(self.examples)


class EarlyStopper:
    """Says stop after `patience` evaluations without an improvement of at least `min_delta`."""

    def __init__(self, spec: EarlyStoppingSpec | None) -> None:
        self.spec = spec
        self.best: float | None = None
        self.bad = 0

    def update(self, loss: float) -> bool:
        if self.spec is None:
            return False
        if self.best is None or loss < self.best - self.spec.min_delta:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
        return self.bad >= self.spec.patience

    def explain(self) -> str:
        """Why it said stop, in one line."""
        delta = self.spec.min_delta if self.spec else 0.0
        return (f"validation loss has not improved on its best ({self.best:.6g}) by more than {delta:g} "
                f"for {self.bad} evaluation(s) (training.earlyStopping)")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad = state.get("best"), int(state.get("bad", 0))


BEST_VALIDATION_LOSS = "BestValidationLoss"
"""`status.outputs.reason` when the outputs hold the best validation step's weights."""
LAST_STEP = "LastStep"
"""`status.outputs.reason` when they hold the last step's."""


class ExportLast:
    """The outputs hold the last step's weights; `why` says so in the export's log line."""

    step: int | None = None

    def __init__(self, why: str) -> None:
        self.why = why

    def update(self, step: int, loss: float) -> bool:
        return False

    def explain(self, last_step: int) -> str:
        return f"exporting step {last_step}, the last ({self.why})"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return


class BestValidation:
    """The step with the lowest validation loss so far, and the latest evaluation, for the export.

    A loss counts as a new best by the rule early stopping uses (lower than the best by more than
    `min_delta`), so the step exported is the one whose loss early stopping measured against.
    """

    def __init__(self, min_delta: float = 0.0) -> None:
        self.min_delta = min_delta
        self.step: int | None = None
        self.loss: float | None = None
        self.latest: tuple[int, float] | None = None

    def update(self, step: int, loss: float) -> bool:
        """Record an evaluation; True when it is a new best, whose weights must then be kept."""
        self.latest = (step, loss)
        if not math.isfinite(loss):  # a diverged evaluation is never the best
            return False
        if self.loss is None or loss < self.loss - self.min_delta:
            self.step, self.loss = step, loss
            return True
        return False

    def explain(self, last_step: int) -> str:
        """The export's log line: the step exported and how the last step compares."""
        if self.step is None:
            return f"exporting step {last_step}, the last (no validation loss was measured)"
        if last_step == self.step:
            return f"exporting step {self.step} (best validation loss {self.loss:.4f}, the last step)"
        if self.latest is not None and self.latest[0] == last_step:
            last = f"last step {last_step} had {self.latest[1]:.4f}"
        else:
            last = f"last step {last_step} was not evaluated"
        return f"exporting step {self.step} (best validation loss {self.loss:.4f}; {last})"

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "latest": list(self.latest) if self.latest else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints written before best tracking hold no state: the best is then found again from here."""
        self.step, self.loss = state.get("step"), state.get("loss")
        latest = state.get("latest")
        self.latest = (int(latest[0]), float(latest[1])) if latest else None


def build_export_choice(spec: FineTuneJobSpec, validating: bool) -> BestValidation | ExportLast:
    """`output.export: best` with a validation split tracks the best step; otherwise the last step is exported."""
    if spec.output.export == "last":
        return ExportLast("output.export is last")
    if not validating:
        return ExportLast("no validation split: data.validationFraction is 0 or holds out no image")
    stopping = spec.training.early_stopping
    return BestValidation(stopping.min_delta if stopping is not None else 0.0)
