"""Aspect-ratio bucketing at the batch level: a real folder of mixed sizes in, every batch from
one bucket, every image scaled only as far as covering its bucket needs (one side fits exactly,
so only the other side is cropped), and a whole training run on SDXL over those batches.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from trainer_support import local_job

from kubetune.api.spec import DataSpec
from kubetune_trainer.batches import BatchStream, bucket_sizes
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.data import load_dataset
from kubetune_trainer.job import run_job
from kubetune_trainer.trace import TRACE_ENV

RESOLUTION, MULTIPLE, BORDER = 64, 8, 6
SIZES = [(128, 64), (132, 68), (64, 128), (60, 124), (96, 96), (40, 40), (150, 50), (156, 52),
         (50, 150), (120, 90), (90, 120), (180, 60)]
"""(width, height): wide, tall, square, smaller than the budget, and some near-duplicates."""


def _framed_images(folder: Path) -> Path:
    """Black images with a red frame BORDER pixels wide, so a crop into the frame shows."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (width, height) in enumerate(SIZES):
        image = Image.new("RGB", (width, height), (0, 0, 0))
        ImageDraw.Draw(image).rectangle((0, 0, width - 1, height - 1), outline=(255, 0, 0), width=BORDER)
        image.save(folder / f"{i:02d}.png")
        rows.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"frame {width}x{height}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def _closest_aspect(size: tuple[int, int]) -> float:
    """The smallest log-aspect distance from `size` to any bucket."""
    buckets = bucket_sizes(RESOLUTION, MULTIPLE)
    return min(abs(math.log(w / h) - math.log(size[0] / size[1])) for w, h in buckets)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _framed_images(tmp_path_factory.mktemp("mixed"))


def test_every_batch_comes_from_one_bucket_and_no_image_is_scaled_past_it(mixed: Path) -> None:
    spec = DataSpec(uri=str(mixed), resolution=RESOLUTION, aspect_buckets=True, random_flip=True)
    dataset = load_dataset(mixed, spec)
    stream = BatchStream(dataset, spec, batch_size=2, seed=4, multiple=MULTIPLE)
    by_file = {str(ex.image): ex.size for ex in dataset.examples}
    buckets, seen = set(), set()
    for _ in range(2 * stream.per_epoch() // 2):  # two epochs of batches of 2
        batch = stream.next_batch()
        height, width = batch.pixels.shape[2:]
        buckets.add((width, height))
        assert width % MULTIPLE == 0 and height % MULTIPLE == 0 and width * height <= RESOLUTION**2
        for key, pixels, (orig_h, orig_w, top, left, th, tw) in zip(batch.keys, batch.pixels, batch.sizes,
                                                                     strict=True):
            original = by_file[key.split("|")[0]]
            seen.add(key.split("|")[0])
            assert (orig_w, orig_h) == original and (tw, th) == (width, height)
            # this bucket is (one of) the nearest in aspect ratio to the image
            assert abs(math.log(width / height) - math.log(orig_w / orig_h)) == pytest.approx(
                _closest_aspect(original))
            # covering scale: the tighter side fits exactly (no crop there) ...
            scale = max(width / orig_w, height / orig_h)
            tight_rows = height / orig_h >= width / orig_w
            assert (top if tight_rows else left) == 0
            assert (left if tight_rows else top) <= round((orig_w if tight_rows else orig_h) * scale) - (
                width if tight_rows else height)
            # ... so the frame survives on both ends of that side; scaled further, it would be cropped away
            red, green = pixels[0], pixels[1]
            edges = (red[0], red[-1]) if tight_rows else (red[:, 0], red[:, -1])
            assert all(edge.mean() > 0.5 for edge in edges), (original, (width, height))
            assert green.abs().max() <= 1.0 and green.mean() < -0.9
    assert seen == set(by_file)
    assert len(buckets) >= 4 and any(w > h for w, h in buckets) and any(h > w for w, h in buckets)


def test_sdxl_trains_on_mixed_aspect_batches(tiny_sdxl: Path, mixed: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    job = local_job(str(tiny_sdxl), str(mixed), str(tmp_path / "out"), data={"aspectBuckets": True},
                    training={"maxSteps": 4})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert result.exit_code == 0, result.message
    steps = [json.loads(line) for line in (tmp_path / "trace" / "rank-0.jsonl").read_text().splitlines()]
    targets = [{key.split("|")[2] for key in record["keys"]} for record in steps if record["event"] == "step"]
    assert len(targets) == 4 and all(len(t) == 1 for t in targets)  # one bucket per batch
    assert len(set.union(*targets)) >= 2  # and more than one bucket over the run
