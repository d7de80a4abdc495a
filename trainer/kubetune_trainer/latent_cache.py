"""Reuse VAE encodings across epochs (`training.cacheLatents`), kept on the scratch disk.

The cache stores the encoder's distribution parameters per prepared image (file, size, crop,
flip), so a cached step samples exactly the latents an uncached step would. Crops are centred
when caching (see `assembly`), so each image has at most two entries: flipped or not.
Entries live in one folder per VAE encoder (config and weights) and data URI
(`cache_folder`), so a restart or re-run with the same model and data on the same scratch
volume encodes nothing again, and a changed model never reads stale latents.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune_trainer.data import Batch

Encoder = Callable[[Any], Any]
"""Pixels (N, 3, H, W) to the VAE's latent distribution parameters (N, 2C, h, w)."""


def cache_folder(root: Path, vae: Any, data_uri: str) -> Path:
    """`root/<key>`, the key a digest of the VAE's config, its encoder weights and the data URI."""
    import json

    import torch

    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    digest.update(data_uri.encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if not name.startswith(("decoder.", "post_quant_conv.")):  # latents never depend on them
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
    return Path(root) / digest.hexdigest()[:16]


class NoLatentCache:
    """Encode every time."""

    def moments(self, batch: Batch, encode: Encoder) -> Any:
        return encode(batch.pixels)


class DiskLatentCache:
    """One small file per prepared image under `folder`; misses are encoded together."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".pt")

    def moments(self, batch: Batch, encode: Encoder) -> Any:
        import torch

        paths = [self._path(key) for key in batch.keys]
        missing = [i for i, path in enumerate(paths) if not path.is_file()]
        fresh = {}
        if missing:
            encoded = encode(batch.pixels_of(missing)).detach().cpu()  # hits are never decoded
            for row, index in enumerate(missing):
                fresh[index] = encoded[row].clone()
                tmp = paths[index].with_suffix(f".{os.getpid()}.tmp")  # ranks of one pod share the folder
                torch.save(fresh[index], tmp)
                tmp.replace(paths[index])
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        rows = [fresh[i] if i in fresh else torch.load(path, weights_only=True) for i, path in enumerate(paths)]
        return torch.stack(rows)
