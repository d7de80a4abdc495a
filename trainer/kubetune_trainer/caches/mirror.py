"""A copy of a scratch cache under `<output.uri>/cache/<kind>/<key>/`, so a new pod encodes nothing again.

Used for the VAE latents (`cache/latents/`) and the caption encodings (`cache/text/`). On
Kubernetes a restarted job runs in new pods with an empty scratch volume; the output URI
is what outlives them. Each rank publishes only the entries it encoded itself, in batches
(when a checkpoint is due, at the last step and on a stop signal), as shards: a safetensors
file of entries, then a manifest naming the shard, its size, its sha256 and its entries.
Readers trust only what a manifest lists, and only after checking the shard's bytes, so a
publish cut short costs encoding those inputs again, never wrong entries or a failed job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.uris import parse_uri
from kubetune_trainer.caches.entries import DiskEntries
from kubetune_trainer.parts import StepRecord
from kubetune_trainer.storage.interface import (
    ObjectInfo,
    ObjectStore,
    as_prefix,
    download_whole,
    join_uri,
    read_text,
    write_text,
)

SWITCH_ENV = "KUBETUNE_REMOTE_CACHE"
"""`0` keeps the latent and text caches on the scratch volume only."""
SHARD_BYTES = 256 << 20
"""Entries per shard stop growing past this many bytes, so a publish never holds much in memory."""
MANIFEST_SUFFIX = ".json"
SHARD_SUFFIX = ".safetensors"
_ENTRY_NAME = re.compile(r"^[0-9a-f]{32}$")
_OUTLIVES_POD = ("s3", "pvc")

Notice = Callable[[str], None]


@dataclass(frozen=True)
class ShardManifest:
    """What one published shard holds; the only thing a reader trusts."""

    shard: str
    bytes: int
    sha256: str
    entries: list[str]

    @classmethod
    def parse(cls, text: str) -> ShardManifest | None:
        """The manifest in `text`, or None when it is not one (truncated, foreign, unsafe names)."""
        try:
            raw = json.loads(text)
            manifest = cls(str(raw["shard"]), int(raw["bytes"]), str(raw["sha256"]), list(raw["entries"]))
        except (ValueError, KeyError, TypeError):
            return None
        names_ok = all(isinstance(n, str) and _ENTRY_NAME.match(n) for n in manifest.entries)
        return manifest if names_ok and "/" not in manifest.shard else None

    def text(self) -> str:
        return json.dumps({"shard": self.shard, "bytes": self.bytes, "sha256": self.sha256,
                           "entries": self.entries})


@dataclass
class FetchReport:
    """What a start-up fetch found under the output URI."""

    uri: str = ""
    label: str = "cache"
    shards: int = 0
    entries: int = 0
    ignored: list[str] = field(default_factory=list)
    """Manifests (or the listing) not used, each with why."""
    seconds: float = 0.0

    def summary(self) -> str | None:
        """One log line, or None when there was nothing to fetch."""
        if not self.entries and not self.ignored:
            return None
        text = f"{self.label}: {self.entries} entries from {self.shards} shards under {self.uri} in {self.seconds:.1f}s"
        return text + (f"; ignored {len(self.ignored)}: {'; '.join(self.ignored[:3])}" if self.ignored else "")


class CacheMirror:
    """Publishes this rank's new cache entries to `uri` and fetches what every rank published."""

    def __init__(self, store: ObjectStore, uri: str, cache: DiskEntries, scratch: Path, rank: int,
                 notice: Notice = lambda text: None, shard_bytes: int = SHARD_BYTES) -> None:
        self.store, self.uri, self.cache, self.scratch = store, as_prefix(uri), cache, Path(scratch)
        self.rank, self.notice, self.shard_bytes = rank, notice, shard_bytes

    def fetch(self) -> FetchReport:
        """Copy every entry of every complete shard that the scratch cache lacks; never raises."""
        started, report = time.monotonic(), FetchReport(self.uri, self.cache.label)
        try:
            listing = {obj.relative: obj for obj in self.store.list(self.uri)}
        except Exception as exc:  # an unreadable copy is a cache miss; the checkpointer reports storage errors
            report.ignored.append(f"cannot list: {exc}")
            listing = {}
        for relative in sorted(r for r in listing if r.endswith(MANIFEST_SUFFIX)):
            try:
                problem = self._fetch_shard(relative, listing, report)
            except Exception as exc:  # a shard that cannot be read costs re-encoding, not the job
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                report.ignored.append(f"{relative} ({problem})")
        report.seconds = time.monotonic() - started
        return report

    def _fetch_shard(self, relative: str, listing: dict[str, ObjectInfo], report: FetchReport) -> str | None:
        """Copy one shard's missing entries; return why it was not used, or None."""
        manifest = ShardManifest.parse(read_text(self.store, listing[relative].uri, self.scratch))
        if manifest is None:
            return "not a shard manifest"
        wanted = [name for name in dict.fromkeys(manifest.entries) if not self.cache.has(name)]
        if not wanted:
            return None
        folder = relative.rpartition("/")[0]
        stored = listing.get(f"{folder}/{manifest.shard}" if folder else manifest.shard)
        if stored is None:
            return "shard missing"
        if stored.size != manifest.bytes:
            return f"shard is {stored.size} bytes, its manifest says {manifest.bytes}"
        tensors = self._download(stored.uri, manifest.sha256)
        if tensors is None:
            return "shard bytes do not match the manifest"
        present = [name for name in wanted if self.cache.from_shard(name, tensors)]
        report.shards += 1
        report.entries += len(present)
        return None if len(present) == len(wanted) else f"{len(wanted) - len(present)} listed entries absent"

    def _download(self, uri: str, sha256: str) -> dict[str, Any] | None:
        from safetensors.torch import load_file

        self.scratch.mkdir(parents=True, exist_ok=True)
        tmp = self.scratch / f".shard-{uuid.uuid4().hex}"
        try:
            download_whole(self.store, uri, tmp)
            if _sha256(tmp) != sha256:
                return None
            return load_file(str(tmp))
        finally:
            tmp.unlink(missing_ok=True)

    def publish(self) -> int:
        """Upload the entries this rank encoded since the last publish; return how many were published."""
        names = [n for n in dict.fromkeys(self.cache.take_unpublished()) if self.cache.has(n)]
        published = 0
        for chunk in self._chunks(names):
            try:
                self._publish_shard(chunk)
            except Exception as exc:  # the copy is an optimisation: a failed publish must not fail training
                self.notice(f"{self.cache.label}: could not publish {len(chunk)} entries to {self.uri}: {exc}")
                self.cache.unpublished.extend(chunk)
                continue
            published += len(chunk)
        return published

    def _chunks(self, names: list[str]) -> list[list[str]]:
        chunks: list[list[str]] = [[]]
        size = 0
        for name in names:
            if chunks[-1] and size >= self.shard_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(name)
            size += self.cache.path_of(name).stat().st_size
        return [chunk for chunk in chunks if chunk]

    def _publish_shard(self, names: list[str]) -> None:
        """The shard, then its manifest: until the manifest exists, no reader sees the shard."""
        from safetensors.torch import save_file

        stem = f"rank-{self.rank}-{uuid.uuid4().hex[:12]}"
        self.scratch.mkdir(parents=True, exist_ok=True)
        tmp = self.scratch / f".{stem}{SHARD_SUFFIX}"
        try:
            save_file({key: tensor for name in names for key, tensor in self.cache.shard_tensors(name).items()},
                      str(tmp))
            manifest = ShardManifest(stem + SHARD_SUFFIX, tmp.stat().st_size, _sha256(tmp), names)
            self.store.upload(tmp, self.uri + manifest.shard)
        finally:
            tmp.unlink(missing_ok=True)
        write_text(self.store, self.uri + stem + MANIFEST_SUFFIX, manifest.text(), self.scratch)

    def step_hook(self, record: StepRecord) -> None:
        """Publish when a checkpoint is due, at the last step and when asked to stop, not every step."""
        if record.checkpoint_due or record.last:
            self.publish()


class NoMirror:
    """The cache stays on the scratch volume."""

    def fetch(self) -> FetchReport:
        return FetchReport()

    def publish(self) -> int:
        return 0

    def step_hook(self, record: StepRecord) -> None:
        pass


def mirror_uri(output_uri: str, cache: DiskEntries) -> str:
    """Where the copy of `cache` lives: `cache/<kind>/` and the same key as its scratch folder."""
    return as_prefix(join_uri(output_uri, "cache", cache.kind, cache.folder.name))


def build_mirror(cache: DiskEntries, store: ObjectStore, output_uri: str, scratch: Path, rank: int,
                 notice: Notice) -> CacheMirror | NoMirror:
    """A mirror when the output outlives the pod (s3://, pvc://), unless switched off."""
    if os.environ.get(SWITCH_ENV, "1") == "0" or parse_uri(output_uri).scheme not in _OUTLIVES_POD:
        return NoMirror()
    return CacheMirror(store, mirror_uri(output_uri, cache), cache, scratch, rank, notice)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
