"""Fixtures of the GPU tier (tests/gpu/gpu_support.py says how the tier is laid out)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest
from gpu_support import Models

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS handle: repeatable GEMMs


@pytest.fixture(scope="session", autouse=True)
def _offline() -> Iterator[None]:
    """Nothing in this tier may reach a model hub."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if saved is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = saved


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(tmp_path_factory.mktemp("gpu-tier"))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one process-wide state that refuses a second mixed-precision setting; a trainer pod
    runs one job per process, these tests several (bf16, then fp16) in one."""
    import torch
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()  # the last run's models, before the next test builds its own (SDXL full: ~30 GB on the GPU)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
