"""An opt-in record of what each rank did, so tests can check data-parallel training from outside.

Set `KUBETUNE_TRAINER_TRACE=<folder>` and every rank appends JSON lines to
`<folder>/rank-<R>.jsonl`:

    {"event": "step", "rank": R, "step": N, "epochs": [E, ...], "keys": ["<image>|...", ...],
     "digest": "<sha256 of the trainable weights after the optimizer step>"}
    {"event": "upload", "rank": R, "uri": "<every file this rank wrote to the output store>"}

`keys` are the prepared images of the step's batches (the latent-cache keys), `epochs` the data
epoch of each batch. Unset, `NoTrace` wraps nothing and adds no hook, so training pays nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune_trainer.parts import StepRecord

TRACE_ENV = "KUBETUNE_TRAINER_TRACE"


class TracedStream:
    """A batch stream that remembers which images it served since the last step record."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.keys: list[str] = []
        self.epochs: list[int] = []

    def next_batch(self) -> Any:
        batch = self.inner.next_batch()
        self.keys += batch.keys
        self.epochs.append(self.inner.epoch)
        return batch

    def __getattr__(self, name: str) -> Any:  # per_epoch, epoch, state_dict, load_state_dict
        return getattr(self.inner, name)


class TracedStore:
    """An object store that records every upload and download, then does it."""

    def __init__(self, inner: Any, trace: StepTrace) -> None:
        self.inner, self.trace = inner, trace

    def upload(self, path: Path, uri: str) -> None:
        self.trace.write({"event": "upload", "uri": uri})
        self.inner.upload(path, uri)

    def download(self, uri: str, path: Path) -> Any:
        self.trace.write({"event": "download", "uri": uri})
        return self.inner.download(uri, path)

    def __getattr__(self, name: str) -> Any:  # list, delete, create
        return getattr(self.inner, name)


def weights_digest(state: dict[str, Any]) -> str:
    """sha256 over the names and exact bytes of the tensors in `state`."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].numpy().tobytes())
    return digest.hexdigest()


class StepTrace:
    """Writes this rank's trace; a step hook records each optimizer step."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.rank = rank
        self.path = Path(folder) / f"rank-{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stream: TracedStream | None = None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"rank": self.rank, **record}) + "\n")

    def wrap_data(self, data: Any) -> TracedStream:
        self.stream = TracedStream(data)
        return self.stream

    def wrap_store(self, store: Any) -> TracedStore:
        return TracedStore(store, self)

    def hooks(self, weights: Callable[[], dict[str, Any]], held: Callable[[], int] | None = None) -> list[Any]:
        """A step hook that records each step with a digest of `weights()`, the trained weights this rank holds
        then, and `held()`, the bytes of training state it holds."""
        def record_step(record: StepRecord) -> None:
            self.record_step(record, weights(), held() if held else None)

        return [record_step]

    def record_step(self, record: StepRecord, weights: dict[str, Any], held: int | None = None) -> None:
        keys, epochs = (self.stream.keys, self.stream.epochs) if self.stream else ([], [])
        self.write({"event": "step", "step": record.step, "epochs": epochs, "keys": keys,
                    "digest": weights_digest(weights), "heldBytes": held})
        if self.stream:
            self.stream.keys, self.stream.epochs = [], []


class NoTrace:
    """Tracing off: everything passes through untouched."""

    def wrap_data(self, data: Any) -> Any:
        return data

    def wrap_store(self, store: Any) -> Any:
        return store

    def hooks(self, weights: Callable[[], dict[str, Any]], held: Callable[[], int] | None = None) -> list[Any]:
        return []


def trace_from_env(rank: int) -> StepTrace | NoTrace:
    folder = os.environ.get(TRACE_ENV)
    return StepTrace(Path(folder), rank) if folder else NoTrace()
