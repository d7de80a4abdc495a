"""Which files make a dataset and what their captions say, read only inside the dataset folder.

Layouts users already have: `imagefolder` (images named by metadata.jsonl rows: `file_name` and
a caption column), `captions` (each image with a same-name .txt) and `images` (plain images, where
the caption is given: DreamBooth). Every file read resolves inside the dataset folder: a
metadata.jsonl `file_name` that is absolute, climbs out with `..` or is a symlink leading out is
refused (exit 78, naming the line), so a dataset cannot pull a file from elsewhere on the node into
the weights; a symlinked image or caption leading out is refused the same way.

A row whose image is missing, an image without a caption file, and a caption that is not UTF-8 or
is empty (where captions are needed) are skipped and named (`Skipped`, see `data_policy`); a
metadata.jsonl line that is not a JSON object is a ConfigError naming the file and the line.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kubetune_trainer.data_policy import Skipped
from kubetune_trainer.exitcodes import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class Listed:
    """An image to decode, under the name the dataset gives it, with its caption."""

    file: str
    """Key relative to data.uri (what reports name)."""
    path: Path
    caption: str


@dataclass
class Listing:
    """A layout's images in dataset order, and those already skipped for a missing file or a bad caption."""

    files: list[Listed] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def as_is(name: str) -> str:
    """A file name on a dataset used in place (pvc://, a local folder) is its local name."""
    return name


@dataclass(frozen=True)
class Folder:
    """A dataset folder, the URI its files are named under, and how a name becomes a local path."""

    root: Path
    source: str
    """data.uri ending in `/`: errors name files as source + name."""
    local_name: Callable[[str], str] = as_is
    """Key relative to data.uri -> path relative to `root`: staging's mapping where the data was staged
    (over-long names are shortened there), `as_is` where it is used in place."""

    def where(self, name: str) -> str:
        return f"{self.source}{name}"


def disk_name(root: Path, path: Path) -> str:
    """`path` relative to `root` as text that prints and serializes: bytes of a file name that are not
    UTF-8 are shown as backslash escapes."""
    return os.fsencode(path.relative_to(root).as_posix()).decode("utf-8", "backslashreplace")


def _visible_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def detect_layout(root: Path, requested: str, plain_ok: bool = False) -> str:
    """The layout named, or the one found; plain images count only where captions are not needed."""
    if requested != "auto":
        return requested
    if (root / METADATA).is_file():
        return "imagefolder"
    if any(p.with_suffix(".txt").is_file() for p in _visible_images(root)):
        return "captions"
    if plain_ok and _visible_images(root):
        return "images"
    raise ConfigError(f"dataset {root} has neither metadata.jsonl nor images with same-name .txt captions")


def inside(root: Path, path: Path, where: str) -> Path:
    """`path`, once every symlink on it is followed, still inside `root`; a ConfigError naming `where` if not."""
    real, top = path.resolve(), root.resolve()
    if real != top and top not in real.parents:
        raise ConfigError(f"{where} leads to {real}, outside the dataset folder: the trainer reads nothing outside "
                          "data.uri; copy the file into the dataset")
    return path


def confined(folder: Folder, name: str, where: str) -> Path:
    """The local path of a metadata.jsonl `file_name`: relative, no `..`, and inside the folder once resolved."""
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        raise ConfigError(f"{where}: file_name {name!r} is an absolute path; file names are relative to the "
                          "dataset folder (data.uri)")
    if ".." in PurePosixPath(name).parts:
        raise ConfigError(f"{where}: file_name {name!r} contains '..'; file names are relative to the dataset "
                          "folder (data.uri) and stay inside it")
    try:
        local = folder.local_name(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: file_name {name!r} cannot name a staged file: {exc}") from exc
    return inside(folder.root, folder.root / local, f"{where}: file_name {name!r}")


def _is_utf8(text: str) -> bool:
    """False when `text` carries bytes that were not UTF-8 (decoded with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metadata_rows(folder: Folder) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line of metadata.jsonl; bytes that are not UTF-8 are kept as
    surrogates so that the row can be judged by the field they are in."""
    try:
        raw = (folder.root / METADATA).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{folder.where(METADATA)}: cannot read: {exc.strerror or exc}") from exc
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    for number, line in enumerate(raw.split(b"\n"), start=1):
        text = line.decode("utf-8", "surrogateescape").strip()
        where = f"{folder.where(METADATA)} line {number}"
        if not text:
            continue
        try:
            row = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where} is not JSON ({exc}); each line must be one object such as "
                              '{"file_name": "a.png", "text": "a caption"}') from exc
        if not isinstance(row, dict):
            raise ConfigError(f"{where} is a JSON {type(row).__name__}, not an object with file_name and a caption")
        yield number, row


def _file_name(row: dict[str, Any], where: str, column: str | None) -> str:
    if "file_name" not in row or (column is not None and column not in row):
        wanted = "'file_name'" + (f" or caption column {column!r} (data.captionColumn)" if column else "")
        raise ConfigError(f"{where} lacks {wanted}; it has: {', '.join(sorted(row))}")
    name = row["file_name"]
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: file_name must be a non-empty string, not {name!r}")
    if not _is_utf8(name):
        raise ConfigError(f"{where}: file_name {name!r} is not UTF-8")
    return name


def _row_caption(value: Any) -> tuple[str, str]:
    """(caption, problem) of a metadata.jsonl caption value."""
    text = "" if value is None else str(value).strip()
    if not _is_utf8(text):
        return "", "caption is not UTF-8"
    return text, "" if text else "empty caption"


def _imagefolder(folder: Folder, column: str, captions: bool) -> Listing:
    listing = Listing()
    for number, row in _metadata_rows(folder):
        where = f"{folder.where(METADATA)} line {number}"
        name = _file_name(row, where, column if captions else None)
        path = confined(folder, name, where)
        caption, problem = _row_caption(row[column]) if captions else ("", "")
        if not path.is_file():
            listing.skipped.append(Skipped(name, f"missing file (named by {METADATA} line {number})"))
        elif problem:
            listing.skipped.append(Skipped(name, f"{problem} ({METADATA} line {number})"))
        else:
            listing.files.append(Listed(name, path, caption))
    return listing


def _caption_file(path: Path, name: str) -> tuple[str, str]:
    """(caption, problem) of a .txt caption file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return "", f"cannot read caption {name}: {exc.strerror or exc}"
    try:
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        return "", f"caption {name} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
    return text, "" if text else f"caption {name} is empty"


def _captions(folder: Folder, column: str, captions: bool) -> Listing:
    listing, root = Listing(), folder.root
    for path in _visible_images(root):
        name = disk_name(root, path)
        inside(root, path, folder.where(name))
        if not captions:
            listing.files.append(Listed(name, path, ""))
            continue
        text_path = path.with_suffix(".txt")
        text_name = disk_name(root, text_path)
        if not text_path.is_file():
            listing.skipped.append(Skipped(name, f"no caption file {text_name}"))
            continue
        caption, problem = _caption_file(inside(root, text_path, folder.where(text_name)), text_name)
        if problem:
            listing.skipped.append(Skipped(name, problem))
        else:
            listing.files.append(Listed(name, path, caption))
    return listing


def _plain_images(folder: Folder, column: str, captions: bool) -> Listing:
    names = [(disk_name(folder.root, p), p) for p in _visible_images(folder.root)]
    return Listing([Listed(name, inside(folder.root, path, folder.where(name)), "") for name, path in names])


LAYOUTS: dict[str, Callable[[Folder, str, bool], Listing]] = {
    "imagefolder": _imagefolder, "captions": _captions, "images": _plain_images}


def list_dataset(layout: str, folder: Folder, column: str, captions: bool) -> Listing:
    """The layout's images in `folder` and what it skipped; `captions` says whether captions are needed
    (not where one prompt replaces them all)."""
    return LAYOUTS[layout](folder, column, captions)
