"""Dataset layouts, unreadable images, caption columns and resumable batch order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api.spec import DataSpec
from kubetune_demo.tiny import build_image_dataset
from kubetune_trainer.batches import BatchStream, bucket_sizes, nearest_bucket
from kubetune_trainer.data import load_dataset
from kubetune_trainer.exitcodes import ConfigError


def _spec(root: Path, **kwargs: object) -> DataSpec:
    return DataSpec(uri=str(root), resolution=64, **{"aspect_buckets": False, **kwargs})


@pytest.mark.parametrize("layout", ["imagefolder", "captions"])
def test_auto_detects_each_layout(tmp_path: Path, layout: str) -> None:
    root = build_image_dataset(tmp_path, count=3, layout=layout)
    dataset = load_dataset(root, _spec(root))
    assert dataset.layout == layout
    assert dataset.examples[0].caption.startswith("a red square")


def test_undecodable_images_are_skipped_counted_and_named(tmp_path: Path) -> None:
    root = build_image_dataset(tmp_path, count=3, layout="captions")
    (root / "broken.png").write_bytes(b"not a png")
    (root / "broken.txt").write_text("a broken image")
    dataset = load_dataset(root, _spec(root, max_skipped=1))
    assert (len(dataset.examples), dataset.skipped) == (3, 1)
    assert [(s.file, s.reason) for s in dataset.skipped_files] == [
        ("broken.png", "not an image (or a format PIL cannot read)")]


def test_a_skipped_image_fails_the_load_at_the_default_max_skipped(tmp_path: Path) -> None:
    root = build_image_dataset(tmp_path, count=3, layout="captions")
    (root / "broken.png").write_bytes(b"not a png")
    (root / "broken.txt").write_text("a broken image")
    with pytest.raises(ConfigError, match=r"1 of 4 images skipped, more than data\.maxSkipped \(0\): broken\.png"):
        load_dataset(root, _spec(root))


def test_no_usable_images_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "a.txt").write_text("caption")
    with pytest.raises(ConfigError, match="no usable images"):
        load_dataset(tmp_path, _spec(tmp_path, max_skipped=1))


def test_empty_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"neither metadata\.jsonl nor images"):
        load_dataset(tmp_path, _spec(tmp_path))


def test_missing_caption_column_names_the_column(tmp_path: Path) -> None:
    root = build_image_dataset(tmp_path, count=2, caption_column="prompt")
    with pytest.raises(ConfigError, match=r"caption column 'text'.*prompt"):
        load_dataset(root, _spec(root))
    assert load_dataset(root, _spec(root, caption_column="prompt")).examples


def test_batches_resume_exactly_where_they_stopped(tmp_path: Path) -> None:
    root = build_image_dataset(tmp_path, count=5, size=70)
    dataset = load_dataset(root, _spec(root))
    straight = BatchStream(dataset, _spec(root), batch_size=2, seed=3)
    expected = [straight.next_batch() for _ in range(6)]
    first = BatchStream(dataset, _spec(root), batch_size=2, seed=3)
    for _ in range(3):
        first.next_batch()
    resumed = BatchStream(dataset, _spec(root), batch_size=2, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for want in expected[3:]:
        got = resumed.next_batch()
        assert got.captions == want.captions
        assert got.pixels.equal(want.pixels)
    assert expected[0].pixels.shape == (2, 3, 64, 64)


def test_bucket_sizes_keep_the_pixel_budget_and_the_multiple() -> None:
    sizes = bucket_sizes(1024, 64)
    assert (1024, 1024) in sizes and (1152, 896) in sizes and (896, 1152) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in sizes if (w, h) != (1024, 1024))
    assert all(max(w / h, h / w) <= 4 for w, h in sizes)


@pytest.mark.parametrize(("size", "want"), [((1000, 1000), (1024, 1024)), ((2000, 1000), (1408, 704)),
                                            ((1000, 2000), (704, 1408)), ((10000, 100), (2048, 512))])
def test_nearest_bucket_by_aspect_ratio(size: tuple[int, int], want: tuple[int, int]) -> None:
    assert nearest_bucket(size, bucket_sizes(1024, 64)) == want


def test_aspect_buckets_keep_wide_and_tall_images_whole(tmp_path: Path) -> None:
    from PIL import Image

    for i, size in enumerate([(128, 64), (130, 66), (64, 128), (70, 140), (80, 80)]):
        Image.new("RGB", size, (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    spec = _spec(tmp_path, aspect_buckets=True)
    stream = BatchStream(load_dataset(tmp_path, spec), spec, batch_size=2, seed=1, multiple=16)
    shapes = {tuple(stream.next_batch().pixels.shape[2:]) for _ in range(6)}
    assert shapes == {(48, 80), (80, 48), (64, 64)}  # (height, width)
    assert stream.per_epoch() == 6
