"""Validation loss on held-out images, and early stopping on it.

The held-out loss uses fixed noise and fixed augmentations, so two evaluations differ only
because the weights changed. `NullValidator` stands in when nothing is held out.
"""

from __future__ import annotations

import random
from typing import Any

from kubetune.api.spec import DataSpec, EarlyStoppingSpec
from kubetune_trainer.data import Example, make_batch
from kubetune_trainer.objective import DiffusionObjective


class NullValidator:
    def due(self, step: int, last: bool) -> bool:
        return False

    def evaluate(self, unet: Any) -> float:
        raise NotImplementedError


class LossValidator:
    """Mean denoising loss over the held-out examples, every `every` steps and at the end."""

    def __init__(self, examples: list[Example], objective: DiffusionObjective, spec: DataSpec,
                 batch_size: int, every: int, seed: int) -> None:
        self.examples, self.objective, self.spec = examples, objective, spec
        self.batch_size, self.every, self.seed = batch_size, every, seed

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def evaluate(self, unet: Any) -> float:
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
