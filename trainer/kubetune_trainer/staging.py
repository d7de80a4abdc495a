"""Bring a model or dataset URI onto local disk before training: `stage_prefix()` and `stage()`.

S3 prefixes are listed page by page, fetched in parallel (one GET per small object, parallel
ranges for large ones), verified (size, and content against S3's stored CRC32 or a
single-part MD5 ETag, checked by the store as the bytes land), written under a temporary
name and renamed, and recorded by a per-file marker so that a re-run skips what is complete. Mounted and local URIs
are used in place; hf:// goes through huggingface_hub's own cache, fetching only the files
`model.variant` loads (`hub_files`), with the token in HF_TOKEN (`model.tokenSecretRef`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kubetune.api.spec import StorageSpec
from kubetune.api.uris import parse_uri
from kubetune_trainer.exitcodes import ConfigError, TrainerError
from kubetune_trainer.storage import LocalStore, ObjectInfo, ObjectStore, as_prefix, is_md5_etag, open_store

MARKER_DIR = ".kubetune-staged"


@dataclass(frozen=True)
class StagingReport:
    """What one staging pass did."""

    path: Path
    files: int = 0
    downloaded: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0


def safe_relative(relative: str, source: str) -> PurePosixPath:
    """`relative` as a path that stays inside the staging folder, or a ConfigError."""
    rel = PurePosixPath(relative)
    if relative.startswith("/") or rel.is_absolute() or any(p in ("..", "") for p in relative.split("/")):
        raise ConfigError(f"refusing to stage key {relative!r} from {source}: it would escape the "
                          "target folder (absolute path, '..' or empty component)")
    return rel


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


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, obj: ObjectInfo, checked_etag: str = "") -> None:
    """Raise unless `path` has `obj`'s size and content.

    `checked_etag` is the ETag of what the store fetched, having checked the bytes as they
    landed; it must be the listed one. Without it, a single-part object's MD5 is computed here.
    """
    size = path.stat().st_size
    if size != obj.size:
        raise TrainerError(f"{obj.uri}: downloaded {size} bytes, expected {obj.size}")
    if checked_etag:
        if obj.etag and checked_etag.lower() != obj.etag.lower():
            raise TrainerError(f"{obj.uri} was replaced after it was listed (ETag {obj.etag} listed, "
                               f"{checked_etag} fetched); run again")
        return
    if is_md5_etag(obj.etag) and _md5(path) != obj.etag.lower():
        raise TrainerError(f"{obj.uri}: MD5 does not match the ETag; the download is corrupt")


class Stager:
    """Fetches every object under a prefix into a folder; `on_download` sees each fetched file."""

    def __init__(self, store: ObjectStore, concurrency: int = 16,
                 on_download: Callable[[ObjectInfo], None] | None = None) -> None:
        self.store = store
        self.concurrency = concurrency
        self.on_download = on_download or (lambda obj: None)

    def stage_prefix(self, uri: str, dest: Path) -> StagingReport:
        started = time.monotonic()
        objects = [o for o in self.store.list(as_prefix(uri)) if o.relative and not o.relative.endswith("/")]
        if not objects:
            raise ConfigError(f"nothing to stage: no objects under {as_prefix(uri)}")
        plan = [(obj, safe_relative(obj.relative, uri)) for obj in objects]
        todo = [(obj, rel) for obj, rel in plan if not _is_staged(dest, obj, rel)]
        self._fetch_all(dest, todo)
        return StagingReport(dest, len(plan), len(todo), sum(o.size for o, _ in todo),
                             time.monotonic() - started)

    def _fetch_all(self, dest: Path, todo: list[tuple[ObjectInfo, PurePosixPath]]) -> None:
        """Fetch in parallel; on the first failure, cancel what has not started and re-raise."""
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="stage") as pool:
            futures = [pool.submit(self._fetch, dest, obj, rel) for obj, rel in todo]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _fetch(self, dest: Path, obj: ObjectInfo, rel: PurePosixPath) -> None:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part-{uuid.uuid4().hex[:8]}")
        try:
            verify(tmp, obj, self.store.download(obj.uri, tmp))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        marker = _marker(dest, rel)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"size": obj.size, "etag": obj.etag}), encoding="utf-8")
        self.on_download(obj)


def _stage_s3(uri: str, dest: Path, spec: StorageSpec, pvc_root: Path) -> StagingReport:
    stager = Stager(open_store(uri, spec), concurrency=spec.max_concurrency)
    return stager.stage_prefix(uri, dest)


def _stage_in_place(uri: str, dest: Path, spec: StorageSpec, pvc_root: Path) -> StagingReport:
    path = LocalStore(pvc_root).path_of(uri)
    if not path.is_dir():
        raise ConfigError(f"{uri}: folder {path} does not exist")
    return StagingReport(path)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
OTHER_FRAMEWORKS = (".msgpack", ".onnx", ".onnx_data", ".h5", ".pb", ".tflite")
"""Flax, ONNX and TensorFlow weights: the trainer loads PyTorch weights only."""
_WEIGHT = re.compile(r"^[^.]+(?:\.(?P<variant>[^.]+?))?(?:-\d+-of-\d+)?(?P<suffix>\.[a-z_]+)$")
_INDEX = re.compile(r"^[^.]+(?P<suffix>\.[a-z]+)\.index(?:\.(?P<variant>[^.]+))?\.json$")


def _weight_kind(path: str) -> tuple[str, str | None] | None:
    """(suffix, variant) of a weight or weight-index file, e.g. ('.safetensors', 'fp16'); None for other files."""
    name = path.rsplit("/", 1)[-1]
    found = _INDEX.match(name) or _WEIGHT.match(name)
    if found is None or found["suffix"] not in WEIGHT_SUFFIXES:
        return None
    return found["suffix"], found["variant"]


def hub_files(files: list[str], variant: str | None) -> list[str]:
    """The files of a diffusers repository that loading it with `variant` reads.

    Every non-weight file; per folder, the weights of `variant` (a folder without them keeps its
    plain weights, as diffusers falls back to them), safetensors over pickles where both exist;
    no single-file checkpoints beside model_index.json and no other frameworks' weights.
    """
    pipeline = "model_index.json" in files
    chosen, weights = [], {}
    for path in files:
        kind = _weight_kind(path)
        if path.endswith(OTHER_FRAMEWORKS) or (kind and pipeline and "/" not in path):
            continue
        if kind is None:
            chosen.append(path)
        else:
            weights.setdefault(path.rpartition("/")[0], []).append((path, *kind))
    for entries in weights.values():
        variants = {v for _, _, v in entries}
        wanted = variant if variant in variants else None
        kept = [(path, suffix) for path, suffix, v in entries if v == wanted]
        if any(suffix == ".safetensors" for _, suffix in kept):
            kept = [(path, suffix) for path, suffix in kept if suffix == ".safetensors"]
        chosen += [path for path, _ in kept]
    return sorted(chosen)


def _hub_access_error(uri: str, token: str | None) -> ConfigError:
    if token:
        return ConfigError(f"{uri}: the Hugging Face Hub refused the token from HF_TOKEN (model.tokenSecretRef): "
                           "it lacks access to this repository (accept its terms on the Hub, or use another token)")
    return ConfigError(f"{uri}: the Hugging Face Hub requires a token for this repository (gated or private): "
                       "set model.tokenSecretRef to a Secret key holding an access token (in local mode, "
                       "the HF_TOKEN environment variable)")


def _stage_hf(uri: str, dest: Path, spec: StorageSpec, pvc_root: Path, variant: str | None = None) -> StagingReport:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    started = time.monotonic()
    repo, _, revision = uri[len("hf://"):].strip("/").partition("@")
    token, endpoint = os.environ.get("HF_TOKEN") or None, os.environ.get("HF_ENDPOINT") or None
    try:
        try:
            info = HfApi(endpoint=endpoint, token=token).model_info(repo, revision=revision or None)
            files: list[str] | None = hub_files([sibling.rfilename for sibling in info.siblings or []], variant)
            revision = info.sha or revision
        except OfflineModeIsEnabled:  # HF_HUB_OFFLINE: what the cache holds
            files = None
        path = snapshot_download(repo_id=repo, revision=revision or None, endpoint=endpoint, token=token,
                                 allow_patterns=None if files is None else [glob.escape(name) for name in files],
                                 cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except (GatedRepoError, RepositoryNotFoundError) as exc:
        raise _hub_access_error(uri, token) from exc
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code in (401, 403):
            raise _hub_access_error(uri, token) from exc
        raise ConfigError(f"{uri}: cannot fetch from the Hugging Face Hub: {exc}".splitlines()[0]) from exc
    except (LocalEntryNotFoundError, OSError) as exc:
        raise ConfigError(f"{uri}: cannot fetch from the Hugging Face Hub: {exc}".splitlines()[0]) from exc
    return StagingReport(Path(path), len(files or []), seconds=time.monotonic() - started)


SOURCES = {"s3": _stage_s3, "hf": _stage_hf, "pvc": _stage_in_place, "file": _stage_in_place,
           "path": _stage_in_place}


def stage(uri: str, dest: Path, spec: StorageSpec, pvc_root: Path = Path("/mnt/pvc"),
          variant: str | None = None) -> StagingReport:
    """Make `uri` available as a local folder; the report's `path` is where it is.

    `variant` (`model.variant`) limits an hf:// download to the weights that variant loads.
    """
    scheme = parse_uri(uri).scheme
    if scheme not in SOURCES:
        raise ConfigError(f"{uri}: scheme {scheme}:// cannot be staged")
    if scheme == "hf":
        return _stage_hf(uri, dest, spec, pvc_root, variant)
    return SOURCES[scheme](uri, dest, spec, pvc_root)
