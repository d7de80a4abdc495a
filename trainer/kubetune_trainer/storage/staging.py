"""Copy every object under a prefix onto local disk before training: `Stager.stage_prefix()`.

S3 prefixes are listed page by page, each key mapped to a local name (`local_relative`; a
listing whose keys collide locally is refused before anything is fetched), fetched in parallel
(one GET per small object, parallel ranges for large ones), verified (size, and every byte
against the digest the object carries: its ETag, single-part or multipart, or S3's stored
full-object CRC32, checked by the store as the bytes land), written under a temporary name and
renamed, and recorded by a per-file marker so that a re-run skips what is complete. A transfer
that breaks or arrives corrupt is fetched again, within a retry budget; objects without any
digest are counted and named in the report. Which URIs are copied this way, used in place or
fetched from the Hugging Face Hub is the scheme table's choice (`schemes.stage`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kubetune_trainer.exitcodes import ConfigError, StorageUnavailable
from kubetune_trainer.storage.interface import Fetched, ObjectInfo, ObjectReplaced, ObjectStore, as_prefix
from kubetune_trainer.storage.transfer_checks import CorruptTransfer

MARKER_DIR = ".kubetune-staged"
MAX_SEGMENT_BYTES = 200
"""Longest local file or folder name: NAME_MAX (255) less room for the temporary name's
`.` prefix and `.part-xxxxxxxx` suffix and the marker's `.json`."""
HASH_CHARS = 12
MAX_EXTENSION_BYTES = 16
OBJECT_ATTEMPTS = 5
"""Transfers of one object before its staging fails: enough to outlast bad luck; a path that corrupts
everything is stopped sooner by the pass's retry budget (`Stager.retry_budget`)."""
UNVERIFIED_NAMED = 10


@dataclass(frozen=True)
class StagingReport:
    """What one staging pass did.

    `unverified` objects carried no digest to check their bytes against (an SSE-KMS or SSE-C
    object without a stored full-object CRC32): only their size was checked; the first few are
    named in `unverified_keys`. `retried` counts transfers fetched again after breaking off or
    arriving corrupt.
    """

    path: Path
    files: int = 0
    downloaded: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0
    unverified: int = 0
    unverified_keys: tuple[str, ...] = ()
    retried: int = 0


def _shorten(segment: str) -> str:
    """`segment` cut to MAX_SEGMENT_BYTES: its head, `~`, a hash of the whole name, its extension."""
    stem, dot, extension = segment.rpartition(".")
    extension = f".{extension}" if dot and stem and len(extension.encode()) < MAX_EXTENSION_BYTES else ""
    stem = segment[: len(segment) - len(extension)]
    digest = hashlib.sha256(segment.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    room = MAX_SEGMENT_BYTES - len(extension.encode()) - 1 - HASH_CHARS
    head = stem.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
    return f"{head}~{digest}{extension}"


def local_relative(key: str) -> str:
    """The local path, relative to the staging folder, that the object key `key` (relative to the
    staged prefix) is written to. A pure function, shared with the data loader, which maps
    metadata.jsonl `file_name` values through it.

    Segments are mapped one by one, so mapping a path equals joining its mapped parts: `.`
    segments are dropped; a segment longer than MAX_SEGMENT_BYTES (in UTF-8) keeps its head and
    extension around a short hash of the whole segment (`<head>~<sha256[:12]><ext>`); others are
    kept as they are. A key that names no file, climbs out (`..`), holds an empty segment (`a//b`,
    a leading `/`) or a NUL, or enters the stager's marker folder is a ConfigError naming it.
    """
    parts = [] if key.startswith("/") else [p for p in key.split("/") if p != "."]
    if not parts or any(p in ("..", "") or "\0" in p for p in parts) or parts[0] == MARKER_DIR:
        raise ConfigError(f"key {key!r} cannot be staged: it would escape the target folder (absolute path, "
                          f"'..' or empty component), names no file, or enters {MARKER_DIR}/; rename the object")
    return "/".join(p if len(p.encode("utf-8", "surrogatepass")) <= MAX_SEGMENT_BYTES else _shorten(p)
                    for p in parts)


def local_plan(objects: Iterable[ObjectInfo], source: str) -> list[tuple[ObjectInfo, PurePosixPath]]:
    """Each object with its local path; a ConfigError naming both keys where two objects would
    land on the same local file (`./x` and `x`, or two long names cut alike), or where one
    object's path is another's folder (`a` and `a/b`)."""
    files: dict[str, ObjectInfo] = {}
    folders: dict[str, ObjectInfo] = {}
    plan = []
    for obj in objects:
        try:
            rel = local_relative(obj.relative)
        except ConfigError as exc:
            raise ConfigError(f"{obj.uri} (from {source}): {exc}") from None
        if rel in files:
            raise ConfigError(f"{files[rel].uri} and {obj.uri} would both be staged as {rel!r}; "
                              "rename one of them")
        files[rel] = obj
        for parent in PurePosixPath(rel).parents:
            if str(parent) != ".":
                folders.setdefault(str(parent), obj)
        plan.append((obj, PurePosixPath(rel)))
    for rel, obj in files.items():
        if rel in folders:
            raise ConfigError(f"{obj.uri} is a file but {folders[rel].uri} needs a folder of the same name "
                              f"({rel!r}); a local folder cannot hold both: rename one of them")
    return plan


def _marker(dest: Path, rel: PurePosixPath) -> Path:
    return dest / MARKER_DIR / f"{rel}.json"


def _is_staged(dest: Path, obj: ObjectInfo, rel: PurePosixPath) -> bool:
    marker, target = _marker(dest, rel), dest / rel
    if not (marker.is_file() and target.is_file()):
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    same = recorded == {"size": obj.size, "etag": obj.etag}
    return same and target.stat().st_size == obj.size


def verify(path: Path, obj: ObjectInfo, fetched: Fetched) -> str:
    """Raise unless `path` has `obj`'s size and is the version listed; return the digest its bytes
    were checked against by the store as they landed ("" for none).

    The store, not this function, knows whether an ETag is an MD5 of the bytes (an SSE-KMS
    object's MD5-looking ETag is not), so nothing is hashed here.
    """
    size = path.stat().st_size
    if size != obj.size:
        raise CorruptTransfer(f"{obj.uri}: downloaded {size} bytes, expected {obj.size}")
    if fetched.etag and obj.etag and fetched.etag.lower() != obj.etag.lower():
        raise ObjectReplaced(f"{obj.uri} was replaced after it was listed (ETag {obj.etag} listed, "
                             f"{fetched.etag} fetched); run again")
    return fetched.digest


@dataclass
class _Tally:
    """Counts shared by the transfer threads of one pass: the retry budget spent, objects unchecked."""

    budget: int
    retried: int = 0
    unverified: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spend(self, uri: str, exc: Exception) -> None:
        """Take one retry from the budget, or raise if it is spent."""
        with self.lock:
            if self.retried >= self.budget:
                raise StorageUnavailable(f"staging gave up after {self.retried} transfers were fetched again "
                                         f"(the retry budget of this pass); last: {exc}") from exc
            self.retried += 1


class Stager:
    """Fetches every object under a prefix into a folder; `on_download` sees each fetched file.

    A transfer that breaks off or arrives corrupt is fetched again, up to OBJECT_ATTEMPTS per object
    and `retry_budget(len(objects))` per pass: a path that corrupts or breaks everything fails after
    a few dozen transfers, it is not fetched OBJECT_ATTEMPTS times over.
    """

    def __init__(self, store: ObjectStore, concurrency: int = 16,
                 on_download: Callable[[ObjectInfo], None] | None = None) -> None:
        self.store = store
        self.concurrency = concurrency
        self.on_download = on_download or (lambda obj: None)

    @staticmethod
    def retry_budget(objects: int) -> int:
        return 16 + objects // 10

    def stage_prefix(self, uri: str, dest: Path) -> StagingReport:
        started = time.monotonic()
        objects = [o for o in self.store.list(as_prefix(uri)) if o.relative and not o.relative.endswith("/")]
        if not objects:
            raise ConfigError(f"nothing to stage: no objects under {as_prefix(uri)}")
        plan = local_plan(objects, uri)
        todo = [(obj, rel) for obj, rel in plan if not _is_staged(dest, obj, rel)]
        tally = _Tally(self.retry_budget(len(todo)))
        self._fetch_all(dest, todo, tally)
        return StagingReport(dest, len(plan), len(todo), sum(o.size for o, _ in todo), time.monotonic() - started,
                             len(tally.unverified), tuple(sorted(tally.unverified)[:UNVERIFIED_NAMED]), tally.retried)

    def _fetch_all(self, dest: Path, todo: list[tuple[ObjectInfo, PurePosixPath]], tally: _Tally) -> None:
        """Fetch in parallel; on the first failure, cancel what has not started and re-raise."""
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="stage") as pool:
            futures = [pool.submit(self._fetch, dest, obj, rel, tally) for obj, rel in todo]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _fetch(self, dest: Path, obj: ObjectInfo, rel: PurePosixPath, tally: _Tally) -> None:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = self._transfer(obj, target, tally)
        if not digest:
            with tally.lock:
                tally.unverified.append(obj.uri)
        marker = _marker(dest, rel)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"size": obj.size, "etag": obj.etag}), encoding="utf-8")
        self.on_download(obj)

    def _transfer(self, obj: ObjectInfo, target: Path, tally: _Tally) -> str:
        """Fetch `obj` to `target` through a temporary file, again while it breaks or arrives corrupt;
        the digest its bytes were checked against."""
        for attempt in range(1, OBJECT_ATTEMPTS + 1):
            tmp = target.with_name(f".{target.name}.part-{uuid.uuid4().hex[:8]}")
            try:
                digest = verify(tmp, obj, self.store.download(obj.uri, tmp))
                os.replace(tmp, target)
                return digest
            except ObjectReplaced:
                raise
            except StorageUnavailable as exc:
                if attempt == OBJECT_ATTEMPTS:
                    raise StorageUnavailable(f"{obj.uri}: {OBJECT_ATTEMPTS} transfers failed; last: {exc}") from exc
                tally.spend(obj.uri, exc)
            finally:
                tmp.unlink(missing_ok=True)
        raise AssertionError("unreachable: the last attempt returns or raises")
