"""A folder of named tensor entries on the scratch volume, shared by the latent and text caches.

Both caches store what a frozen encoder made of one input (an image, a caption) under a
32-hex-digit name, in a folder whose name is a digest of everything the encoding depends on.
This class holds what they share: the one lookup (read the entries found, encode the missing
ones together, store them), entries written whole or not at all (temporary file, then
rename), an in-memory copy up to a byte budget so later epochs read no file, the list of
entries this process encoded that `mirror` has not yet published, and how an entry is
laid out in a mirror shard.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENTRY_SUFFIX = ".pt"


def tensor_bytes(value: Any) -> int:
    """Bytes held by a tensor or a tuple of tensors."""
    parts = value if isinstance(value, tuple) else (value,)
    return sum(part.numel() * part.element_size() for part in parts)


class DiskEntries:
    """Entries under `folder`; an entry is one tensor (subclasses may store a tuple of tensors).

    `kind` names the cache under `<output>/cache/` and `label` starts its log lines.
    """

    kind = "entries"
    label = "cache"

    def __init__(self, folder: Path, keep_bytes: int = 1 << 30) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0
        self.unpublished: list[str] = []
        """Entries this process encoded that no copy outside the scratch volume holds yet."""
        self.kept: dict[str, Any] = {}
        """Entries also held in memory (up to `keep_bytes`), so later epochs read no file."""
        self.keep_bytes, self.kept_bytes = keep_bytes, 0

    def lookup(self, names: list[str], encode: Callable[[list[int]], list[Any]]) -> list[Any]:
        """The entry of each name, in order; `encode(rows)` makes those not stored yet, in one call.

        `rows` holds the first row of each missing name; `encode` returns one entry per row,
        which is stored before it is handed out. Every other row counts as a hit.
        """
        missing: dict[str, int] = {}
        for row, name in enumerate(names):
            if name not in missing and not self.has(name):
                missing[name] = row
        fresh = dict(zip(missing, encode(list(missing.values())), strict=True)) if missing else {}
        for name, value in fresh.items():
            self.add(name, value)
        self.misses += len(fresh)
        self.hits += len(names) - len(fresh)
        return [fresh[name] if name in fresh else self.load(name) for name in names]

    def path_of(self, name: str) -> Path:
        return self.folder / (name + ENTRY_SUFFIX)

    def names(self) -> set[str]:
        """Every complete entry on disk."""
        return {path.name.removesuffix(ENTRY_SUFFIX) for path in self.folder.glob("*" + ENTRY_SUFFIX)}

    def has(self, name: str) -> bool:
        return name in self.kept or self.path_of(name).is_file()

    def load(self, name: str) -> Any:
        import torch

        if name in self.kept:
            return self.kept[name]
        value = self.placed(torch.load(self.path_of(name), weights_only=True))
        self._keep(name, value)
        return value

    def placed(self, value: Any) -> Any:
        """`value` as this cache hands it out (the text cache moves it to the device)."""
        return value

    def _keep(self, name: str, value: Any) -> None:
        size = tensor_bytes(value)
        if name not in self.kept and self.kept_bytes + size <= self.keep_bytes:
            self.kept[name] = value
            self.kept_bytes += size

    def store(self, name: str, value: Any) -> None:
        """Write one entry whole or not at all: ranks of one pod share the folder."""
        import torch

        path = self.path_of(name)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(value, tmp)
        tmp.replace(path)

    def add(self, name: str, value: Any) -> None:
        """A freshly encoded entry: to disk, to memory, and onto the list to publish."""
        self.store(name, _on_cpu(value))
        self._keep(name, value)
        self.unpublished.append(name)

    def take_unpublished(self) -> list[str]:
        taken, self.unpublished = self.unpublished, []
        return taken

    def shard_tensors(self, name: str) -> dict[str, Any]:
        """The entry as named tensors for a mirror shard: one tensor under the entry's own name."""
        return {name: _on_cpu(self.load(name)).contiguous()}

    def from_shard(self, name: str, tensors: dict[str, Any]) -> bool:
        """Store the entry `tensors` (a loaded shard) holds; False when it lacks it."""
        if name not in tensors:
            return False
        self.store(name, tensors[name])
        return True


def _on_cpu(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(part.detach().cpu() for part in value)
    return value.detach().cpu()
