"""Acceptance against a real S3 server on loopback (moto): a different job given an existing output is
refused by `kubetune run` with exit 78 naming the owner, and every object keeps its ETag; the same job
resumes from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from trainer_support import job_document

from kubetune.api.validation import validate_document
from kubetune.cli import main
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_CONFIG, EXIT_FAILED
from kubetune_trainer.job import run_job
from kubetune_trainer.ownership import OWNER_RECORD

pytestmark = pytest.mark.integration


def _document(server: Any, bucket: str, name: str = "test-lora", **training: Any) -> dict[str, Any]:
    doc = job_document(f"s3://{bucket}/model/", f"s3://{bucket}/data/", f"s3://{bucket}/out/",
                       storage={"endpoint": server.endpoint, "addressingStyle": "path"},
                       training={"maxSteps": 6, **training})
    doc["metadata"]["name"] = name
    return doc


def _etags(server: Any, bucket: str) -> dict[str, str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"]: item["ETag"] for page in pages for item in page.get("Contents", [])}


def _crash_after(step: int) -> Any:
    def hook(trainer: Any) -> None:
        if trainer.step == step:
            raise RuntimeError(f"killed after step {step}")

    return hook


def test_another_job_is_refused_untouched_and_the_same_job_resumes(s3_server: Any, s3_bucket: str, tiny_sd: Path,
                                                                   squares: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    s3_server.upload_folder(tiny_sd, s3_bucket, "model")
    s3_server.upload_folder(squares, s3_bucket, "data")
    job = validate_document(_document(s3_server, s3_bucket), mode="local").job
    crashed = run_job(job, RuntimeConfig(scratch=tmp_path / "s1", log_every=0), hooks=[_crash_after(4)])
    assert crashed.exit_code == EXIT_FAILED and [c["step"] for c in crashed.progress["checkpoints"]] == [2, 4]
    before = _etags(s3_server, s3_bucket)
    capsys.readouterr()  # the crash's traceback
    assert f"out/{OWNER_RECORD}" in before and "out/checkpoints/step-4/manifest.json" in before

    others = {"other-name": _document(s3_server, s3_bucket, name="other-lora"),
              "other-learning-rate": _document(s3_server, s3_bucket, learningRate=5e-4)}
    for label, doc in others.items():
        (tmp_path / f"{label}.json").write_text(json.dumps(doc))
        code = main(["run", str(tmp_path / f"{label}.json"), "--no-progress", "--scratch", str(tmp_path / label)])
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]
        assert code == EXIT_CONFIG and "Traceback" not in err, err
        assert f"s3://{s3_bucket}/out/ holds the output of" in line and "tests/test-lora" in line
        assert "new spec.output.uri" in line
        assert _etags(s3_server, s3_bucket) == before, label  # same keys, same ETags: nothing added or rewritten
    assert "training.learningRate 0.001 there, 0.0005 here" in line

    steps: list[int] = []
    resumed = run_job(job, RuntimeConfig(scratch=tmp_path / "s2", log_every=0),
                      hooks=[lambda trainer: steps.append(trainer.step)])
    assert resumed.exit_code == 0, resumed.message
    assert steps == [5, 6]
