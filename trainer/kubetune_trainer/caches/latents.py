"""Reuse VAE encodings across epochs (`training.cacheLatents`), kept on the scratch disk.

The cache stores the encoder's distribution parameters per prepared image (file, content
digest, size, crop, flip), so a cached step samples exactly the latents an uncached step would,
and an image replaced under the same name is encoded again. With centred crops each image has
at most two entries: flipped or not. With random crops (`data.centerCrop: false`) the entry is
the whole resized image's, and each step crops its latents at the plan's offset, a multiple of
the VAE's downsampling factor: still two entries per image, and a new crop every epoch. (Near
the crop's edges such latents differ slightly from encoding the crop alone: the encoder sees the
pixels around it.)
Entries live in one folder per VAE encoder (config and weights), data URI and resolution
(`cache_folder`), so a restart or re-run with the same model and data on the same scratch
volume encodes nothing again, and a changed model never reads stale latents. Entry names do
not depend on where the scratch volume is mounted, so `caches.mirror` can carry them to a new
pod through the output URI.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune_trainer.caches.entries import DiskEntries
from kubetune_trainer.data import Batch, ImagePlan, render_image

Encoder = Callable[[Any], Any]
"""Pixels (N, 3, H, W) to the VAE's latent distribution parameters (N, 2C, h, w)."""


def cache_folder(root: Path, vae: Any, data_uri: str, resolution: int) -> Path:
    """`root/<key>`, the key a digest of the VAE's config, its encoder weights, the data URI and resolution."""
    import json

    import torch

    config = {k: v for k, v in dict(vae.config).items() if k != "_name_or_path"}  # where it was loaded from
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(f"{data_uri}|{resolution}".encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if not name.startswith(("decoder.", "post_quant_conv.")):  # latents never depend on them
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
    return Path(root) / digest.hexdigest()[:16]


class NoLatentCache:
    """Encode every time."""

    def moments(self, batch: Batch, encode: Encoder) -> Any:
        return encode(batch.pixels)


class DiskLatentCache(DiskEntries):
    """One small file per prepared image under `folder`; misses are encoded together.

    Image keys name staged files by their path; the part under `scratch` is replaced by a
    fixed marker, so the same image has the same entry name whichever volume it was staged to.
    """

    kind = "latents"
    label = "latent cache"

    def __init__(self, folder: Path, scratch: Path | None = None, keep_bytes: int = 1 << 30) -> None:
        super().__init__(folder, keep_bytes)
        self.scratch_prefix = str(scratch).rstrip(os.sep) + os.sep if scratch is not None else None

    def entry_name(self, key: str) -> str:
        if self.scratch_prefix and key.startswith(self.scratch_prefix):
            key = "<scratch>/" + key[len(self.scratch_prefix):]
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def moments(self, batch: Batch, encode: Encoder) -> Any:
        import torch

        found = self.lookup([self.entry_name(key) for key in batch.keys], lambda rows: _encoded(batch, rows, encode))
        return torch.stack([_cropped(batch.plan_of(i), entry) if _whole(batch, i) else entry
                            for i, entry in enumerate(found)])


def _encoded(batch: Batch, rows: list[int], encode: Encoder) -> list[Any]:
    """The moments of these rows, on the CPU: crops encoded together, whole images (sizes differ) one at a time."""
    whole = [i for i in rows if _whole(batch, i)]
    cropped = [i for i in rows if i not in whole]
    fresh = {}
    if cropped:
        encoded = encode(batch.pixels_of(cropped)).detach().cpu()  # hits are never decoded
        fresh.update({index: encoded[row].clone() for row, index in enumerate(cropped)})
    for index in whole:
        fresh[index] = encode(render_image(batch.plan_of(index))[None]).detach().cpu()[0].clone()
    return [fresh[index] for index in rows]


def _whole(batch: Batch, row: int) -> bool:
    plan = batch.plan_of(row)
    return plan is not None and plan.whole


def _cropped(plan: ImagePlan, moments: Any) -> Any:
    """The latents of the plan's crop, cut from those of its whole resized image."""
    factor = plan.resized[0] // moments.shape[-1]
    left, top, right, bottom = (edge // factor for edge in plan.crop)
    return moments[:, top:bottom, left:right]
