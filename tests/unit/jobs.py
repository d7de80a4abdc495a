"""A chained builder for FineTuneJob documents, so each test states only what it changes."""

from __future__ import annotations

import copy
from typing import Any


def _minimal() -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "corgi-lora", "namespace": "team-a"},
        "spec": {
            "model": {"uri": "s3://models/sd15/"},
            "method": {"type": "lora"},
            "data": {"uri": "s3://datasets/corgis/"},
            "output": {"uri": "s3://outputs/corgi-lora/"},
            "training": {"maxSteps": 100},
        },
    }


class JobDoc:
    """`job().set("spec.training.maxSteps", 5).drop("spec.data.uri").obj()`."""

    def __init__(self) -> None:
        self._doc = _minimal()

    def set(self, path: str, value: Any) -> JobDoc:
        *parents, leaf = path.split(".")
        node = self._doc
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        return self

    def drop(self, path: str) -> JobDoc:
        *parents, leaf = path.split(".")
        node = self._doc
        for part in parents:
            node = node[part]
        del node[leaf]
        return self

    def obj(self) -> dict[str, Any]:
        return copy.deepcopy(self._doc)


def job() -> JobDoc:
    return JobDoc()
