"""Helpers of the GPU tier's tests: size parameters, the model and data cache, job documents.

Each test in tests/gpu is parametrised by a `ModelSize` (bench/gpu_models.py): the real sizes
(SD 1.5 at 512², SDXL at 1024²) carry the `gpu` mark, which tests/conftest.py skips with a
reason when no CUDA device is visible; the toy sizes are their CPU twins and run in the default
tier, through the same test body.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from bench.gpu_models import SIZES, ModelSize, build_model


def size_param(name: str, *extra: Any, marks: list[Any] | None = None) -> Any:
    """A pytest param for `SIZES[name]` (and `extra` values): marked `gpu` for the real sizes."""
    size = SIZES[name]
    ids = "-".join([size.label, *(str(e) for e in extra)])
    return pytest.param(size, *extra, id=ids, marks=[*([pytest.mark.gpu] if size.real else []), *(marks or [])])


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Models:
    """Model folders and datasets, each built on first use and kept for the session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._models: dict[str, Path] = {}
        self._data: dict[int, Path] = {}

    def model(self, size: ModelSize) -> Path:
        if size.name not in self._models:
            self._models[size.name] = build_model(self.root / f"model-{size.name}", size, device=device())
        return self._models[size.name]

    def data(self, size: ModelSize) -> Path:
        from kubetune_demo.tiny import build_image_dataset

        if size.resolution not in self._data:
            self._data[size.resolution] = build_image_dataset(self.root / f"data-{size.resolution}", count=6,
                                                              size=size.resolution)
        return self._data[size.resolution]


def job_document(models: Models, size: ModelSize, output_uri: Path, method: dict[str, Any] | None = None,
                 **spec: Any) -> dict[str, Any]:
    """A local job on `size`'s model and data (LoRA unless `method` says otherwise); keyword sections are
    merged into `spec` one level deep."""
    doc: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"gpu-{size.name}", "namespace": "tests"},
        "spec": {
            "model": {"uri": str(models.model(size))},
            "method": method or {"type": "lora", "lora": {"rank": 4, "alpha": 4}},
            "data": {"uri": str(models.data(size)), "resolution": size.resolution},
            "output": {"uri": str(output_uri), "checkpointEvery": 100, "keepCheckpoints": 2},
            "training": {"maxSteps": 2, "batchSize": size.batch_size, "learningRate": 1.0e-4, "seed": 5,
                         "gradientCheckpointing": True},
        },
    }
    for section, values in spec.items():
        doc["spec"][section] = {**doc["spec"].get(section, {}), **values}
    return copy.deepcopy(doc)


def local_job(*args: Any, **kwargs: Any) -> Any:
    from kubetune.api.validation import validate_document

    result = validate_document(job_document(*args, **kwargs), mode="local")
    assert result.job is not None, result.problems
    return result.job
