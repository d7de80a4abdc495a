"""Cached VAE latents give the same training as encoding every step, and are reused across
epochs and restarts: the VAE encoder runs once per image (counted by the objective)."""

from __future__ import annotations

from pathlib import Path

from trainer_probe import running_trainers
from trainer_support import local_job

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job
from kubetune_trainer.parts import StepRecord


def test_cached_and_uncached_latents_train_the_same_adapter(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    adapters = {}
    for cache in (True, False):
        job = local_job(str(tiny_sd), str(squares), str(tmp_path / f"out-{cache}"),
                        data={"centerCrop": True, "randomFlip": False},
                        training={"maxSteps": 6, "cacheLatents": cache})
        result = run_job(job, RuntimeConfig(scratch=tmp_path / f"s-{cache}", log_every=0))
        assert result.exit_code == 0, result.message
        adapters[cache] = load_file(result.progress["outputs"]["lora"]["diffusers"])
    assert len(list((tmp_path / "s-True" / "latents").rglob("*.pt"))) == 6
    assert not (tmp_path / "s-False" / "latents").exists()
    for key, value in adapters[True].items():
        torch.testing.assert_close(value, adapters[False][key], rtol=1e-4, atol=1e-5)


class Interrupt(Exception):
    """Raised by a step hook to end a run the way a crash would."""


def _run(model: Path, data: Path, out: Path, scratch: Path, stop_after: int | None = None) -> tuple[int, list[int]]:
    """Train 9 steps (3 epochs of 3 batches); return the images encoded and the steps run."""
    objectives, steps = [], []

    def observe(record: StepRecord) -> None:
        objectives.append(built[-1].p.objective)
        steps.append(record.step)
        if record.step == stop_after:
            raise Interrupt(f"stopped after step {record.step}")

    job = local_job(str(model), str(data), str(out), data={"randomFlip": False},
                    training={"maxSteps": 9}, output={"checkpointEvery": 3, "keepCheckpoints": 5})
    with running_trainers() as built:
        result = run_job(job, RuntimeConfig(scratch=scratch, log_every=0), hooks=[observe])
    assert result.exit_code == (0 if stop_after is None else 1), result.message
    return objectives[-1].encoded_images, steps


def test_the_vae_encodes_each_image_once_across_epochs_and_restarts(tiny_sd: Path, squares: Path,
                                                                    tmp_path: Path) -> None:
    from kubetune_demo.tiny import build_tiny_pipeline

    scratch = tmp_path / "scratch"
    encoded, steps = _run(tiny_sd, squares, tmp_path / "out", scratch, stop_after=7)
    assert (encoded, steps) == (6, [1, 2, 3, 4, 5, 6, 7])  # 6 images, 2 full epochs and a bit
    encoded, steps = _run(tiny_sd, squares, tmp_path / "out", scratch)
    assert (encoded, steps) == (0, [7, 8, 9])  # resumed from step 6: every latent came from the cache
    other_model = build_tiny_pipeline(tmp_path / "other-model", family="sd", seed=1)
    encoded, _ = _run(other_model, squares, tmp_path / "out-2", scratch)
    assert encoded == 6  # another VAE never reads the first one's latents
    assert len(list((scratch / "latents").rglob("*.pt"))) == 12


def _bitmaps(folder: Path, colours: list[tuple[int, int, int]]) -> Path:
    """An imagefolder dataset of flat-colour BMPs: uncompressed, so images of one size have one byte size."""
    import json

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, colour in enumerate(colours):
        Image.new("RGB", (72, 72), colour).save(folder / f"img-{index}.bmp")
        rows.append(json.dumps({"file_name": f"img-{index}.bmp", "text": f"colour {index}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def test_an_image_replaced_by_one_of_the_same_name_and_size_is_encoded_again(tiny_sd: Path,
                                                                              tmp_path: Path) -> None:
    import os

    from PIL import Image

    data = _bitmaps(tmp_path / "data", [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200),
                                        (200, 0, 200)])
    scratch = tmp_path / "scratch"
    encoded, _ = _run(tiny_sd, data, tmp_path / "out-1", scratch)
    assert encoded == 6
    replaced = data / "img-2.bmp"
    before = replaced.stat()
    Image.new("RGB", (72, 72), (90, 90, 90)).save(replaced)
    os.utime(replaced, ns=(before.st_atime_ns, before.st_mtime_ns))  # even the modification time is kept
    assert replaced.stat().st_size == before.st_size
    encoded, _ = _run(tiny_sd, data, tmp_path / "out-2", scratch)  # a re-run on the same scratch volume
    assert encoded == 1  # the replaced image only; the other five latents came from the cache
    assert len(list((scratch / "latents").rglob("*.pt"))) == 7


def test_an_example_without_a_recorded_digest_gets_the_same_key(tmp_path: Path) -> None:
    import hashlib
    import random
    from dataclasses import replace

    from kubetune.api.spec import DataSpec
    from kubetune_trainer.data import load_dataset, make_batch

    data = _bitmaps(tmp_path / "data", [(200, 0, 0), (0, 200, 0)])
    spec = DataSpec(uri=str(data), resolution=64)
    examples = load_dataset(data, spec).examples
    assert [ex.digest for ex in examples] == [hashlib.sha256(ex.image.read_bytes()).hexdigest() for ex in examples]
    recorded = make_batch([(ex, random.Random(0)) for ex in examples], spec).keys
    unrecorded = make_batch([(replace(ex, digest=""), random.Random(0)) for ex in examples], spec).keys  # generated
    assert recorded == unrecorded and recorded[0] != recorded[1].replace("img-1", "img-0")
