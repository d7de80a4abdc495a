"""Training data: find captioned images in a staged folder and serve them as resumable batches.

Two layouts users already have: `imagefolder` (images + metadata.jsonl) and `captions`
(an image with a same-name .txt). Undecodable images are skipped and counted. Batches come
from `BatchStream`, whose order depends only on the seed, the epoch and its position, so
a resumed run sees exactly the batches the interrupted run would have seen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.spec import DataSpec
from kubetune_trainer.exitcodes import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


@dataclass(frozen=True)
class Dataset:
    """Usable examples and how many images were skipped as unreadable."""

    examples: list[Example]
    skipped: int
    layout: str


def _visible_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _imagefolder(root: Path, column: str) -> list[Example]:
    examples = []
    lines = (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"metadata.jsonl line {number} is not JSON: {exc}") from exc
        if column not in row or "file_name" not in row:
            raise ConfigError(f"metadata.jsonl line {number} lacks 'file_name' or caption column "
                              f"{column!r} (data.captionColumn); it has: {', '.join(sorted(row))}")
        examples.append(Example(root / row["file_name"], str(row[column])))
    return examples


def _captions(root: Path, column: str) -> list[Example]:
    return [Example(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip())
            for p in _visible_images(root) if p.with_suffix(".txt").is_file()]


LAYOUTS = {"imagefolder": _imagefolder, "captions": _captions}


def detect_layout(root: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    if (root / "metadata.jsonl").is_file():
        return "imagefolder"
    if any(p.with_suffix(".txt").is_file() for p in _visible_images(root)):
        return "captions"
    raise ConfigError(f"dataset {root} has neither metadata.jsonl nor images with same-name .txt captions")


def _readable(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return False


def load_dataset(root: Path, spec: DataSpec) -> Dataset:
    """Every usable example under `root`; a ConfigError when there are none."""
    layout = detect_layout(Path(root), spec.format)
    candidates = LAYOUTS[layout](Path(root), spec.caption_column)
    usable = [ex for ex in candidates if ex.image.is_file() and _readable(ex.image)]
    if not usable:
        raise ConfigError(f"dataset {spec.uri} ({layout}) has no usable images: "
                          f"{len(candidates)} listed, {len(candidates) - len(usable)} unreadable")
    return Dataset(usable, len(candidates) - len(usable), layout)


@dataclass
class Batch:
    pixels: Any
    captions: list[str]
    sizes: list[tuple[int, int, int, int, int, int]]
    """SDXL micro-conditioning per image: original (h, w), crop (top, left), target (h, w)."""


def prepare_image(path: Path, spec: DataSpec, rng: random.Random) -> tuple[Any, tuple[int, ...]]:
    """Resize the short side to the resolution, crop square, maybe flip; pixels in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    res = spec.resolution
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    scale = res / min(width, height)
    image = image.resize((max(res, round(width * scale)), max(res, round(height * scale))),
                         Image.Resampling.BILINEAR)
    extra_w, extra_h = image.size[0] - res, image.size[1] - res
    left, top = (extra_w // 2, extra_h // 2) if spec.center_crop else (rng.randint(0, extra_w),
                                                                      rng.randint(0, extra_h))
    image = image.crop((left, top, left + res, top + res))
    if spec.random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1), (height, width, top, left, res, res)


def make_batch(items: list[tuple[Example, random.Random]], spec: DataSpec) -> Batch:
    """Prepare each example with its own RNG and stack them."""
    import torch

    prepared = [prepare_image(example.image, spec, rng) for example, rng in items]
    return Batch(torch.stack([pixels for pixels, _ in prepared]), [ex.caption for ex, _ in items],
                 [size for _, size in prepared])


def split_dataset(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, list[Example]]:
    """Hold out `fraction` of the examples (at least one when above 0), chosen by the seed."""
    if fraction <= 0:
        return dataset, []
    order = list(range(len(dataset.examples)))
    random.Random(f"holdout-{seed}").shuffle(order)
    held = max(1, round(len(order) * fraction))
    if held >= len(order):
        raise ConfigError(f"data.validationFraction {fraction} leaves no training images out of {len(order)}")
    keep = sorted(order[held:])
    train = Dataset([dataset.examples[i] for i in keep], dataset.skipped, dataset.layout)
    return train, [dataset.examples[i] for i in sorted(order[:held])]


class BatchStream:
    """Endless seeded batches for one rank; `state_dict()` is its position, for checkpoints."""

    def __init__(self, dataset: Dataset, spec: DataSpec, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.dataset, self.spec, self.batch_size, self.seed = dataset, spec, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def per_epoch(self) -> int:
        return max(1, len(self.dataset.examples) // self.world_size)

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.dataset.examples)))
        random.Random(f"order-{self.seed}-{self.epoch}").shuffle(order)
        return order[self.rank :: self.world_size][: self.per_epoch()] or order[:1]

    def _next_index(self) -> tuple[int, random.Random]:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        index = self._order[self.position]
        rng = random.Random(f"augment-{self.seed}-{self.epoch}-{self.position}-{self.rank}")
        self.position += 1
        return index, rng

    def next_batch(self) -> Batch:
        picks = [self._next_index() for _ in range(self.batch_size)]
        return make_batch([(self.dataset.examples[index], rng) for index, rng in picks], self.spec)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()
