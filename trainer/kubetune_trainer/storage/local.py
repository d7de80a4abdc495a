"""The local backend of `ObjectStore`: plain paths, file:// URIs and mounted PVCs (`pvc://claim/path`).

Writes land under a temporary name and are renamed, so a reader never sees half a file;
deletes prune the folders they leave empty, never above a claim's mount point.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from kubetune.api.uris import parse_uri
from kubetune_trainer.storage.interface import Fetched, ObjectInfo, join_uri

T = TypeVar("T")

PVC_ROOT = Path("/mnt/pvc")
"""Where the trainer's pod mounts the claims that pvc:// URIs name."""


class LocalStore:
    """A directory tree: plain paths, file:// and mounted PVCs (`pvc://claim/path`)."""

    def __init__(self, pvc_root: Path = PVC_ROOT) -> None:
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
            try:
                size = path.stat().st_size
            except FileNotFoundError:  # deleted since the walk saw it (another rank's probe): not there
                continue
            rel = path.relative_to(root).as_posix()
            found.append(ObjectInfo(join_uri(prefix_uri, rel), rel, size))
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
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")  # two writers never share one

        def replace() -> None:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)

        write_in_folder(target, replace)

    def create(self, path: Path, uri: str) -> bool:
        """Copy a local file to `uri` only if nothing is there (a hard link never replaces): whether it did."""
        target = self.path_of(uri)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
        write_in_folder(target, lambda: shutil.copyfile(path, tmp))
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


def write_in_folder(target: Path, write: Callable[[], T]) -> T:
    """`write()` once `target`'s folder exists, again (three tries in all) if the folder vanished meanwhile:
    another process's delete prunes the folders it leaves empty, the output root too while it holds nothing
    (one rank's probe beside another rank's first write)."""
    for attempt in range(3):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            return write()
        except FileNotFoundError:
            if attempt == 2 or target.parent.is_dir():
                raise
    raise AssertionError("unreachable: the third try returns or raises")


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
