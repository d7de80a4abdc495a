"""Training data: find captioned images in a staged folder and serve them as resumable batches.

`load_dataset` lists the files of the dataset's layout (`dataset_layouts`: imagefolder with
metadata.jsonl, or an image with a same-name .txt), decodes each image once before training, and
applies the data policy (`data_policy`): unusable images are skipped, counted and named, and more
than `data.maxSkipped` of them fail the job up front. Each image's bytes are hashed as they are
read for that check, so the latent cache can tell a replaced image from the one it encoded.
`batches` turns the examples into a resumable stream of batches.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kubetune.api.spec import DataSpec
from kubetune.api.status import DataReport
from kubetune.api.uris import parse_uri
from kubetune_trainer.data_policy import Skipped, check_images, data_report, enforce_max_skipped, named
from kubetune_trainer.dataset_layouts import Folder, as_is, detect_layout, list_dataset
from kubetune_trainer.exitcodes import ConfigError


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str
    size: tuple[int, int] = (0, 0)
    """(width, height) in pixels, read when the dataset is loaded."""
    digest: str = ""
    """sha256 of the image file, taken when the dataset is loaded; "" when not known (then `plan_image` hashes)."""


@dataclass(frozen=True)
class Dataset:
    """Usable examples and how many images were skipped (`skipped_files` names them, with reasons)."""

    examples: list[Example]
    skipped: int
    layout: str
    skipped_files: list[Skipped] = field(default_factory=list)


@functools.lru_cache(maxsize=4096)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file, remembered while its size and modification time stay the same."""
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


def content_digest(path: Path) -> str:
    """sha256 of `path`'s bytes; read once per process for a file that does not change."""
    stat = path.stat()
    return _file_digest(path, stat.st_size, stat.st_mtime_ns)


def local_names(uri: str) -> Callable[[str], str]:
    """How a file name in the dataset (a key relative to data.uri) becomes a path in the local folder:
    S3 data was staged under the names staging derives from the keys (over-long ones shortened), data
    used in place keeps its own."""
    from kubetune_trainer.storage.staging import local_relative

    return local_relative if parse_uri(uri).scheme == "s3" else as_is


def load_dataset(root: Path, spec: DataSpec, caption: str | None = None,
                 on_report: Callable[[DataReport], None] | None = None) -> Dataset:
    """Every usable example under `root`, each image decoded once; `caption` replaces every caption
    (DreamBooth prompts; captions are then not read).

    What was used and skipped goes to `on_report` before more than `data.maxSkipped` skipped
    images fail the load (exit 78), so the failure's report names them too.
    """
    layout = detect_layout(Path(root), spec.format, plain_ok=caption is not None)
    folder = Folder(Path(root), spec.uri.rstrip("/") + "/", local_names(spec.uri))
    listing = list_dataset(layout, folder, spec.caption_column, captions=caption is None)
    usable, skipped = [], list(listing.skipped)
    for listed, check in zip(listing.files, check_images([item.path for item in listing.files]), strict=True):
        if check.problem:
            skipped.append(Skipped(listed.file, check.problem))
        else:
            usable.append(Example(listed.path, listed.caption if caption is None else caption, check.size,
                                  check.digest))
    skipped.sort(key=lambda entry: entry.file)
    report = data_report(len(usable), skipped, spec.max_skipped)
    if on_report is not None:
        on_report(report)
    enforce_max_skipped(report, spec.uri)
    if not usable:
        raise ConfigError(f"dataset {spec.uri} ({layout}) has no usable images"
                          + (f": {len(skipped)} skipped: {named(report)}" if skipped else ""))
    return Dataset(usable, len(skipped), layout, skipped)


@dataclass
class Batch:
    images: Any
    """(N, 3, H, W) pixels in [-1, 1], or the `ImagePlan`s that make them, rendered when first read:
    a step whose latents are all cached never decodes an image."""
    captions: list[str]
    sizes: list[tuple[int, int, int, int, int, int]]
    """SDXL micro-conditioning per image: original (h, w), crop (top, left), target (h, w)."""
    keys: list[str]
    """What makes each prepared image what it is (file, content, size, crop, flip): the latent-cache key."""
    weights: list[float]
    """Each image's share of the loss (1/batch size; DreamBooth class images get the prior weight)."""
    terms: list[str] | None = None
    """Which loss term each image belongs to ("instance", "prior"), where a batch mixes several."""

    @property
    def pixels(self) -> Any:
        if isinstance(self.images, list):
            self.images = render_images(self.images)
        return self.images

    def pixels_of(self, rows: list[int]) -> Any:
        """Just these images' pixels; plans not yet rendered are rendered for these rows only."""
        if isinstance(self.images, list):
            return render_images([self.images[row] for row in rows])
        return self.images[rows]

    def plan_of(self, row: int) -> ImagePlan | None:
        """The row's plan while the batch still holds plans (a joined, rendered batch does not)."""
        return self.images[row] if isinstance(self.images, list) else None


def rendered(batch: Batch) -> Batch:
    """The batch with every plan's pixels rendered into it (what a loader worker hands the training loop)."""
    if not isinstance(batch.images, list):
        return batch
    return replace(batch, images=[replace(plan, pixels=render_image(plan)) for plan in batch.images])


@dataclass(frozen=True)
class ImagePlan:
    """How one example becomes training pixels, decided without decoding it."""

    path: Path
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]
    """(left, top, right, bottom) in the resized image."""
    flip: bool
    size: tuple[int, int, int, int, int, int]
    key: str
    whole: bool = False
    """The key names the whole resized (and flipped) image, which is what gets encoded and cached;
    its latents are cropped to `crop` afterwards (`training.cacheLatents` with random crops)."""
    pixels: Any = field(default=None, compare=False, repr=False)
    """What `render_image` makes of this plan, when a loader worker rendered it ahead."""


def plan_image(path: Path, spec: DataSpec, target: tuple[int, int], rng: random.Random,
               original: tuple[int, int] = (0, 0), digest: str = "", latent_crop: int = 0) -> ImagePlan:
    """Resize to cover `target` (width, height), crop to it, maybe flip; `original` (w, h) and the
    file's `digest` if known.

    With `latent_crop` (the VAE's downsampling factor), a random crop is taken at a multiple of it
    from the whole resized image's latents: the plan's key names the whole image, not the crop.
    """
    tw, th = target
    width, height = original if all(original) else _header_size(path)
    scale = max(tw / width, th / height)
    step = latent_crop if latent_crop and not spec.center_crop else 1
    resized = (_cover(width * scale, tw, step), _cover(height * scale, th, step))
    extra_w, extra_h = resized[0] - tw, resized[1] - th
    left, top = (extra_w // 2, extra_h // 2) if spec.center_crop else (rng.randint(0, extra_w // step) * step,
                                                                      rng.randint(0, extra_h // step) * step)
    flip = spec.random_flip and rng.random() < 0.5
    digest = digest or content_digest(path)
    whole = step > 1
    key = f"{path}|{digest}|{tw}x{th}|{'whole' if whole else f'{left},{top}'}|{int(flip)}"
    return ImagePlan(path, resized, (left, top, left + tw, top + th), flip, (height, width, top, left, th, tw), key,
                     whole)


def _cover(scaled: float, target: int, step: int) -> int:
    """A resized side: at least `target`; with `step` > 1 a multiple of it (so latents crop exactly)."""
    if step == 1:
        return max(target, round(scaled))
    return max(target, math.ceil(round(scaled / step, 6)) * step)


def _header_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def render_image(plan: ImagePlan) -> Any:
    """The plan's pixels, (3, H, W) in [-1, 1]: the crop, or for a `whole` plan the whole resized image."""
    import numpy as np
    import torch
    from PIL import Image

    if plan.pixels is not None:
        return plan.pixels
    with Image.open(plan.path) as opened:
        image = opened.convert("RGB")
    image = image.resize(plan.resized, Image.Resampling.BILINEAR)
    if not plan.whole:
        image = image.crop(plan.crop)
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def training_pixels(plan: ImagePlan) -> Any:
    """The crop the model trains on, (3, h, w); a `whole` plan's crop is in the flipped image."""
    pixels = render_image(plan)
    if not plan.whole:
        return pixels
    left, top, right, bottom = plan.crop
    return pixels[:, top:bottom, left:right]


def render_images(plans: list[ImagePlan]) -> Any:
    import torch

    return torch.stack([training_pixels(plan) for plan in plans])


def make_batch(items: list[tuple[Example, random.Random]], spec: DataSpec,
               target: tuple[int, int] | None = None, latent_crop: int = 0) -> Batch:
    """Plan each example at `target` (default: square at the resolution) with its own RNG; render lazily."""
    size = target or (spec.resolution, spec.resolution)
    plans = [plan_image(example.image, spec, size, rng, example.size, example.digest, latent_crop)
             for example, rng in items]
    return Batch(plans, [ex.caption for ex, _ in items], [plan.size for plan in plans],
                 [plan.key for plan in plans], [1 / len(items)] * len(items))


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
    train = replace(dataset, examples=[dataset.examples[i] for i in keep])
    return train, [dataset.examples[i] for i in sorted(order[:held])]
