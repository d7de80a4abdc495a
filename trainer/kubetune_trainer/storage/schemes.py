"""The one table of URI schemes: which backend reads and writes each, and how each is staged.

`open_store(uri)` gives the `ObjectStore` behind a URI (checkpoints, outputs, ownership,
cache mirrors); `stage(uri, dest)` makes a model or dataset URI a local folder before
training. Both read `SCHEMES`, so a new scheme is one entry here: a factory for its store
(None where objects cannot be written one by one, as on the Hub) and its way of staging
(copied object by object, used in place, or fetched by a library of its own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.spec import StorageSpec
from kubetune.api.uris import parse_uri
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.storage.hub import stage_hub
from kubetune_trainer.storage.interface import ObjectStore
from kubetune_trainer.storage.local import PVC_ROOT, LocalStore
from kubetune_trainer.storage.s3 import S3Store
from kubetune_trainer.storage.staging import Stager, StagingReport

StoreFactory = Callable[[StorageSpec, Path], ObjectStore]
"""Opens a scheme's store from `spec.storage` and the PVC mount root."""
StageSource = Callable[[str, Path, StorageSpec, Path, str | None], StagingReport]
"""Makes (uri, dest, spec.storage, PVC mount root, model.variant) a local folder."""


@dataclass(frozen=True)
class Scheme:
    """What one URI scheme supports: `store` opens its object store (None: nothing can be read or
    written there object by object), `stage` makes one of its URIs a local folder."""

    store: StoreFactory | None
    stage: StageSource


def _s3_store(spec: StorageSpec, pvc_root: Path) -> ObjectStore:
    return S3Store(spec)


def _local_store(spec: StorageSpec, pvc_root: Path) -> ObjectStore:
    return LocalStore(pvc_root)


def _copy(uri: str, dest: Path, spec: StorageSpec, pvc_root: Path, variant: str | None) -> StagingReport:
    """Every object under `uri` copied into `dest`."""
    stager = Stager(open_store(uri, spec, pvc_root), concurrency=spec.max_concurrency)
    return stager.stage_prefix(uri, dest)


def _in_place(uri: str, dest: Path, spec: StorageSpec, pvc_root: Path, variant: str | None) -> StagingReport:
    """A mounted or local folder, used where it is."""
    path = LocalStore(pvc_root).path_of(uri)
    if not path.is_dir():
        raise ConfigError(f"{uri}: folder {path} does not exist")
    return StagingReport(path)


def _hub(uri: str, dest: Path, spec: StorageSpec, pvc_root: Path, variant: str | None) -> StagingReport:
    """The files `variant` loads, in huggingface_hub's own cache."""
    return stage_hub(uri, variant)


_LOCAL = Scheme(store=_local_store, stage=_in_place)

SCHEMES: dict[str, Scheme] = {
    "s3": Scheme(store=_s3_store, stage=_copy),
    "pvc": _LOCAL,
    "file": _LOCAL,
    "path": _LOCAL,
    "hf": Scheme(store=None, stage=_hub),
}


def open_store(uri: str, spec: StorageSpec, pvc_root: Path = PVC_ROOT) -> ObjectStore:
    """The backend for `uri`'s scheme, configured from `spec.storage`."""
    scheme = parse_uri(uri).scheme
    entry = SCHEMES.get(scheme)
    if entry is None or entry.store is None:
        raise ConfigError(f"{uri}: scheme {scheme}:// cannot be read or written here")
    return entry.store(spec, pvc_root)


def stage(uri: str, dest: Path, spec: StorageSpec, pvc_root: Path = PVC_ROOT,
          variant: str | None = None) -> StagingReport:
    """Make `uri` available as a local folder; the report's `path` is where it is.

    `variant` (`model.variant`) limits an hf:// download to the weights that variant loads.
    """
    scheme = parse_uri(uri).scheme
    entry = SCHEMES.get(scheme)
    if entry is None:
        raise ConfigError(f"{uri}: scheme {scheme}:// cannot be staged")
    return entry.stage(uri, dest, spec, pvc_root, variant)
