"""Check a job's storage in seconds, before any large transfer: `preflight_inputs` then `preflight_output`.

A wrong data bucket found after a 10 GiB model has been staged, or a read-only output found
after the first hour of training, wastes the GPUs' time and hides the one-line fix. So before
anything is fetched: the model URI holds `model_index.json`, the data (and DreamBooth class
data) URIs list at least one object, and the output URI takes a small probe object, which is
then removed (checkpoint pruning needs deletes too). The two halves run on either side of the
output's ownership check (`ownership.claim_output`, read-only), so a job never writes its probe
into another job's prefix; `preflight` runs both. Each failure is one line naming the field,
the URI and the fix: a ConfigError (78) for what is wrong as written, StorageUnavailable (75)
for an endpoint that cannot be reached. hf:// models are left to staging, whose first request
(the repository's info) already fails in seconds, before any file is fetched.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from kubetune.api.resource import FineTuneJob
from kubetune.api.uris import parse_uri
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.storage.interface import ObjectStore, as_prefix, join_uri, write_text
from kubetune_trainer.storage.local import LocalStore, write_in_folder
from kubetune_trainer.storage.schemes import open_store

PROBE_PREFIX = ".kubetune-preflight-"
"""Name of the probe object written under the output prefix, and removed at once."""

Check = Callable[[ObjectStore, str, Path], None]


def _model_index(store: ObjectStore, uri: str, scratch: Path) -> None:
    """The model folder holds model_index.json (one LIST of that key, or a stat)."""
    index = join_uri(uri, "model_index.json")
    if isinstance(store, LocalStore):
        found = store.path_of(index).is_file()
    else:
        found = any(obj.relative == "" for obj in store.list(index, limit=1))
    if not found:
        raise ConfigError(f"no model_index.json under {as_prefix(uri)}: point model.uri at a diffusers folder "
                          "(the one holding model_index.json)")


def _lists(store: ObjectStore, uri: str, scratch: Path) -> None:
    """At least one object lies under the prefix (one LIST of one key)."""
    if isinstance(store, LocalStore) and not store.path_of(uri).is_dir():
        raise ConfigError(f"folder {store.path_of(uri)} does not exist: fix the URI (or mount the volume)")
    if not store.list(as_prefix(uri), limit=1):
        raise ConfigError(f"nothing to stage: no objects under {as_prefix(uri)}; upload the files there "
                          "or fix the URI")


def _writable(store: ObjectStore, uri: str, scratch: Path) -> None:
    """A probe object can be written under the prefix and removed again."""
    name = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    if isinstance(store, LocalStore):  # its delete prunes empty folders upwards, a mount point's parent too
        local = store.path_of(uri) / name
        write_in_folder(local, lambda: local.write_text("kubetune preflight\n", encoding="utf-8"))
        local.unlink()
        return
    probe = join_uri(uri, name)
    try:
        write_text(store, probe, "kubetune preflight: written and removed before staging\n", scratch)
        store.delete(probe)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; the output prefix must take writes and deletes (s3:PutObject, "
                          "s3:DeleteObject)") from exc


def checks(job: FineTuneJob) -> list[tuple[str, str, Check]]:
    """(field, URI, check) for each URI of the job, in the order they are checked."""
    spec = job.spec
    found: list[tuple[str, str, Check]] = [("model.uri", spec.model.uri, _model_index),
                                           ("data.uri", spec.data.uri, _lists)]
    dreambooth = spec.method.dreambooth
    if dreambooth is not None and dreambooth.prior_preservation and dreambooth.class_data_uri:
        found.append(("method.dreambooth.classDataUri", dreambooth.class_data_uri, _lists))
    found.append(("output.uri", spec.output.uri, _writable))
    return [(field, uri, check) for field, uri, check in found if parse_uri(uri).scheme != "hf"]


def preflight(job: FineTuneJob, runtime: RuntimeConfig) -> None:
    """Raise a ConfigError or StorageUnavailable naming the first URI of the job that cannot work."""
    _run(checks(job), job, runtime)


def preflight_inputs(job: FineTuneJob, runtime: RuntimeConfig) -> None:
    """The read-only checks: model and data URIs answer. Nothing is written."""
    _run([found for found in checks(job) if found[2] is not _writable], job, runtime)


def preflight_output(job: FineTuneJob, runtime: RuntimeConfig) -> None:
    """The output takes a probe's write and delete; run once the prefix is known to be this job's."""
    _run([found for found in checks(job) if found[2] is _writable], job, runtime)


def _run(found: list[tuple[str, str, Check]], job: FineTuneJob, runtime: RuntimeConfig) -> None:
    stores: dict[str, ObjectStore] = {}
    for field, uri, check in found:
        scheme = parse_uri(uri).scheme
        if scheme not in stores:
            stores[scheme] = open_store(uri, job.spec.storage, runtime.pvc_root)
        try:
            check(stores[scheme], uri, runtime.scratch / "tmp")
        except ConfigError as exc:
            raise ConfigError(f"{field} {uri}: {exc}") from exc
        except OSError as exc:  # a local folder that cannot be written
            raise ConfigError(f"{field} {uri}: {exc.strerror or exc}: fix the path or its permissions") from exc
