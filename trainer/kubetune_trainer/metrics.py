"""Prometheus metrics of the rank-0 trainer, on a registry of their own.

Names start with `kubetune_trainer_`, use base units, and carry the `namespace` and `name`
labels of the FineTuneJob (plus `term`, one of a fixed few, on `loss_term`): no step, no URI,
nothing with unbounded values or secrets. docs/observability.md lists every series (a test
holds the two to each other).

No metric pretends a value it does not have: a gauge has no sample until its first value
(no validation split: no `validation_loss` sample, not 0), and no `*_created` series.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.status import CheckpointRef
from kubetune_trainer.reporting import SMOOTHING, Reporter, Smoothed
from kubetune_trainer.storage.staging import StagingReport

PREFIX = "kubetune_trainer_"
LABELS = ("namespace", "name")


class PrometheusMetrics(Reporter):
    """Turns training events into gauges, counters and histograms."""

    def __init__(self, namespace: str, name: str) -> None:
        import torch
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # process-wide: undocumented series that no dashboard reads
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"namespace": namespace, "name": name}

        def family(kind: Any, metric: str, doc: str, labels: tuple[str, ...] = LABELS, **kwargs: Any) -> Any:
            return kind(PREFIX + metric, doc, labels, registry=self.registry, **kwargs)

        def make(kind: Any, metric: str, doc: str, **kwargs: Any) -> Any:  # a sample from the start: 0 is true
            return family(kind, metric, doc, **kwargs).labels(**self.labels)

        self.step_gauge = family(Gauge, "step", "Optimizer steps completed.")
        self.total_steps = family(Gauge, "total_steps", "Optimizer steps planned.")
        self.step_loss = family(Gauge, "step_loss", "Step loss: the raw training loss of the latest optimizer step.")
        self.smoothed_loss = family(Gauge, "smoothed_loss", "Smoothed loss: exponential moving average of the "
                                    f"step loss ({SMOOTHING:g} x previous + {1 - SMOOTHING:g} x step loss).")
        self.loss_term = family(Gauge, "loss_term", "Part of the latest step loss by term (DreamBooth: instance, "
                                "prior).", (*LABELS, "term"))
        self.validation_loss = family(Gauge, "validation_loss", "Loss on the held-out images at the latest "
                                      "evaluation (no sample without a validation split).")
        self.rate = family(Gauge, "images_per_second", "Training throughput of the latest step in images per second.")
        self.images = make(Counter, "images", "Images trained on by this process.")
        self.staged_bytes = make(Counter, "staged_bytes", "Bytes downloaded while staging model and data.")
        self.staging_seconds = make(Counter, "staging_seconds", "Seconds spent staging model and data.")
        self.checkpoint_seconds = make(Histogram, "checkpoint_upload_seconds", "Seconds to upload a checkpoint.",
                                       buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 1800))
        self.checkpoints_total = make(Counter, "checkpoints", "Checkpoints written.")
        gpu_memory = family(Gauge, "gpu_memory_allocated_bytes", "CUDA memory allocated by tensors (no sample "
                            "without CUDA).")
        if torch.cuda.is_available():  # read at scrape time
            gpu_memory.labels(**self.labels).set_function(torch.cuda.memory_allocated)
        self.smoothed = Smoothed()

    def _set(self, gauge: Any, value: float, **labels: str) -> None:
        """The gauge's sample for this job, created by its first value."""
        gauge.labels(**self.labels, **labels).set(value)

    def staged(self, what: str, report: StagingReport) -> None:
        self.staged_bytes.inc(report.bytes_downloaded)
        self.staging_seconds.inc(report.seconds)

    def started(self, step: int, total_steps: int) -> None:
        self._set(self.total_steps, total_steps)
        self._set(self.step_gauge, step)

    def step(self, step: int, loss: float, images: int, seconds: float, epoch: int = 1) -> None:
        self._set(self.step_gauge, step)
        self._set(self.step_loss, loss)
        self._set(self.smoothed_loss, self.smoothed.add(loss))
        if seconds > 0:
            self._set(self.rate, images / seconds)
        self.images.inc(images)

    def loss_terms(self, step: int, terms: dict[str, float]) -> None:
        for term, value in terms.items():
            self._set(self.loss_term, value, term=term)

    def validation(self, step: int, loss: float) -> None:
        self._set(self.validation_loss, loss)

    def checkpoints(self, refs: list[CheckpointRef], upload_seconds: float | None) -> None:
        if upload_seconds is not None:
            self.checkpoint_seconds.observe(upload_seconds)
            self.checkpoints_total.inc()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
