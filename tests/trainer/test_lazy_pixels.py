"""Batches decode images only when their pixels are read: a step whose latents are all cached
reads no image file, and the pixels of a lazy batch equal those of rendering every plan."""

from __future__ import annotations

from pathlib import Path

from kubetune.api.spec import DataSpec
from kubetune_demo.tiny import build_image_dataset
from kubetune_trainer.batches import BatchStream
from kubetune_trainer.caches.latents import DiskLatentCache
from kubetune_trainer.data import load_dataset, render_image


def test_cached_batches_never_decode_an_image(tmp_path: Path) -> None:
    import torch

    root = build_image_dataset(tmp_path / "data", count=4, size=80)
    spec = DataSpec(uri=str(root), resolution=64, aspect_buckets=False, center_crop=True, random_flip=False)
    dataset = load_dataset(root, spec)
    cache, encoded = DiskLatentCache(tmp_path / "latents"), []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        encoded.append(pixels.shape[0])
        return pixels[:, :, :8, :8].clone()

    def stream() -> BatchStream:
        return BatchStream(dataset, spec, batch_size=2, seed=3)

    first_epoch = stream()
    fresh = [cache.moments(first_epoch.next_batch(), encode) for _ in range(2)]  # fills the cache
    for image in root.glob("*.png"):  # same size, so the same cache keys, but no longer an image
        image.write_bytes(b"\0" * image.stat().st_size)
    again = stream()
    assert [cache.moments(again.next_batch(), encode).equal(want) for want in fresh] == [True, True]
    assert sum(encoded) == 4
    assert (cache.hits, cache.misses) == (4, 4)


def test_lazy_pixels_equal_each_plan_rendered(tmp_path: Path) -> None:
    import torch

    root = build_image_dataset(tmp_path / "data", count=3, size=96)
    spec = DataSpec(uri=str(root), resolution=64, aspect_buckets=False, random_flip=True)
    batch = BatchStream(load_dataset(root, spec), spec, batch_size=3, seed=5).next_batch()
    plans = list(batch.images)
    assert batch.pixels_of([2, 0]).equal(torch.stack([render_image(plans[2]), render_image(plans[0])]))
    assert batch.pixels.equal(torch.stack([render_image(plan) for plan in plans]))
    assert batch.pixels.shape == (3, 3, 64, 64)
    assert [plan.key for plan in plans] == batch.keys


def test_cached_latents_are_read_from_disk_once(tmp_path: Path) -> None:
    import torch

    root = build_image_dataset(tmp_path / "data", count=2, size=64)
    spec = DataSpec(uri=str(root), resolution=64, aspect_buckets=False, center_crop=True, random_flip=False)
    batch = BatchStream(load_dataset(root, spec), spec, batch_size=2, seed=1).next_batch()
    kept, small = DiskLatentCache(tmp_path / "a"), DiskLatentCache(tmp_path / "b", keep_bytes=0)
    for cache in (kept, small):
        want = cache.moments(batch, lambda pixels: pixels[:, :, :8, :8].clone())
        for entry in cache.folder.iterdir():  # a file read from now on would see zeros
            torch.save(torch.zeros_like(want[0]), entry)
        cache.moments(batch, lambda pixels: pixels[:, :, :8, :8].clone())
    assert kept.moments(batch, lambda pixels: pixels).equal(want)
    assert not small.moments(batch, lambda pixels: pixels).equal(want)
    assert (len(kept.kept), len(small.kept)) == (2, 0)
