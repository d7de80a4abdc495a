"""A training run whose every S3 request goes through a faulty network: the model and data are staged, checkpoints
written and read back, the run killed and resumed, all through `S3FaultProxy` at 5% of each fault kind, and the
weights come out equal to those of a run that met no fault.

It runs against the servers of the whole fault suite (`FULL_FAULT_SERVERS`, SeaweedFS by default). Nothing is
patched: the trainer's boto3 speaks HTTP to the proxy, the proxy to the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from s3_fault_proxy import KINDS, S3FaultProxy
from trainer_support import job_document

from kubetune.api.validation import validate_document
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_FAILED
from kubetune_trainer.job import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LORA_FILE = "pytorch_lora_weights.safetensors"


def _job(endpoint: str, bucket: str, output: str) -> Any:
    doc = job_document(f"s3://{bucket}/model/", f"s3://{bucket}/data/", f"s3://{bucket}/{output}/",
                       storage={"endpoint": endpoint, "addressingStyle": "path"},
                       training={"maxSteps": 6, "gradientAccumulationSteps": 2})
    result = validate_document(doc, mode="local")
    assert result.job is not None, result.problems
    return result.job


def _crash_after(step: int) -> Any:
    def hook(trainer: Any) -> None:
        if trainer.step == step:
            raise RuntimeError(f"killed after step {step}")

    return hook


def _final_lora(server: Any, bucket: str, output: str, folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{output}/")
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])
            if item["Key"].endswith(LORA_FILE) and "/checkpoints/" not in item["Key"]]
    assert len(keys) == 1, keys
    folder.mkdir(parents=True, exist_ok=True)
    server.client().download_file(bucket, keys[0], str(folder / LORA_FILE))
    return load_file(folder / LORA_FILE)


def test_a_run_through_five_percent_of_every_fault_checkpoints_resumes_and_equals_a_clean_run(
        full_fault_server: Any, full_fault_bucket: str, tiny_sd: Path, squares: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")  # the trainer's default; the test session's is 2
    server, bucket = full_fault_server, full_fault_bucket
    server.upload_folder(tiny_sd, bucket, "model")
    server.upload_folder(squares, bucket, "data")
    clean = run_job(_job(server.endpoint, bucket, "clean"), RuntimeConfig(scratch=tmp_path / "clean", log_every=0))
    assert clean.exit_code == 0, clean.message

    with S3FaultProxy(server.endpoint, rates=dict.fromkeys(KINDS, 0.05), seed=17, delay_s=0.2) as faulty:
        job = _job(faulty.endpoint, bucket, "faulty")
        crashed = run_job(job, RuntimeConfig(scratch=tmp_path / "first", log_every=0), hooks=[_crash_after(4)])
        assert crashed.exit_code == EXIT_FAILED, crashed.message
        assert [c["step"] for c in crashed.progress["checkpoints"]] == [2, 4]
        steps: list[int] = []
        resumed = run_job(job, RuntimeConfig(scratch=tmp_path / "second", log_every=0),
                          hooks=[lambda trainer: steps.append(trainer.step)])
        injected, seen = faulty.faults(), faulty.seen
    assert resumed.exit_code == 0, resumed.message
    assert steps == [5, 6], "resumed from the step-4 checkpoint, read back through the faults"
    print(f"\n{len(seen)} requests, faults injected {dict(injected)}")
    assert sum(injected.values()) >= 5 and len(injected) >= 4, injected  # a seeded run: the same faults each time
    assert any(s.fault in ("reset", "truncate", "flip") for s in seen), "a body fault met a staged object"
    assert any(s.method in ("PUT", "POST") and s.fault for s in seen), "a fault met a checkpoint or output write"

    want = _final_lora(server, bucket, "clean", tmp_path / "want")
    got = _final_lora(server, bucket, "faulty", tmp_path / "got")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)  # bf16 on CPU is deterministic
