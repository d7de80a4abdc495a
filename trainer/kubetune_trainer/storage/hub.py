"""hf:// sources: a model repository fetched through huggingface_hub's own cache.

Only the files that loading the repository with `model.variant` reads are fetched
(`hub_files`); the token comes from HF_TOKEN (`model.tokenSecretRef`). A refused token or
a gated repository is a ConfigError saying what to set; rate limits, 5xx answers and
connection errors are StorageUnavailable, so a later attempt may pass.
"""

from __future__ import annotations

import glob
import os
import re
import time
from pathlib import Path

from kubetune_trainer.exitcodes import ConfigError, StorageUnavailable
from kubetune_trainer.storage.staging import StagingReport

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


def stage_hub(uri: str, variant: str | None = None) -> StagingReport:
    """Fetch the hf://repo[@revision] `uri` into the Hub's cache; the report's `path` is the snapshot."""
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
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise _hub_access_error(uri, token) from exc
        raise _hub_error(uri, exc, retryable=status is None or status in HUB_RETRYABLE or status >= 500) from exc
    except LocalEntryNotFoundError as exc:  # offline, or the Hub unreachable, and not in the cache
        raise _hub_error(uri, exc, retryable=not _hub_offline()) from exc
    except OSError as exc:  # requests' connection errors and timeouts are OSErrors too
        raise _hub_error(uri, exc, retryable=not isinstance(exc, (FileNotFoundError, PermissionError))) from exc
    return StagingReport(Path(path), len(files or []), seconds=time.monotonic() - started)


HUB_RETRYABLE = frozenset({408, 429})
"""Hub answers that pass: request timeout and rate limit (and every 5xx)."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def _hub_error(uri: str, exc: Exception, retryable: bool) -> ConfigError | StorageUnavailable:
    """One line for a failed Hub fetch: StorageUnavailable (75) for what a later attempt may pass
    (rate limits, 5xx, connection errors), ConfigError (78) for the rest (a missing revision or file)."""
    kind = StorageUnavailable if retryable else ConfigError
    return kind(f"{uri}: cannot fetch from the Hugging Face Hub: {exc}".splitlines()[0])
