"""Acceptance against a real S3 server on loopback (moto): a damaged newest checkpoint (a listed file
missing or replaced by garbage of the same size, or a manifest of binary garbage) is skipped for the
previous one that verifies, and the run ends with the weights an uninterrupted run produces."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from trainer_support import local_job

from kubetune.api.spec import StorageSpec
from kubetune_trainer.checkpoint import Checkpointer
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_FAILED
from kubetune_trainer.job import run_job
from kubetune_trainer.storage.s3 import S3Store

pytestmark = pytest.mark.integration

TRAINING = {"maxSteps": 8, "batchSize": 2, "lrScheduler": {"type": "cosine", "warmupSteps": 2}}


def _crash_after(step: int) -> Any:
    def hook(trainer: Any) -> None:
        if trainer.step == step:
            raise RuntimeError(f"killed after step {step}")

    return hook


def _damage(client: Any, bucket: str, how: str) -> str:
    """Damage the step-6 checkpoint; return the reason the trainer must give for skipping it."""
    folder = "out/checkpoints/step-6/"
    if how == "missing":
        client.delete_object(Bucket=bucket, Key=folder + "training_state.pt")
        return "training_state.pt is listed in its manifest.json but missing"
    if how == "manifest not UTF-8":  # found by the ownership survey first, then by the checkpointer
        client.put_object(Bucket=bucket, Key=folder + "manifest.json", Body=b"\xff\xfe\x00" + os.urandom(64))
        return "its manifest.json is unreadable (not UTF-8 text)"
    size = client.head_object(Bucket=bucket, Key=folder + "trainable.safetensors")["ContentLength"]
    client.put_object(Bucket=bucket, Key=folder + "trainable.safetensors", Body=os.urandom(size))
    return "trainable.safetensors does not match the sha256 in its manifest.json"


def _adapter(client: Any, uri: str, path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    client.download_file(bucket, key, str(path))
    return load_file(str(path))


@pytest.mark.parametrize("how", ["missing", "same-size garbage", "manifest not UTF-8"])
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_matches_an_uninterrupted_one(
    how: str, s3_server: Any, s3_bucket: str, tiny_sd: Path, squares: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    s3_server.upload_folder(tiny_sd, s3_bucket, "model")
    s3_server.upload_folder(squares, s3_bucket, "data")
    storage = {"endpoint": s3_server.endpoint, "addressingStyle": "path"}

    def job(prefix: str) -> Any:
        return local_job(f"s3://{s3_bucket}/model/", f"s3://{s3_bucket}/data/", f"s3://{s3_bucket}/{prefix}/",
                         storage=storage, training=TRAINING)

    straight = run_job(job("straight"), RuntimeConfig(scratch=tmp_path / "s0", log_every=0))
    assert straight.exit_code == 0, straight.message
    crashed = run_job(job("out"), RuntimeConfig(scratch=tmp_path / "s1", log_every=0), hooks=[_crash_after(6)])
    assert crashed.exit_code == EXIT_FAILED and [c["step"] for c in crashed.progress["checkpoints"]] == [4, 6]
    client = s3_server.client()
    why = _damage(client, s3_bucket, how)
    capsys.readouterr()

    steps: list[int] = []
    resumed = run_job(job("out"), RuntimeConfig(scratch=tmp_path / "s2", log_every=0),
                      hooks=[lambda trainer: steps.append(trainer.step)])
    log = capsys.readouterr().out
    assert resumed.exit_code == 0, resumed.message
    assert steps == [5, 6, 7, 8]  # from step 4, the newest that verified
    assert f"checkpoint step-6 skipped: {why}" in log and "resuming from step 4, the newest that verified" in log
    assert [c["step"] for c in resumed.progress["checkpoints"]] == [4, 6]  # step 6 saved again, over the damage

    want = _adapter(client, straight.progress["outputs"]["lora"]["diffusers"], tmp_path / "want.safetensors")
    got = _adapter(client, resumed.progress["outputs"]["lora"]["diffusers"], tmp_path / "got.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)  # bf16 on CPU is deterministic

    spec = job("out").spec
    checkpointer = Checkpointer(S3Store(StorageSpec(**storage)), spec.output, tmp_path / "verify")
    assert set(checkpointer.load(checkpointer.complete()[-1], tmp_path / "step-6")) == {
        "trainable.safetensors", "training_state.pt"}  # the replacement verifies
