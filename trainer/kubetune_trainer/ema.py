"""Exponential moving average of the trained weights (`training.ema`, full fine-tunes).

`NoEma` stands in when it is off, so the loop always calls `step()` and the export always
runs inside `applied()`. The average is part of every checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kubetune.api.spec import EmaSpec


class NoEma:
    def step(self, params: list[Any]) -> None:
        return

    @contextmanager
    def applied(self, params: list[Any]) -> Iterator[None]:
        yield

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return


class Ema:
    """diffusers' EMAModel over the trained parameters; the export uses the averaged weights."""

    def __init__(self, spec: EmaSpec, params: list[Any]) -> None:
        from diffusers.training_utils import EMAModel

        self.model = EMAModel(params, decay=spec.decay)

    def step(self, params: list[Any]) -> None:
        self.model.step(params)

    @contextmanager
    def applied(self, params: list[Any]) -> Iterator[None]:
        """Swap the averaged weights in for the duration, then put the trained ones back."""
        self.model.store(params)
        self.model.copy_to(params)
        try:
            yield
        finally:
            self.model.restore(params)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.model.load_state_dict(state)


def build_ema(spec: EmaSpec | None, params: list[Any]) -> Ema | NoEma:
    return Ema(spec, params) if spec is not None else NoEma()
