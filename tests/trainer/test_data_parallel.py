"""Two CPU processes (torchrun, gloo) through `kubetune train`: disjoint data shards, identical
weights on both ranks after every optimizer step, every checkpoint file written once, by rank 0.

Observed through the trainer's own trace seam (`KUBETUNE_TRAINER_TRACE`, see `trace.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from trainer_support import free_port, job_document

from kubetune_trainer.trace import TRACE_ENV

pytestmark = pytest.mark.integration

IMAGES, BATCH, STEPS = 8, 2, 5


def _records(folder: Path, rank: int, event: str) -> list[dict]:
    lines = (folder / f"rank-{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _image(key: str) -> str:
    return key.split("|")[0]


@pytest.fixture(scope="module")
def traced_run(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    from kubetune_demo.tiny import build_image_dataset

    root = tmp_path_factory.mktemp("ddp")
    data = build_image_dataset(root / "data", count=IMAGES, size=64)
    doc = job_document(str(tiny_sd), str(data), str(root / "out"),
                       method={"type": "lora", "lora": {"rank": 4, "alpha": 8, "trainTextEncoder": True}},
                       training={"maxSteps": STEPS, "batchSize": BATCH},
                       output={"checkpointEvery": 2, "keepCheckpoints": 5})
    (root / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_MASTER_ADDR": "127.0.0.1",
           "PET_MASTER_PORT": str(free_port()), TRACE_ENV: str(root / "trace")}
    command = [sys.executable, "-m", "kubetune.cli", "train", "--config", str(root / "job.yaml"),
               "--mode", "local", "--port", "0", "--termination-log", str(root / "termination"),
               "--scratch", str(root / "scratch")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "trace", json.loads((root / "termination").read_text()), data


def test_ranks_train_on_disjoint_shards_that_cover_each_epoch(traced_run: tuple[Path, dict, Path]) -> None:
    trace, _, data = traced_run
    everything = {str(p) for p in data.glob("*.png")}
    seen: dict[tuple[int, int], set[str]] = {}
    for rank in (0, 1):
        steps = _records(trace, rank, "step")
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
        for record in steps:
            assert len(record["keys"]) == BATCH and len(set(record["epochs"])) == 1
            seen.setdefault((rank, record["epochs"][0]), set()).update(map(_image, record["keys"]))
    full_epochs = STEPS // (IMAGES // BATCH // 2)
    assert full_epochs == 2
    for epoch in range(full_epochs):
        assert not seen[0, epoch] & seen[1, epoch]
        assert seen[0, epoch] | seen[1, epoch] == everything


def test_both_ranks_hold_identical_weights_after_every_step(traced_run: tuple[Path, dict, Path]) -> None:
    trace = traced_run[0]
    digests = [[r["digest"] for r in _records(trace, rank, "step")] for rank in (0, 1)]
    assert len(digests[0]) == STEPS and digests[0] == digests[1]
    assert len(set(digests[0])) == STEPS  # the weights really moved at every step


def test_checkpoints_are_written_once_by_rank_zero(traced_run: tuple[Path, dict, Path]) -> None:
    trace, result, _ = traced_run
    assert result["phase"] == "Succeeded" and [c["step"] for c in result["checkpoints"]] == [2, 4]
    assert _records(trace, 1, "upload") == []
    uploads = Counter(r["uri"] for r in _records(trace, 0, "upload"))
    assert set(uploads.values()) == {1}
    written = sorted(uri.split("/checkpoints/")[1] for uri in uploads if "/checkpoints/step-" in uri)
    assert written == [f"step-{s}/{name}" for s in (2, 4)
                       for name in ("manifest.json", "trainable.safetensors", "training_state.pt")]
