"""Who owns an output prefix: a job's identity, recorded in every checkpoint manifest.

A job is its namespace/name plus a digest of the spec fields that shape the weights.
Re-applying the same job (same name, same weight-shaping fields) resumes from its own
checkpoints; a different job finds another owner there and stops (exit 78) instead of
resuming from, pruning or overwriting what it did not write.

Fields that only say where or how fast the job runs (nodes, GPUs, image, scheduling,
storage connection, mixed precision, loader workers, sampling) are not part of the
digest, so a resume may change them; nor are `training.maxSteps` and `training.epochs`,
so a finished run can be extended.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kubetune.api.resource import FineTuneJob
from kubetune.api.spec import FineTuneJobSpec

WEIGHT_FIELDS: tuple[str, ...] = (
    "model.uri",
    "model.variant",
    "method",
    "data.uri",
    "data.format",
    "data.captionColumn",
    "data.resolution",
    "data.aspectBuckets",
    "data.randomFlip",
    "data.centerCrop",
    "data.validationFraction",
    "training.batchSize",
    "training.gradientAccumulationSteps",
    "training.learningRate",
    "training.lrScheduler",
    "training.optimizer",
    "training.weightDecay",
    "training.maxGradNorm",
    "training.snrGamma",
    "training.noiseOffset",
    "training.ema",
    "training.seed",
)
"""The spec fields (camelCase paths, a section meaning all of it) whose values the digest covers."""

LOCAL_NAMESPACE = "default"
"""The namespace `kubetune run` gives a job whose metadata names none."""


def _pick(doc: dict[str, Any], path: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def spec_digest(spec: FineTuneJobSpec) -> str:
    """sha256 (first 16 hex digits) of the weight-shaping fields, defaults filled in."""
    doc = spec.model_dump(mode="json", by_alias=True)
    chosen = {path: _pick(doc, path) for path in WEIGHT_FIELDS}
    canonical = json.dumps(chosen, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class JobIdentity:
    """namespace/name plus the spec digest: what a checkpoint manifest records as its owner."""

    namespace: str
    name: str
    spec_digest: str

    @classmethod
    def of(cls, job: FineTuneJob) -> JobIdentity:
        return cls(job.metadata.namespace or LOCAL_NAMESPACE, job.metadata.name, spec_digest(job.spec))

    @classmethod
    def from_dict(cls, doc: Any) -> JobIdentity | None:
        """The identity a manifest recorded, or None when it records none (or not as a mapping)."""
        if not isinstance(doc, dict):
            return None
        fields = (doc.get("namespace"), doc.get("name"), doc.get("specDigest"))
        if not all(isinstance(f, str) and f for f in fields):
            return None
        return cls(*fields)

    def as_dict(self) -> dict[str, str]:
        return {"namespace": self.namespace, "name": self.name, "specDigest": self.spec_digest}

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} (spec {self.spec_digest})"

    def same_job(self, other: JobIdentity) -> bool:
        return (self.namespace, self.name) == (other.namespace, other.name)
