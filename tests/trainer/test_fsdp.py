"""`training.parallelism: fsdp` on two CPU processes (torchrun, gloo) through `kubetune train`: a full fine-tune
of the tiny SD3 transformer sharded with FSDP2.

Each rank holds a fraction of the training state a DDP rank holds, writes its own shard files into the
checkpoint (under the one manifest rank 0 commits), and a run killed after its checkpoint resumes on 1 or
on 2 ranks to the uninterrupted run's weights, at float32 and at the bf16 default: the global batch (and each
image's noise) is the same whatever the rank count, through gradient accumulation.

Observed through the trainer's own trace seam (`KUBETUNE_TRAINER_TRACE`, see `trace.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_support import free_port, job_document

from kubetune_trainer.trace import TRACE_ENV

pytestmark = pytest.mark.integration

IMAGES, BATCH = 8, 2
TOLERANCE = {"no": 1e-5, "bf16": 1e-3}
WEIGHTS = "final/pipeline/transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_demo.tiny import build_image_dataset

    return build_image_dataset(tmp_path_factory.mktemp("fsdp-data") / "data", count=IMAGES, size=64)


def _train(model: Path, data: Path, root: Path, out: Path, ranks: int, steps: int, precision: str,
           parallelism: str = "fsdp") -> Path:
    """One `kubetune train` of `ranks` processes; its trace folder."""
    doc = job_document(str(model), str(data), str(out), method={"type": "full", "lora": None},
                       training={"maxSteps": steps, "batchSize": BATCH, "learningRate": 1.0e-3,
                                 "mixedPrecision": precision, "parallelism": parallelism},
                       output={"checkpointEvery": 2, "keepCheckpoints": 3},
                       validation={"prompts": ["a red square"], "every": 2, "inferenceSteps": 1})
    root.mkdir(parents=True, exist_ok=True)
    (root / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, TRACE_ENV: str(root / "trace")}
    if ranks > 1:
        env |= {"PET_NNODES": "1", "PET_NPROC_PER_NODE": str(ranks), "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(free_port())}
    command = [sys.executable, "-m", "kubetune.cli", "train", "--config", str(root / "job.yaml"), "--mode", "local",
               "--port", "0", "--termination-log", str(root / "termination"), "--scratch", str(root / "scratch")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "trace"


def _records(trace: Path, rank: int, event: str) -> list[dict[str, Any]]:
    lines = (trace / f"rank-{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _weights(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(out / WEIGHTS)


@pytest.fixture(scope="module", params=["no", "bf16"])
def runs(request: pytest.FixtureRequest, tiny_sd3: Path, images: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """At one precision: an uninterrupted 2-rank run of 4 steps; one that ends after step 3 (its last checkpoint
    is step 2's, as if killed after step 3); and that run resumed to step 4 on 1 rank and on 2 ranks."""
    precision, root = request.param, tmp_path_factory.mktemp(f"fsdp-{request.param}")
    straight = _train(tiny_sd3, images, root / "a", root / "a-out", 2, 4, precision)
    killed = _train(tiny_sd3, images, root / "b", root / "b-out", 2, 3, precision)
    resumed = {}
    for ranks in (1, 2):
        out = root / f"c{ranks}-out"
        shutil.copytree(root / "b-out", out)
        shutil.rmtree(out / "final")
        resumed[ranks] = (_train(tiny_sd3, images, root / f"c{ranks}", out, ranks, 4, precision), out)
    return {"precision": precision, "root": root, "straight": straight, "killed": killed, "resumed": resumed}


def test_samples_are_made_with_every_rank_and_kept_once(runs: dict[str, Any]) -> None:
    """A sharded denoiser's forward gathers its weights from every rank, so every rank samples; rank 0 keeps."""
    uploads = {rank: [r["uri"] for r in _records(runs["straight"], rank, "upload") if "/samples/" in r["uri"]]
               for rank in (0, 1)}
    assert uploads[1] == [] and sorted(uri.rsplit("/", 1)[1] for uri in uploads[0]) == ["step-2-0-0.png",
                                                                                           "step-4-0-0.png"]


def test_each_rank_writes_its_own_shards_under_one_manifest(runs: dict[str, Any]) -> None:
    killed, root = runs["killed"], runs["root"]
    manifest = json.loads((root / "b-out" / "checkpoints" / "step-2" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"shard-0-0.distcp", "shard-1-0.distcp", "shards.metadata",
                                      "trainable.safetensors", "training_state.pt"}
    uploads = {rank: Counter(r["uri"].split("/checkpoints/step-2/")[1] for r in _records(killed, rank, "upload")
                             if "/checkpoints/step-2/" in r["uri"]) for rank in (0, 1)}
    assert uploads[1] == {"shard-1-0.distcp": 1}
    assert uploads[0] == {name: 1 for name in ("shard-0-0.distcp", "shards.metadata", "trainable.safetensors",
                                               "training_state.pt", "manifest.json")}
    shards = [(root / "b-out" / "checkpoints" / "step-2" / f"shard-{rank}-0.distcp").stat().st_size for rank in (0, 1)]
    assert min(shards) > 0.3 * sum(shards)  # each holds about half, not a copy of everything


def test_the_ranks_of_a_pod_share_one_download_of_the_checkpoint_they_resume_from(runs: dict[str, Any]) -> None:
    trace, _ = runs["resumed"][2]
    fetched = {rank: Counter(r["uri"].split("/checkpoints/step-2/")[1] for r in _records(trace, rank, "download")
                             if "/checkpoints/step-2/" in r["uri"] and not r["uri"].endswith("manifest.json"))
               for rank in (0, 1)}
    assert fetched[1] == {}
    assert fetched[0] == {name: 1 for name in ("shard-0-0.distcp", "shard-1-0.distcp", "shards.metadata",
                                               "trainable.safetensors", "training_state.pt")}


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_run_resumed_on_one_or_two_ranks_ends_with_the_uninterrupted_runs_weights(runs: dict[str, Any],
                                                                                   ranks: int) -> None:
    import torch

    trace, out = runs["resumed"][ranks]
    assert [r["step"] for r in _records(trace, 0, "step")] == [3, 4]
    want, got = _weights(runs["root"] / "a-out"), _weights(out)
    assert want.keys() == got.keys()
    base = _weights_of_base(runs)
    assert any(not torch.equal(want[key], base[key]) for key in base)  # training moved the weights
    tolerance = TOLERANCE[runs["precision"]]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=tolerance)


def _weights_of_base(runs: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    job = yaml.safe_load((runs["root"] / "a" / "job.yaml").read_text())
    return load_file(Path(job["spec"]["model"]["uri"]) / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("runs", ["no"], indirect=True)  # measured once, on the float32 runs
def test_a_sharded_rank_holds_at_most_six_tenths_of_a_ddp_ranks_training_state(
        runs: dict[str, Any], tiny_sd3: Path, images: Path) -> None:
    root = runs["root"]
    ddp = _train(tiny_sd3, images, root / "ddp", root / "ddp-out", 2, 2, "no", parallelism="ddp")
    whole = _records(ddp, 0, "step")[-1]["heldBytes"]
    for rank in (0, 1):
        sharded = _records(runs["straight"], rank, "step")[-1]["heldBytes"]
        assert sharded <= 0.6 * whole, (rank, sharded, whole)


@pytest.mark.parametrize("runs", ["no"], indirect=True)  # once, from the float32 run's checkpoint
def test_a_damaged_shard_is_skipped_by_every_rank_alike(runs: dict[str, Any], tiny_sd3: Path, images: Path) -> None:
    """One flipped byte in a shard (its size unchanged): the pod's first rank finds the sha256 wrong, and every
    rank skips that checkpoint with it (none loads it while another starts over), fetched once per pod."""
    root = runs["root"]
    out = root / "damaged-out"
    shutil.copytree(root / "b-out", out)
    shutil.rmtree(out / "final")
    shard = out / "checkpoints" / "step-2" / "shard-1-0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    trace = _train(tiny_sd3, images, root / "damaged", out, 2, 4, "no")
    for rank in (0, 1):
        assert [r["step"] for r in _records(trace, rank, "step")] == [1, 2, 3, 4]
    assert not [r for r in _records(trace, 1, "download") if "/checkpoints/" in r["uri"]
                and not r["uri"].endswith("manifest.json")]


def test_a_unet_family_shards_too(tiny_sd: Path, images: Path, tmp_path: Path) -> None:
    """SD's UNet lists blocks inside listed blocks (up-blocks hold resnets): they are sharded innermost first."""
    trace = _train(tiny_sd, images, tmp_path / "sd", tmp_path / "sd-out", 2, 2, "bf16")
    assert [r["step"] for r in _records(trace, 1, "step")] == [1, 2]
    assert (tmp_path / "sd-out" / "final" / "pipeline" / "unet").is_dir()
