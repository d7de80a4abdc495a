"""The storage interface every transfer goes through: a few methods on plain string URIs.

Staging, checkpoints and outputs never touch boto3 or paths directly; they ask
`open_store(uri)` for the backend of that URI's scheme. Tests swap in the local backend
or talk to a real S3-compatible server; nothing patches a library.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kubetune.api.spec import StorageSpec
from kubetune.api.uris import parse_uri
from kubetune_trainer.exitcodes import ConfigError, StorageUnavailable

_MD5_ETAG_LENGTH = 32
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


def read_text(store: ObjectStore, uri: str, scratch: Path) -> str:
    """Download a small text object through a temporary local file; `UnicodeDecodeError` if not UTF-8."""
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f".download-{uuid.uuid4().hex}"
    try:
        store.download(uri, tmp)
        return tmp.read_text(encoding="utf-8")
    finally:
        tmp.unlink(missing_ok=True)


class LocalStore:
    """A directory tree: plain paths, file:// and mounted PVCs (`pvc://claim/path`)."""

    def __init__(self, pvc_root: Path = Path("/mnt/pvc")) -> None:
        self.pvc_root = Path(pvc_root)

    def path_of(self, uri: str) -> Path:
        parsed = parse_uri(uri)
        if parsed.scheme == "pvc":
            return self.pvc_root / parsed.location / parsed.path
        return Path(parsed.path)

    def list(self, prefix_uri: str, limit: int | None = None) -> list[ObjectInfo]:
        root = self.path_of(prefix_uri)
        if not root.is_dir():
            return []
        found = []
        files = (p for p in root.rglob("*") if p.is_file())
        for path in files if limit is not None else sorted(files):  # a few need no sorted walk of the tree
            rel = path.relative_to(root).as_posix()
            found.append(ObjectInfo(join_uri(prefix_uri, rel), rel, path.stat().st_size))
            if limit is not None and len(found) >= limit:
                break
        return found

    def download(self, uri: str, path: Path) -> Fetched:
        source = self.path_of(uri)
        if not source.is_file():
            raise FileNotFoundError(f"{uri} does not exist")
        shutil.copyfile(source, path)
        return Fetched()

    def upload(self, path: Path, uri: str) -> None:
        target = self.path_of(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.partial")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def create(self, path: Path, uri: str) -> bool:
        """Copy a local file to `uri` only if nothing is there (a hard link never replaces): whether it did."""
        target = self.path_of(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
        shutil.copyfile(path, tmp)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def delete(self, uri: str) -> None:
        target = self.path_of(uri)
        target.unlink(missing_ok=True)
        _prune_empty_parents(target.parent.absolute(), self._floor(uri).absolute())

    def _floor(self, uri: str) -> Path:
        """The highest folder a delete may leave empty but never removes: a pvc:// claim's mount point."""
        parsed = parse_uri(uri)
        return self.pvc_root / parsed.location if parsed.scheme == "pvc" else Path("/")


def _prune_empty_parents(folder: Path, floor: Path) -> None:
    """Remove folders left empty by deletes, so a deleted checkpoint leaves no husk; never `floor` or
    above, never a mount point, and a folder that cannot be removed (busy, read-only) ends the walk."""
    while folder.is_dir() and folder != floor and floor in folder.parents and not folder.is_mount() \
            and not any(folder.iterdir()):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


StoreFactory = Callable[[StorageSpec, Path], ObjectStore]


def _s3(spec: StorageSpec, pvc_root: Path) -> ObjectStore:
    from kubetune_trainer.s3 import S3Store

    return S3Store(spec)


def _local(spec: StorageSpec, pvc_root: Path) -> ObjectStore:
    return LocalStore(pvc_root)


BACKENDS: dict[str, StoreFactory] = {"s3": _s3, "pvc": _local, "file": _local, "path": _local}


def open_store(uri: str, spec: StorageSpec, pvc_root: Path = Path("/mnt/pvc")) -> ObjectStore:
    """The backend for `uri`'s scheme, configured from `spec.storage`."""
    scheme = parse_uri(uri).scheme
    factory = BACKENDS.get(scheme)
    if factory is None:
        raise ConfigError(f"{uri}: scheme {scheme}:// cannot be read or written here")
    return factory(spec, pvc_root)
