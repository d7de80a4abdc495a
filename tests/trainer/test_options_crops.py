"""`data.centerCrop: false` with `training.cacheLatents`: each epoch takes a new random crop, cut
from the cached latents of the whole resized image, which the VAE encodes once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_support import local_job

from kubetune.api.spec import DataSpec
from kubetune_demo.tiny import build_image_dataset
from kubetune_trainer.assembly import build_trainer
from kubetune_trainer.batches import BatchStream
from kubetune_trainer.caches.latents import DiskLatentCache
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.data import load_dataset
from kubetune_trainer.reporting import Reporter


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 2:1 images: in a 64-pixel square, nine crop offsets along the width."""
    from PIL import Image

    root = build_image_dataset(tmp_path_factory.mktemp("wide"), count=4, size=80)
    for path in root.glob("*.png"):
        with Image.open(path) as image:
            wide = image.resize((160, 80))
        wide.save(path)
    return root


def _cell_means(pixels: Any) -> Any:
    """A stand-in encoder whose latents depend only on their own 8x8 cell, so a latent crop is exact."""
    import torch.nn.functional as F

    return F.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)  # (N, 2C, h, w), as the VAE's mean and log-variance


@pytest.mark.parametrize("flip", [False, True])
def test_latent_crops_match_the_pixel_crops(large: Path, tmp_path: Path, flip: bool) -> None:
    spec = DataSpec(uri=str(large), resolution=64, aspect_buckets=False, random_flip=flip)
    stream = BatchStream(load_dataset(large, spec), spec, batch_size=2, seed=5, latent_crop=8)
    cache, lefts = DiskLatentCache(tmp_path / "latents"), set()
    for _ in range(6):  # three epochs: hits after the first
        batch = stream.next_batch()
        lefts |= {plan.crop[0] for plan in batch.images}
        assert all(plan.whole and plan.resized == (128, 64) and plan.crop[0] % 8 == 0 for plan in batch.images)
        assert cache.moments(batch, _cell_means).equal(_cell_means(batch.pixels))
    assert len(lefts) > 1
    assert cache.misses <= 8 and cache.misses + cache.hits == 12  # one entry per image, and flip


def test_each_epoch_crops_anew_and_the_vae_encodes_each_image_once(tiny_sdxl: Path, large: Path,
                                                                    tmp_path: Path) -> None:
    import torch

    job = local_job(str(tiny_sdxl), str(large), str(tmp_path / "out"),
                    data={"randomFlip": False, "aspectBuckets": False},
                    training={"cacheLatents": True, "batchSize": 2})
    trainer = build_trainer(job, RuntimeConfig(scratch=tmp_path / "scratch", log_every=0), Reporter())
    crops: dict[int, dict[str, tuple[int, int]]] = {}
    for step in range(6):  # three epochs of two batches
        batch = trainer.p.data.next_batch()
        latents = trainer.p.objective.latents(batch, torch.Generator().manual_seed(step))
        assert latents.shape[-2:] == (8, 8)
        for key, size in zip(batch.keys, batch.sizes, strict=True):
            crops.setdefault(trainer.p.data.epoch, {})[key] = size[2:4]  # SDXL's crop (top, left)
    assert sorted(crops) == [0, 1, 2]
    assert all(len(epoch) == 4 for epoch in crops.values())  # the same four keys: one entry per image
    assert len({tuple(sorted(epoch.items())) for epoch in crops.values()}) == 3  # a new crop every epoch
    assert all(top % 8 == 0 and left % 8 == 0 for epoch in crops.values() for top, left in epoch.values())
    assert trainer.p.objective.encoded_images == 4
    loss, _ = trainer.train_step()
    assert torch.isfinite(torch.tensor(loss))
