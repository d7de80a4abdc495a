"""The interfaces of the trainer's components: what the loop asks of each, and nothing more.

`Trainer` coordinates parts it receives built (see `assembly`): a batch source, a validator, a
sampler, a weight average, step hooks, and the stateful parts a checkpoint saves. Each is a
`Protocol`, so an implementation (or a test's stand-in) needs no base class; the do-nothing
ones (`NullValidator`, `NullSampler`, `NoEma`) let the loop ask without checking whether a
feature is on.

Step hooks see a `StepRecord`, a small frozen account of the step just finished, never the
trainer itself: what a hook needs of the run is in the record or given to it when it is built.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    """Something a checkpoint saves and a resume restores (optimizer, LR scheduler, data position, ...)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BatchSource(Stateful, Protocol):
    """Training batches, endlessly, epoch after epoch; its position is part of every checkpoint."""

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to, from 0."""
        ...

    def per_epoch(self) -> int:
        """Batches in one epoch on this rank."""
        ...

    def next_batch(self) -> Any: ...

    def close(self) -> None:
        """Stop any loader workers now rather than when the garbage collector reaches them."""
        ...


class Validator(Protocol):
    """The held-out loss, measured when `due`."""

    def due(self, step: int, last: bool) -> bool: ...

    def evaluate(self, denoiser: Any) -> float: ...


class ImageSampler(Protocol):
    """Sample images from the validation prompts, when `due`; each uploaded image as `{step, prompt, uri}`."""

    def due(self, step: int, last: bool) -> bool: ...

    def sample(self, step: int, denoiser: Any, publish: bool = True) -> list[dict[str, Any]]:
        """Images of the prompts; with `publish` False they are made (every rank runs a sharded denoiser) but
        not kept."""


class WeightAverage(Stateful, Protocol):
    """A running average of the trained weights (EMA), stepped after each optimizer step and swapped in
    for the export."""

    def step(self, params: list[Any]) -> None: ...

    def applied(self, params: list[Any]) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class StepRecord:
    """One finished optimizer step, as step hooks see it (after its validation, checkpoint and samples)."""

    step: int
    total_steps: int
    step_loss: float
    smoothed_loss: float
    """The step loss's exponential moving average (see `reporting.Smoothed`)."""
    learning_rate: float
    validation_loss: float | None = None
    """Measured at this step; None when no validation ran."""
    checkpoint_due: bool = False
    """The checkpoint cadence (`output.checkpointEvery`) falls on this step."""
    checkpoint_saved: bool = False
    """A checkpoint of this step was saved (the cadence's, the best step's, or before a stop)."""
    stop_signal: str | None = None
    """The signal all ranks agreed to stop on: this step is the run's last, checkpointed once the hooks ran."""
    early_stop: str | None = None
    """Why early stopping ended training at this step; None while it goes on."""

    @property
    def last(self) -> bool:
        """Training ends with this step: the planned last, an early stop, or a stop signal."""
        return self.step >= self.total_steps or self.early_stop is not None or self.stop_signal is not None


class StepHook(Protocol):
    """Called on every rank after each optimizer step; an exception fails the run as a crash would."""

    def __call__(self, record: StepRecord) -> None: ...
