"""Helpers shared by the trainer tests and their fixtures: job documents and free ports."""

from __future__ import annotations

import copy
import socket
from typing import Any

from kubetune.api.resource import FineTuneJob
from kubetune.api.validation import validate_document


def job_document(model_uri: str, data_uri: str, output_uri: str, **spec: Any) -> dict[str, Any]:
    """A small valid local LoRA job at the API's default precision; keyword sections are merged into `spec`
    one level deep."""
    doc: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "test-lora", "namespace": "tests"},
        "spec": {
            "model": {"uri": model_uri},
            "method": {"type": "lora", "lora": {"rank": 4, "alpha": 8}},
            "data": {"uri": data_uri, "resolution": 64},
            "output": {"uri": output_uri, "checkpointEvery": 2, "keepCheckpoints": 2},
            "training": {"maxSteps": 4, "batchSize": 2, "learningRate": 1.0e-3, "seed": 11},
        },
    }
    for section, values in spec.items():
        doc["spec"].setdefault(section, {})
        doc["spec"][section] = {**doc["spec"][section], **values}
    return copy.deepcopy(doc)


def local_job(*args: Any, **kwargs: Any) -> FineTuneJob:
    """`job_document(...)` validated in local mode."""
    result = validate_document(job_document(*args, **kwargs), mode="local")
    assert result.job is not None, result.problems
    return result.job


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
