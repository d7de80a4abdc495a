"""FineTuneJobs waiting for a reconcile pass: each waits at most once, new jobs first.

A burst of events while a key is queued asks for no extra pass (the queued one reads the newest state); a key whose pass
is running is queued once more when it ends, so no change goes unseen and two passes of one job never overlap.

It is also the burst policy. A key is urgent while its job has no Job yet (children to create), and goes first; at most
`ROUTINE_AT_ONCE` routine keys (a status to update), never every worker, are out at a time, each handed out once no
urgent work is queued or running, or after `YIELD_SECONDS`. So in a burst of new jobs their Jobs come first, and the
status changes and events that pile up (a new job's first one too, `urgent_besides`) go out together.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Hashable

YIELD_SECONDS = 5.0
ROUTINE_AT_ONCE = 8


class WorkQueue:
    """Keys in arrival order, urgent ones first; `get` hands each to one worker, `done` gives it back."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, yield_seconds: float = YIELD_SECONDS,
                 routine_at_once: int = ROUTINE_AT_ONCE) -> None:
        if routine_at_once < 1:  # routine passes need a worker, and urgent ones another
            raise ValueError("OperatorSettings.pass_workers must be at least 2")
        self._clock, self._yield, self._routine_at_once = clock, yield_seconds, routine_at_once
        self._urgent: dict[Hashable, None] = {}  # queued keys, in arrival order
        self._routine: dict[Hashable, None] = {}
        self._active: dict[Hashable, bool] = {}  # each key a worker holds: whether it was urgent
        self._again: dict[Hashable, bool] = {}
        self._later: list[tuple[float, Hashable]] = []  # (when, key); keys, (namespace, name), break ties
        self._closed = False
        self._taken_at = clock()  # when a worker last took a key, or ready keys last went from none to some
        self._lock = threading.RLock()  # `add` is called with it held, from `done` and `_release_due`
        self._ready, self._calm = threading.Condition(self._lock), threading.Condition(self._lock)

    def add(self, key: Hashable, urgent: bool = False) -> None:
        with self._lock:
            if key in self._active:
                self._again[key] = self._again.get(key, False) or urgent
            elif key not in self._urgent and (urgent or key not in self._routine):
                if not self._urgent and not self._routine:
                    self._taken_at = self._clock()
                self._routine.pop(key, None)
                (self._urgent if urgent else self._routine)[key] = None
                self._ready.notify()

    def add_after(self, key: Hashable, seconds: float) -> None:
        """Queue `key` (routine) once `seconds` have passed: a retry after an error."""
        with self._lock:
            heapq.heappush(self._later, (self._clock() + seconds, key))
            self._ready.notify()

    def get(self, timeout: float | None = None) -> Hashable | None:
        """The next key (now this worker's until `done`), or None when closed or timed out."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._lock:
            while not self._closed:
                self._release_due()
                room = sum(not u for u in self._active.values()) < self._routine_at_once
                if queue := self._urgent or (self._routine if room else None):
                    key, urgent = next(iter(queue)), queue is self._urgent
                    del queue[key]
                    self._taken_at, self._active[key] = self._clock(), urgent
                    if not urgent:  # a status waits for the new jobs' passes, at most the yield
                        calm = lambda: self._closed or not (self._urgent or any(self._active.values()))  # noqa: E731
                        if self._calm.wait_for(calm, self._yield) and self._closed:  # stopping: no pass starts
                            del self._active[key]
                            return None
                    return key
                due = self._later[0][0] if self._later else None
                waits = [t - self._clock() for t in (deadline, due) if t is not None]
                if deadline is not None and min(waits) <= 0:
                    return None
                self._ready.wait(min(waits, default=None))
            return None

    def done(self, key: Hashable) -> None:
        with self._lock:
            urgent = self._active.pop(key, False)
            if key in self._again:
                self.add(key, self._again.pop(key))
            (self._calm.notify_all if urgent else self._ready.notify)()

    def urgent_besides(self, key: Hashable) -> bool:
        """Whether urgent keys other than `key` are queued or running."""
        with self._lock:
            return bool(self._urgent) or any(urgent for k, urgent in self._active.items() if k != key)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._ready.notify_all()
            self._calm.notify_all()

    def waiting_seconds(self) -> float:
        """How long ready keys have waited with no worker taking any (0 when none is ready), for liveness."""
        with self._lock:
            self._release_due()
            return self._clock() - self._taken_at if self._urgent or self._routine else 0.0

    def __len__(self) -> int:
        with self._lock:
            return len(self._urgent) + len(self._routine)

    def _release_due(self) -> None:
        while self._later and self._later[0][0] <= self._clock():
            self.add(heapq.heappop(self._later)[1])
