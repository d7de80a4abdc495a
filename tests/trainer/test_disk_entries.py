"""The one lookup both scratch caches use: each missing name is encoded once, in one call, stored and
then read back, and every other row counts as a hit."""

from __future__ import annotations

from pathlib import Path

from kubetune_trainer.caches.entries import DiskEntries


def test_missing_names_are_encoded_together_and_once(tmp_path: Path) -> None:
    import torch

    calls: list[list[int]] = []

    def encode(rows: list[int]) -> list:
        calls.append(rows)
        return [torch.full((2,), float(row)) for row in rows]

    cache = DiskEntries(tmp_path / "entries")
    first = cache.lookup(["a" * 32, "b" * 32, "a" * 32], encode)
    assert calls == [[0, 1]]  # "a" once, at its first row
    assert [float(entry[0]) for entry in first] == [0.0, 1.0, 0.0]
    assert (cache.hits, cache.misses, sorted(cache.unpublished)) == (1, 2, ["a" * 32, "b" * 32])

    again = DiskEntries(tmp_path / "entries", keep_bytes=0)  # another process: from disk only
    second = again.lookup(["b" * 32, "c" * 32], encode)
    assert calls[-1] == [1]
    assert [float(entry[0]) for entry in second] == [1.0, 1.0]
    assert (again.hits, again.misses, again.names()) == (1, 1, {"a" * 32, "b" * 32, "c" * 32})
    assert cache.lookup([], encode) == [] and len(calls) == 2
