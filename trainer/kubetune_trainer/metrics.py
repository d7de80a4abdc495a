"""Prometheus metrics of the rank-0 trainer, on a registry of their own.

Names start with `kubetune_trainer_`, use base units, and carry the `namespace` and `name`
labels of the FineTuneJob (plus `term`, one of a fixed few, on `loss_term`): no step, no URI,
nothing with unbounded values or secrets.
"""

from __future__ import annotations

from typing import Any

from kubetune_trainer.checkpoint import CheckpointRef
from kubetune_trainer.reporting import Reporter
from kubetune_trainer.staging import StagingReport

PREFIX = "kubetune_trainer_"
LABELS = ("namespace", "name")


class PrometheusMetrics(Reporter):
    """Turns training events into gauges, counters and histograms."""

    def __init__(self, namespace: str, name: str) -> None:
        import torch
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"namespace": namespace, "name": name}

        def make(kind: Any, metric: str, doc: str, **kwargs: Any) -> Any:
            return kind(PREFIX + metric, doc, LABELS, registry=self.registry, **kwargs).labels(**labels)

        self.step_gauge = make(Gauge, "step", "Optimizer steps completed.")
        self.total_steps = make(Gauge, "total_steps", "Optimizer steps planned.")
        self.loss = make(Gauge, "loss", "Training loss of the latest step.")
        self.loss_term = Gauge(PREFIX + "loss_term", "Part of the latest step's training loss by term "
                               "(DreamBooth: instance, prior).", (*LABELS, "term"), registry=self.registry)
        self.labels = labels
        self.validation_loss = make(Gauge, "validation_loss", "Loss on the held-out images at the latest evaluation.")
        self.rate = make(Gauge, "images_per_second", "Training throughput of the latest step in images per second.")
        self.images = make(Counter, "images", "Images trained on by this process.")
        self.staged_bytes = make(Counter, "staged_bytes", "Bytes downloaded while staging model and data.")
        self.staging_seconds = make(Counter, "staging_seconds", "Seconds spent staging model and data.")
        self.checkpoint_seconds = make(Histogram, "checkpoint_upload_seconds", "Seconds to upload a checkpoint.",
                                       buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 1800))
        self.checkpoints_total = make(Counter, "checkpoints", "Checkpoints written.")
        gpu_memory = make(Gauge, "gpu_memory_allocated_bytes", "CUDA memory allocated by tensors (0 without CUDA).")
        if torch.cuda.is_available():  # read at scrape time
            gpu_memory.set_function(torch.cuda.memory_allocated)

    def staged(self, what: str, report: StagingReport) -> None:
        self.staged_bytes.inc(report.bytes_downloaded)
        self.staging_seconds.inc(report.seconds)

    def started(self, step: int, total_steps: int) -> None:
        self.total_steps.set(total_steps)
        self.step_gauge.set(step)

    def step(self, step: int, loss: float, images: int, seconds: float, epoch: int = 1) -> None:
        self.step_gauge.set(step)
        self.loss.set(loss)
        self.rate.set(images / seconds if seconds > 0 else 0.0)
        self.images.inc(images)

    def loss_terms(self, step: int, terms: dict[str, float]) -> None:
        for term, value in terms.items():
            self.loss_term.labels(**self.labels, term=term).set(value)

    def validation(self, step: int, loss: float) -> None:
        self.validation_loss.set(loss)

    def checkpoints(self, refs: list[CheckpointRef], upload_seconds: float | None) -> None:
        if upload_seconds is not None:
            self.checkpoint_seconds.observe(upload_seconds)
            self.checkpoints_total.inc()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
