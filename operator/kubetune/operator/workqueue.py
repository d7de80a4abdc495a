"""FineTuneJobs waiting for a reconcile pass: each waits at most once, new jobs first.

Every trigger ends here as a key. A burst of events while a pass is queued asks for no extra
pass (the queued one reads the newest state); a key whose pass is running is queued once more
when it ends, so no change goes unseen and two passes of one job never overlap.

The queue is also the burst policy. A key is urgent while its job has no Job yet (children to
create): urgent keys go first, and a routine key (a status to update) waits while urgent work is
queued or running, at most `YIELD_SECONDS`, so in a burst of new jobs their Jobs come first and
the status changes and events that pile up go out together; a new job's first status waits
too while others are new (`urgent_besides`). `waiting_seconds` tells liveness how long ready
work has gone without any worker taking it.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

YIELD_SECONDS = 5.0


class WorkQueue:
    """Keys in arrival order, urgent ones first; `get` hands each to one worker, `done` gives it back."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, yield_seconds: float = YIELD_SECONDS) -> None:
        self._clock, self._yield = clock, yield_seconds
        self._urgent: OrderedDict[Hashable, float] = OrderedDict()  # each queued key: when it was queued
        self._routine: OrderedDict[Hashable, float] = OrderedDict()
        self._active: dict[Hashable, bool] = {}  # each key a worker holds: whether it was urgent
        self._again: dict[Hashable, bool] = {}
        self._later: list[tuple[float, int, Hashable]] = []
        self._count, self._closed = itertools.count(), False
        self._taken_at = clock()  # when a worker last took a key, or ready keys last went from none to some
        self._cond = threading.Condition()

    def add(self, key: Hashable, urgent: bool = False) -> None:
        with self._cond:
            self._add(key, urgent)

    def _add(self, key: Hashable, urgent: bool) -> None:
        if key in self._active:
            self._again[key] = self._again.get(key, False) or urgent
        elif key not in self._urgent and (urgent or key not in self._routine):
            if not self._urgent and not self._routine:
                self._taken_at = self._clock()
            (self._urgent if urgent else self._routine)[key] = self._routine.pop(key, self._clock())
            self._cond.notify_all()

    def add_after(self, key: Hashable, seconds: float) -> None:
        """Queue `key` (routine) once `seconds` have passed: a retry after an error."""
        with self._cond:
            heapq.heappush(self._later, (self._clock() + seconds, next(self._count), key))
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Hashable | None:
        """The next key (now this worker's until `done`), or None when closed or timed out."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while not self._closed:
                self._release_due()
                oldest = next(iter(self._routine.values()), None)
                if self._urgent or (oldest is not None and (not self._busy() or self._clock() >= oldest + self._yield)):
                    urgent = bool(self._urgent)
                    key = (self._urgent if urgent else self._routine).popitem(last=False)[0]
                    self._taken_at, self._active[key] = self._clock(), urgent
                    return key
                wakes = [deadline, self._later[0][0] if self._later else None,
                         None if oldest is None else oldest + self._yield]
                wait = min((t - self._clock() for t in wakes if t is not None), default=None)
                if wait is not None and wait <= 0:
                    return None
                self._cond.wait(wait)
            return None

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._active.pop(key, None)
            if key in self._again:
                self._add(key, self._again.pop(key))
            self._cond.notify_all()  # a routine key may go now

    def urgent_besides(self, key: Hashable) -> bool:
        """Whether urgent keys other than `key` are queued or running."""
        with self._cond:
            return bool(self._urgent) or any(urgent for k, urgent in self._active.items() if k != key)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def waiting_seconds(self) -> float:
        """How long ready keys have waited with no worker taking any (0 when none is ready)."""
        with self._cond:
            self._release_due()
            return self._clock() - self._taken_at if self._urgent or self._routine else 0.0

    def __len__(self) -> int:
        with self._cond:
            return len(self._urgent) + len(self._routine)

    def _busy(self) -> bool:
        return bool(self._urgent) or any(self._active.values())

    def _release_due(self) -> None:
        while self._later and self._later[0][0] <= self._clock():
            self._add(heapq.heappop(self._later)[2], False)
