"""Acceptance against a real S3 server on loopback (moto): a different job given an existing output is
refused by `kubetune run` with exit 78 naming the owner, and every object keeps its ETag; the same job
resumes from its checkpoint."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from test_ownership import race_to_confirm
from trainer_support import job_document

from kubetune.api.identity import JobIdentity
from kubetune.api.spec import StorageSpec
from kubetune.api.validation import validate_document
from kubetune.cli import main
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_CONFIG, EXIT_FAILED
from kubetune_trainer.job import run_job
from kubetune_trainer.ownership import OWNER_RECORD, OutputClaim, weight_fields
from kubetune_trainer.preflight import PROBE_PREFIX
from kubetune_trainer.storage.s3 import S3Store

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


def _probe_versions(client: Any, bucket: str) -> list[str]:
    """Every version and delete marker of preflight probes under out/ (the bucket keeps versions)."""
    found = client.list_object_versions(Bucket=bucket, Prefix=f"out/{PROBE_PREFIX}")
    return sorted(item["VersionId"] for kind in ("Versions", "DeleteMarkers") for item in found.get(kind, []))


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
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    job = validate_document(_document(s3_server, s3_bucket), mode="local").job
    crashed = run_job(job, RuntimeConfig(scratch=tmp_path / "s1", log_every=0), hooks=[_crash_after(4)])
    assert crashed.exit_code == EXIT_FAILED and [c["step"] for c in crashed.progress["checkpoints"]] == [2, 4]
    before, probes_before = _etags(s3_server, s3_bucket), _probe_versions(client, s3_bucket)
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
        assert _probe_versions(client, s3_bucket) == probes_before, label  # no probe written, even deleted
    assert "training.learningRate 0.001 there, 0.0005 here" in line

    steps: list[int] = []
    resumed = run_job(job, RuntimeConfig(scratch=tmp_path / "s2", log_every=0),
                      hooks=[lambda trainer: steps.append(trainer.step)])
    assert resumed.exit_code == 0, resumed.message
    assert steps == [5, 6]


class _ReadTogether(S3Store):
    """An S3 store whose first read of the owner record ends with the other job's: both find none."""

    def __init__(self, spec: StorageSpec, barrier: threading.Barrier) -> None:
        super().__init__(spec)
        self.barrier, self.waited = barrier, False

    def download(self, uri: str, path: Path) -> Any:
        if not uri.endswith(OWNER_RECORD) or self.waited:
            return super().download(uri, path)
        self.waited = True
        try:
            return super().download(uri, path)
        finally:  # the other job has read it too before this one goes on
            self.barrier.wait(timeout=30)


def test_of_two_jobs_claiming_an_empty_prefix_together_exactly_one_proceeds(s3_server: Any, s3_bucket: str,
                                                                              tmp_path: Path) -> None:
    barrier = threading.Barrier(2)
    spec = StorageSpec(endpoint=s3_server.endpoint, addressing_style="path")
    claims = []
    for name in ("first-lora", "second-lora"):
        job = validate_document(_document(s3_server, s3_bucket, name=name), mode="local").job
        claims.append(OutputClaim(_ReadTogether(spec, barrier), job.spec.output.uri, JobIdentity.of(job),
                                  weight_fields(job.spec), tmp_path / name))
    outcome = race_to_confirm(claims)
    record = s3_server.client().get_object(Bucket=s3_bucket, Key=f"out/{OWNER_RECORD}")["Body"].read()
    winner = json.loads(record)["owner"]["name"]
    loser = ({"first-lora", "second-lora"} - {winner}).pop()
    assert outcome[winner] == "ok"
    assert f"holds the output of job tests/{winner}" in outcome[loser]  # exit 78, before any lasting write
