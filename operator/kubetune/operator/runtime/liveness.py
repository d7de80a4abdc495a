"""Whether the operator still works: its reconcile passes end, and queued work finds a worker.

A process can answer HTTP while every reconcile worker hangs (a request that never returns,
a lock never released): every job's status then stands still, and only a restart helps.
`/healthz` asks `stuck_reason`; past `stuck_pass_seconds` it fails, and the kubelet restarts
the operator. A busy operator is not stuck: its passes end and its workers keep taking keys.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Protocol


class PassClock:
    """When each reconcile pass now running began (Kopf's handlers and the queue's workers alike)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._running: dict[int, tuple[Hashable, float]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def running(self, key: Hashable) -> Iterator[None]:
        ticket = next(self._ids)
        with self._lock:
            self._running[ticket] = (key, self._clock())
        try:
            yield
        finally:
            with self._lock:
                del self._running[ticket]

    def longest(self) -> tuple[Hashable, float] | None:
        """The pass running longest and for how many seconds; None when none runs."""
        with self._lock:
            if not self._running:
                return None
            key, began = min(self._running.values(), key=lambda item: item[1])
        return key, self._clock() - began


class Waiting(Protocol):
    def waiting_seconds(self) -> float: ...


def stuck_reason(passes: PassClock, queue: Waiting, limit: float) -> str | None:
    """Why the reconcile workers look stuck (None: they do not)."""
    longest = passes.longest()
    if longest is not None and longest[1] > limit:
        return f"the reconcile pass of {_name(longest[0])} has run for {longest[1]:.0f}s (limit {limit:g}s)"
    waited = queue.waiting_seconds()
    if waited > limit:
        return f"queued reconcile passes have waited {waited:.0f}s for a worker (limit {limit:g}s)"
    return None


def _name(key: Hashable) -> str:
    return "/".join(key) if isinstance(key, tuple) else str(key)
