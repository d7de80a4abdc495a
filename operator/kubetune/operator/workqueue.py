"""FineTuneJobs waiting for a reconcile pass, each waiting at most once, new jobs first.

Every trigger ends here as a key. A burst of child events or a resync round arriving while
a pass is queued asks for no extra pass: the one queued pass will read the newest state. A
key whose pass is running is marked and queued once more when that pass ends, so no change
goes unseen, and two passes of one job never run at once.

The queue is also the operator's burst policy. A key is urgent while its job has no Job yet
(children to create): urgent keys are handed out first, and a routine key (a status to
update) waits while urgent work is queued or running, at most `YIELD_SECONDS`, so in a burst
of new jobs their Jobs come first and the status changes that pile up meanwhile go out as
one write. Writes that can wait (events, a new job's first status) ask `calm` and
`urgent_besides` before they go.

`waiting_seconds` tells liveness how long ready work has gone without any worker taking
it: a busy pool keeps taking keys, a stuck one does not.
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
        self._urgent: OrderedDict[Hashable, float] = OrderedDict()
        self._routine: OrderedDict[Hashable, float] = OrderedDict()
        """Queued keys, each with when it was queued."""
        self._active: dict[Hashable, bool] = {}
        """Keys a worker holds, each with whether it was urgent."""
        self._again: dict[Hashable, bool] = {}
        self._later: list[tuple[float, int, Hashable]] = []
        self._count = itertools.count()
        self._closed = False
        self._taken_at = clock()
        """When a worker last took a key, or the ready keys last went from none to some."""
        self._cond = threading.Condition()

    def add(self, key: Hashable, urgent: bool = False) -> None:
        with self._cond:
            self._add(key, urgent)

    def _add(self, key: Hashable, urgent: bool) -> None:
        if key in self._active:
            self._again[key] = self._again.get(key, False) or urgent
            return
        if key in self._urgent or (key in self._routine and not urgent):
            return
        if not self._urgent and not self._routine:
            self._taken_at = self._clock()
        since = self._routine.pop(key, self._clock())
        (self._urgent if urgent else self._routine)[key] = since
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
            while True:
                self._release_due()
                if self._closed:
                    return None
                if (key := self._take()) is not None:
                    return key
                oldest = self._oldest_routine()
                waits = [t - self._clock() for t in (deadline, self._later[0][0] if self._later else None,
                                                     None if oldest is None else oldest + self._yield) if t is not None]
                if waits and min(waits) <= 0:
                    return None
                self._cond.wait(min(waits) if waits else None)

    def _take(self) -> Hashable | None:
        urgent = bool(self._urgent)
        if urgent:
            key = self._urgent.popitem(last=False)[0]
        elif self._routine and (not self._busy() or self._clock() >= next(iter(self._routine.values())) + self._yield):
            key = self._routine.popitem(last=False)[0]
        else:
            return None
        self._taken_at = self._clock()
        self._active[key] = urgent
        return key

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._active.pop(key, None)
            if key in self._again:
                self._add(key, self._again.pop(key))
            self._cond.notify_all()  # a routine key, or a write waiting in `calm`, may go now

    def calm(self, seconds: float = YIELD_SECONDS) -> bool:
        """Wait (at most `seconds`) until no urgent key is queued or running; True when none is."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy(), seconds)

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

    def _oldest_routine(self) -> float | None:
        return next(iter(self._routine.values())) if self._routine else None

    def _release_due(self) -> None:
        while self._later and self._later[0][0] <= self._clock():
            self._add(heapq.heappop(self._later)[2], False)
