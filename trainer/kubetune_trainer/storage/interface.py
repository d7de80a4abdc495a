"""The storage interface every transfer goes through: a few methods on plain string URIs.

Staging, checkpoints and outputs never touch boto3 or paths directly; they ask
`schemes.open_store(uri)` for the backend of that URI's scheme and use it through
`ObjectStore` and the small text helpers here. Tests swap in the local backend or talk to
a real S3-compatible server; nothing patches a library. This module imports no backend,
so every backend can import it.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kubetune_trainer.exitcodes import StorageUnavailable

LOG = logging.getLogger(__name__)
CORRUPT_ATTEMPTS = 3
"""How many times `download_whole` fetches an object whose bytes keep arriving corrupt."""
_MD5_ETAG_LENGTH = 32


class CorruptTransfer(StorageUnavailable):
    """The bytes fetched do not match the object's stored digest; a new transfer may succeed."""
_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-[1-9][0-9]*$")


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its full URI, key relative to the listed prefix, size and ETag."""

    uri: str
    relative: str
    size: int
    etag: str = ""


@dataclass(frozen=True)
class Fetched:
    """What a download brought: the ETag of the version fetched, and the digest its bytes were
    checked against as they landed ("md5", "multipart-md5", "crc32"), "" when nothing was checked."""

    etag: str = ""
    digest: str = ""


class ObjectReplaced(StorageUnavailable):
    """The object changed while it was being fetched: fetching it again would not agree with its listing."""


class ObjectStore(Protocol):
    """Where objects live. URIs are full (`s3://bucket/key`, `/abs/path`)."""

    def list(self, prefix_uri: str, limit: int | None = None) -> list[ObjectInfo]:
        """Every object under `prefix_uri` (recursively); the first `limit` only, if given."""

    def download(self, uri: str, path: Path) -> Fetched:
        """Copy one object to a local file, its bytes checked wherever the object allows (single-part
        MD5 or multipart ETag, stored full-object CRC32); a mismatch raises `CorruptTransfer`."""

    def upload(self, path: Path, uri: str) -> None:
        """Copy a local file to `uri`, replacing what is there."""

    def delete(self, uri: str) -> None:
        """Remove one object; absent objects are not an error."""


def is_md5_etag(etag: str) -> bool:
    """Whether `etag` is the MD5 of the content (a single-part upload), not a multipart digest."""
    etag = etag.strip('"').lower()
    return len(etag) == _MD5_ETAG_LENGTH and "-" not in etag


def is_multipart_etag(etag: str) -> bool:
    """Whether `etag` has the multipart form: the MD5 of the parts' MD5s, a dash, the part count."""
    return bool(_MULTIPART_ETAG.match(etag.strip('"').lower()))


def join_uri(base: str, *parts: str) -> str:
    """`base` with `parts` appended, one slash between each."""
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def as_prefix(uri: str) -> str:
    """`uri` with exactly one trailing slash."""
    return uri.rstrip("/") + "/"


def write_text(store: ObjectStore, uri: str, text: str, scratch: Path) -> None:
    """Upload a small text object through a temporary local file."""
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f".upload-{uuid.uuid4().hex}"
    tmp.write_text(text, encoding="utf-8")
    try:
        store.upload(tmp, uri)
    finally:
        tmp.unlink(missing_ok=True)


def create_text(store: ObjectStore, uri: str, text: str, scratch: Path) -> bool | None:
    """Upload a small text object only if `uri` holds nothing yet: True if this call created it, False if
    something was there. Stores without an atomic create (`create`) just upload: None, unknown."""
    create = getattr(store, "create", None)
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f".upload-{uuid.uuid4().hex}"
    tmp.write_text(text, encoding="utf-8")
    try:
        if create is None:
            store.upload(tmp, uri)
            return None
        return bool(create(tmp, uri))
    finally:
        tmp.unlink(missing_ok=True)


def download_whole(store: ObjectStore, uri: str, path: Path) -> Fetched:
    """`store.download`, fetched again when the bytes arrive corrupt (a bit flipped or a body cut short on the
    way), up to CORRUPT_ATTEMPTS transfers: for the single objects read outside staging (an owner record, a
    checkpoint's files, a mirrored shard), which has a retry budget of its own. Then `CorruptTransfer` (75)."""
    for attempt in range(1, CORRUPT_ATTEMPTS + 1):
        try:
            return store.download(uri, path)
        except CorruptTransfer as exc:
            if attempt == CORRUPT_ATTEMPTS:
                raise
            LOG.warning("%s; fetching it again (%d of %d)", exc, attempt + 1, CORRUPT_ATTEMPTS)
    raise AssertionError("unreachable")


def read_text(store: ObjectStore, uri: str, scratch: Path) -> str:
    """Download a small text object through a temporary local file; `UnicodeDecodeError` if not UTF-8."""
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f".download-{uuid.uuid4().hex}"
    try:
        download_whole(store, uri, tmp)
        return tmp.read_text(encoding="utf-8")
    finally:
        tmp.unlink(missing_ok=True)
