"""A run that crashes and restarts in a new pod (an empty scratch volume) encodes no image again:
the latent cache it published under its S3 output comes back with the checkpoint.

moto's standalone server on loopback; nothing is patched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_probe import running_trainers
from trainer_support import local_job

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job
from kubetune_trainer.parts import StepRecord

pytestmark = pytest.mark.integration


class Crash(Exception):
    """Raised by a step hook to end a run the way a crash would."""


def _run(server: Any, bucket: str, scratch: Path, crash_after: int | None = None) -> tuple[int, list[int]]:
    """9 steps (3 epochs of 3 batches) from S3 to S3; return the images encoded and the steps run."""
    objectives, steps = [], []

    def observe(record: StepRecord) -> None:
        objectives.append(built[-1].p.objective)
        steps.append(record.step)
        if record.step == crash_after:
            raise Crash(f"crashed after step {record.step}")

    job = local_job(f"s3://{bucket}/model/", f"s3://{bucket}/data/", f"s3://{bucket}/out/",
                    storage={"endpoint": server.endpoint, "addressingStyle": "path"},
                    data={"randomFlip": False}, training={"maxSteps": 9},
                    output={"checkpointEvery": 3, "keepCheckpoints": 2})
    with running_trainers() as built:
        result = run_job(job, RuntimeConfig(scratch=scratch, log_every=0), hooks=[observe])
    assert result.exit_code == (0 if crash_after is None else 1), result.message
    return objectives[-1].encoded_images, steps


def _cache_keys(server: Any, bucket: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket, Prefix="out/cache/latents/")
    return sorted(obj["Key"].rsplit("/", 1)[1] for obj in listed.get("Contents", []))


def test_a_new_pod_resumes_without_encoding_an_image(s3_server: Any, s3_bucket: str, tiny_sd: Path,
                                                     squares: Path, tmp_path: Path) -> None:
    s3_server.upload_folder(tiny_sd, s3_bucket, "model")
    s3_server.upload_folder(squares, s3_bucket, "data")
    encoded, steps = _run(s3_server, s3_bucket, tmp_path / "pod-1", crash_after=7)
    assert (encoded, steps) == (6, [1, 2, 3, 4, 5, 6, 7])
    published = _cache_keys(s3_server, s3_bucket)
    assert [name.rsplit(".", 1)[1] for name in published] == ["json", "safetensors"]  # all 6 at step 3
    assert all(name.startswith("rank-0-") for name in published)

    encoded, steps = _run(s3_server, s3_bucket, tmp_path / "pod-2")  # a fresh, empty scratch volume
    assert (encoded, steps) == (0, [7, 8, 9])  # resumed from step 6 with every latent from S3
    assert _cache_keys(s3_server, s3_bucket) == published  # nothing new to publish
    assert len(list((tmp_path / "pod-2" / "latents").rglob("*.pt"))) == 6
