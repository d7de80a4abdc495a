"""Tests that look inside a running `Trainer` (its components, objective, reporters, stop request) catch it
where `run_job` builds it; step hooks themselves see only a `StepRecord` (`kubetune_trainer.parts`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from kubetune_trainer import assembly
from kubetune_trainer.trainer import Trainer


@contextmanager
def running_trainers() -> Iterator[list[Trainer]]:
    """Every Trainer `run_job` builds inside the block, in order: `[-1]` is the one running now."""
    built: list[Trainer] = []
    build = assembly.build_trainer

    def recording(*args: Any, **kwargs: Any) -> Trainer:
        built.append(build(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(assembly, "build_trainer", recording)
        yield built
