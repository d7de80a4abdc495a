"""Two CPU processes (torchrun, gloo) with a `pvc://` output: each rank publishes the latents of
exactly the images it encoded, and the encodings of exactly their captions, in its own shards;
together they cover the data once.

Observed through the trainer's trace seam (`KUBETUNE_TRAINER_TRACE`) and the published manifests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trainer_support import free_port, job_document

from kubetune_trainer.caches.latents import DiskLatentCache
from kubetune_trainer.caches.text import DiskTextCache
from kubetune_trainer.trace import TRACE_ENV

pytestmark = pytest.mark.integration

IMAGES, BATCH, STEPS = 8, 2, 4


def _records(folder: Path, rank: int, event: str) -> list[dict]:
    lines = (folder / f"rank-{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_each_rank_publishes_only_the_latents_it_encoded(tiny_sd: Path, tmp_path: Path) -> None:
    from kubetune_demo.tiny import build_image_dataset

    data = build_image_dataset(tmp_path / "data", count=IMAGES, size=64)
    doc = job_document(str(tiny_sd), str(data), "pvc://claim/out", data={"randomFlip": False},
                       training={"maxSteps": STEPS, "batchSize": BATCH},
                       output={"checkpointEvery": 2, "keepCheckpoints": 1})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_MASTER_ADDR": "127.0.0.1",
           "PET_MASTER_PORT": str(free_port()), TRACE_ENV: str(tmp_path / "trace"),
           "KUBETUNE_PVC_ROOT": str(tmp_path / "pvc")}
    command = [sys.executable, "-m", "kubetune.cli", "train", "--config", str(tmp_path / "job.yaml"),
               "--mode", "local", "--port", "0", "--termination-log", str(tmp_path / "termination"),
               "--scratch", str(tmp_path / "scratch")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (remote,) = (tmp_path / "pvc" / "claim" / "out" / "cache" / "latents").iterdir()
    (text_remote,) = (tmp_path / "pvc" / "claim" / "out" / "cache" / "text").iterdir()
    rows = map(json.loads, (data / "metadata.jsonl").read_text().splitlines())
    captions = {row["file_name"]: row["text"] for row in rows}
    namer = DiskLatentCache(tmp_path / "names")
    published: dict[int, set[str]] = {}
    for rank in (0, 1):
        first_epoch = [r for r in _records(tmp_path / "trace", rank, "step") if r["epochs"][0] == 0]
        keys = [key for record in first_epoch for key in record["keys"]]
        manifests = sorted(remote.glob(f"rank-{rank}-*.json"))
        published[rank] = {name for m in manifests for name in json.loads(m.read_text())["entries"]}
        assert published[rank] == {namer.entry_name(key) for key in keys}  # later epochs only hit the cache
        texts = {name for m in text_remote.glob(f"rank-{rank}-*.json") for name in json.loads(m.read_text())["entries"]}
        assert texts == {DiskTextCache.entry_name(captions[Path(key.split("|")[0]).name]) for key in keys}
        uploads = [r["uri"] for r in _records(tmp_path / "trace", rank, "upload") if "/cache/latents/" in r["uri"]]
        assert uploads and all(f"/rank-{rank}-" in uri for uri in uploads)
    assert not published[0] & published[1] and len(published[0] | published[1]) == IMAGES
    assert all("/cache/" in r["uri"] for r in _records(tmp_path / "trace", 1, "upload"))  # no checkpoints
