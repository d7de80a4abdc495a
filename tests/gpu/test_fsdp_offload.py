"""`training.fsdp.cpuOffload` (FSDP2's CPU offload needs CUDA, so it is tested in this tier only): a full
fine-tune of the toy SD3 pipeline sharded with FSDP2 on one GPU, its shards kept in host memory, trains,
checkpoints its shard files and exports a pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api.validation import validate_document
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job


@pytest.mark.gpu
def test_a_sharded_full_fine_tune_with_cpu_offload_trains_checkpoints_and_exports(tmp_path: Path) -> None:
    import torch

    from kubetune_demo.tiny import build_image_dataset, build_tiny_pipeline

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = build_tiny_pipeline(tmp_path / "model", family="sd3")
    data = build_image_dataset(tmp_path / "data", count=8)
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "gpu-fsdp-offload", "namespace": "tests"},
           "spec": {"model": {"uri": str(model)}, "method": {"type": "full"},
                    "data": {"uri": str(data), "resolution": 64},
                    "output": {"uri": str(tmp_path / "out"), "checkpointEvery": 2},
                    "training": {"maxSteps": 3, "batchSize": 2, "parallelism": "fsdp",
                                 "fsdp": {"cpuOffload": True, "reshardAfterForward": False}},
                    "resources": {"gpusPerNode": 1}}}
    result = validate_document(doc, mode="local")
    assert result.job is not None, result.problems
    run = run_job(result.job, RuntimeConfig(scratch=tmp_path / "scratch", log_every=0))
    assert run.exit_code == 0, run.message
    manifest = json.loads((tmp_path / "out" / "checkpoints" / "step-2" / "manifest.json").read_text())
    assert {"shard-0-0.distcp", "shards.metadata"} <= set(manifest["files"])
    assert (Path(run.progress["outputs"]["pipeline"]) / "transformer").is_dir()
