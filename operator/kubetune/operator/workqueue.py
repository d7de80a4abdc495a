"""FineTuneJobs waiting for a reconcile pass, each waiting at most once.

A burst of child events (a Job's controller updates its status several times as its
pods start) or a resync round arriving while a pass is queued asks for no extra pass:
the one queued pass will read the newest state. A key whose pass is running is marked
and queued once more when that pass ends, so no change goes unseen, and two passes of
one job never run at once.

`waiting_seconds` tells liveness how long ready work has gone without any worker taking
it: a busy pool keeps taking keys, a stuck one does not.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable


class WorkQueue:
    """Keys in arrival order; `get` hands each to one worker, `done` gives it back."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ready: deque[Hashable] = deque()
        self._queued: set[Hashable] = set()
        self._active: set[Hashable] = set()
        self._again: set[Hashable] = set()
        self._later: list[tuple[float, int, Hashable]] = []
        self._count = 0
        self._closed = False
        self._taken_at = clock()
        """When a worker last took a key, or the ready keys last went from none to some."""
        self._cond = threading.Condition()

    def add(self, key: Hashable) -> None:
        with self._cond:
            self._add(key)

    def _add(self, key: Hashable) -> None:
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            if not self._ready:
                self._taken_at = self._clock()
            self._queued.add(key)
            self._ready.append(key)
            self._cond.notify()

    def add_after(self, key: Hashable, seconds: float) -> None:
        """Queue `key` once `seconds` have passed (a retry after an error)."""
        with self._cond:
            self._count += 1
            heapq.heappush(self._later, (self._clock() + seconds, self._count, key))
            self._cond.notify()

    def get(self, timeout: float | None = None) -> Hashable | None:
        """The next key (now this worker's until `done`), or None when closed or timed out."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                self._release_due()
                if self._closed:
                    return None
                if self._ready:
                    key = self._ready.popleft()
                    self._taken_at = self._clock()
                    self._queued.discard(key)
                    self._active.add(key)
                    return key
                wait = self._wait_seconds(deadline)
                if wait is not None and wait <= 0:
                    return None
                self._cond.wait(wait)

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._active.discard(key)
            if key in self._again:
                self._again.discard(key)
                self._add(key)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def waiting_seconds(self) -> float:
        """How long ready keys have waited with no worker taking any (0 when none is ready)."""
        with self._cond:
            self._release_due()
            return self._clock() - self._taken_at if self._ready else 0.0

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready)

    def _release_due(self) -> None:
        now = self._clock()
        while self._later and self._later[0][0] <= now:
            self._add(heapq.heappop(self._later)[2])

    def _wait_seconds(self, deadline: float | None) -> float | None:
        waits = [t - self._clock() for t in (deadline, self._later[0][0] if self._later else None) if t is not None]
        return min(waits) if waits else None
