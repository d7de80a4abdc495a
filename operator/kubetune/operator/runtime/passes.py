"""The one door into a reconcile pass: every trigger queues a FineTuneJob's key; one pool of workers runs passes.

Kopf's handlers (a job new to the operator, a changed spec, a changed Job), a failed pass's retry, the periodic resync
and rank 0's news all end in `Controller.enqueue`. The resync and the relist (which forgets what Kopf missed being
deleted) are loops of the operator's own, not Kopf timers: Kopf puts a finalizer on every object with a timer, so none
could be deleted while it is down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubetune.operator.cluster import Cluster
from kubetune.operator.reconcile import reconcile
from kubetune.operator.runtime.kube import ApiError
from kubetune.operator.runtime.liveness import PassClock
from kubetune.operator.runtime.metrics import OperatorMetrics
from kubetune.operator.runtime.watching import Caches, Key, key_of
from kubetune.operator.runtime.workqueue import WorkQueue
from kubetune.operator.settings import OperatorSettings

LOG = logging.getLogger(__name__)
RETRY_SECONDS = 10.0
RELIST_SECONDS = 300.0  # as Kopf's watch requests' server timeout


@dataclass
class Controller:
    """What Kopf's handlers and the workers share: the stores, the queue and the pass's collaborators."""

    cluster: Cluster
    settings: OperatorSettings
    metrics: OperatorMetrics
    caches: Caches = field(default_factory=Caches)
    queue: WorkQueue = field(default_factory=WorkQueue)
    passes: PassClock = field(default_factory=PassClock)
    progress: Any = None  # the `progress_reader.ProgressReader`, told when a job is gone
    relist: Callable[[], list[dict[str, Any]]] = list  # `KubeCluster.relist`: the FineTuneJobs it pruned
    synced: threading.Event = field(default_factory=threading.Event)
    """Set once Kopf has put its first listing of every collection into the stores; nothing is queued
    before, as a pass on a half-filled store would take existing children for missing ones."""
    generations: dict[str, Any] = field(default_factory=dict)
    """The `metadata.generation` Kopf last showed of each FineTuneJob, by uid: a new one is a changed spec."""

    def enqueue(self, key: Key) -> None:
        """Ask for a pass of `key`; a job without its Job yet (children to create) is urgent."""
        if self.synced.is_set():
            self.queue.add(key, urgent=not self.caches["Job"].labelled(*key))

    def run_pass(self, key: Key) -> bool:
        """Reconcile one FineTuneJob (gone: nothing to do); on an error, queue it again after a delay.

        A job deleted while its pass ran (or whose status write found it gone, `KubeCluster.write_status`) is
        forgotten once more: the pass may have recorded its phase or rank 0's reading after the delete."""
        if (body := self.caches["FineTuneJob"].get(*key)) is None:
            return True
        with self.passes.running(key), self.metrics.reconcile_duration.time():
            try:
                outcome = reconcile(body, self.cluster, self.settings, self.metrics, datetime.now(UTC))
            except ApiError as exc:
                self.metrics.api_errors.labels("reconcile").inc()
                outcome, why = None, f"Kubernetes API error: {exc}"
            except Exception:  # a worker that died would leave the queue to fewer and fewer workers
                LOG.exception("%s/%s: the pass failed", *key)
                return self._retry(key, "the pass failed")
        held = self.caches["FineTuneJob"].get(*key)
        if held is None or held["metadata"].get("uid") != body["metadata"].get("uid"):
            self.forget(body)
            return True
        if outcome is None:
            return self._retry(key, why)
        if outcome.errors:
            self.metrics.api_errors.labels("apply").inc(len(outcome.errors))
            return self._retry(key, "; ".join(outcome.errors))
        if outcome.deferred:
            self.queue.add(key)  # routine: its status after the other new jobs' children
        if outcome.events:
            LOG.info("%s/%s %s: %s", *key, outcome.status.phase, "; ".join(e.reason for e in outcome.events))
        return True

    def forget(self, body: dict[str, Any]) -> None:
        """Drop the operator's memory of a deleted job (its children go by owner reference)."""
        uid = body["metadata"].get("uid", "")
        self.caches["FineTuneJob"].remove(body)
        self.generations.pop(uid, None)
        self.metrics.forget(uid)
        if self.progress is not None:
            self.progress.forget(key_of(body))

    def _retry(self, key: Key, why: str) -> bool:
        LOG.warning("%s/%s: %s; retrying in %.0fs", *key, why, RETRY_SECONDS)
        self.queue.add_after(key, RETRY_SECONDS)
        return False

    def resync(self) -> None:
        """Queue a pass of every FineTuneJob (which also reads rank 0's `/progress` again)."""
        for body in self.caches["FineTuneJob"].items():
            self.enqueue(key_of(body))

    def relist_now(self) -> None:
        """List every collection again; forget the FineTuneJobs whose delete Kopf missed."""
        for body in self.relist():
            self.forget(body)

    def work(self) -> None:
        """One worker: passes from the queue until it is closed."""
        while (key := self.queue.get()) is not None:
            try:
                self.run_pass(key)  # type: ignore[arg-type]
            finally:
                self.queue.done(key)

    def start(self, stop: threading.Event) -> None:
        """The workers (until the queue is closed), the resync and relist loops (until `stop`): daemon threads."""
        def every(seconds: float, action: Callable[[], Any]) -> None:
            while not stop.wait(seconds):
                try:
                    action()
                except Exception as exc:  # a dead loop would resync or relist no more: the next round tries again
                    LOG.warning("%s failed: %s", action.__name__, exc)

        for name, seconds, action in (("resync", self.settings.resync_seconds, self.resync),
                                      ("relist", RELIST_SECONDS, self.relist_now)):
            threading.Thread(target=every, args=(seconds, action), name=f"kubetune-{name}", daemon=True).start()
        for n in range(self.settings.pass_workers):
            threading.Thread(target=self.work, name=f"kubetune-pass-{n}", daemon=True).start()
