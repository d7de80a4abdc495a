"""The operator's own Prometheus metrics, on their own registry, in the PyTorchJob style.

Counters move on status transitions (the same old -> new pairs that produce events), so
a restarted operator does not count a job twice: it resumes from the status it wrote.
docs/observability.md lists every series (a test holds the two to each other); no `*_created`.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from kubetune.api.status import PHASES, FineTuneJobStatus

PREFIX = "kubetune_operator"


class OperatorMetrics:
    """Every metric the operator exports, and how a transition moves them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # process-wide: undocumented `*_created` series that no dashboard reads
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        self.jobs = Gauge(f"{PREFIX}_jobs", "FineTuneJobs by phase.", ["namespace", "phase"], registry=reg)
        self.created = Counter(f"{PREFIX}_jobs_created", "FineTuneJobs seen for the first time.",
                               ["namespace"], registry=reg)
        self.succeeded = Counter(f"{PREFIX}_jobs_succeeded", "FineTuneJobs that succeeded.", ["namespace"],
                                 registry=reg)
        self.failed = Counter(f"{PREFIX}_jobs_failed", "FineTuneJobs that failed.", ["namespace"], registry=reg)
        self.restarted = Counter(f"{PREFIX}_jobs_restarted", "Attempts restarted from a checkpoint.",
                                 ["namespace"], registry=reg)
        self.reconcile_duration = Histogram(
            f"{PREFIX}_reconcile_duration_seconds", "Time of one reconcile pass.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0), registry=reg,
        )
        self.api_errors = Counter(f"{PREFIX}_api_errors", "Failed Kubernetes API calls.", ["operation"],
                                  registry=reg)
        self._phases: dict[str, tuple[str, str]] = {}
        self._namespaces: set[str] = set()
        self._lock = threading.Lock()

    def observe_transition(self, uid: str, namespace: str, old: FineTuneJobStatus, new: FineTuneJobStatus) -> None:
        if old.phase is None and new.phase is not None:
            self.created.labels(namespace).inc()
        if new.phase != old.phase:
            counter = {"Succeeded": self.succeeded, "Failed": self.failed, "Restarting": self.restarted}
            if new.phase in counter:
                counter[new.phase].labels(namespace).inc()
        if new.phase is not None:
            self._count_phase(uid, (namespace, new.phase))

    def forget(self, uid: str) -> None:
        """The FineTuneJob was deleted: it no longer counts in any phase."""
        self._count_phase(uid, None)

    def _count_phase(self, uid: str, where: tuple[str, str] | None) -> None:
        """Move one job between the phase gauges (each pass costs O(1), not O(jobs))."""
        with self._lock:
            before = self._phases.pop(uid, None)
            if where is not None:
                self._phases[uid] = where
                if where[0] not in self._namespaces:  # every phase series exists, at 0, from the start
                    self._namespaces.add(where[0])
                    for phase in PHASES:
                        self.jobs.labels(where[0], phase)
            if before != where:
                if before is not None:
                    self.jobs.labels(*before).dec()
                if where is not None:
                    self.jobs.labels(*where).inc()
