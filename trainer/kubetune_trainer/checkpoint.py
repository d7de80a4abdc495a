"""Resumable checkpoints under `<output.uri>/checkpoints/step-N/`, through the storage interface.

A checkpoint is its files plus `manifest.json`, uploaded last: a folder without a manifest
was interrupted and is ignored and cleaned. The manifest records the job that wrote it
(`owner`, see `ownership`) and each file's size and sha256, hashed while the file uploads.
Loading checks both, so a damaged checkpoint (a listed file missing, truncated or altered, a
manifest that is not UTF-8 JSON describing safe file names) raises `CheckpointDamaged` and the
trainer falls back to an older one. A file whose sha256 verified is what was saved: if it then
fails to load, that is the trainer's problem, not damage (see `checkpoint_state`). What the files hold
(the trained weights and the registered stateful parts) is `checkpoint_state`'s.

A damaged checkpoint is never reported as complete and never counts toward `keepCheckpoints`;
its folder is left as found (for inspection) until pruning passes it (it is older than the
oldest checkpoint kept) or the run saves that step again, which replaces it. A pinned
checkpoint (the best validation step's, see `Trainer.export`) is kept beside the newest
`keepCheckpoints` and does not count toward them. Which checkpoints to delete is decided by
one pure function, `checkpoints_to_delete()`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.identity import JobIdentity
from kubetune.api.spec import OutputSpec
from kubetune.api.status import CheckpointRef
from kubetune_trainer.checkpoint_state import CheckpointDamaged, TrainingState, load_files, write_files
from kubetune_trainer.exitcodes import ConfigError, TrainerError
from kubetune_trainer.parts import Stateful
from kubetune_trainer.sharding import SHARD_INDEX, is_shard_file
from kubetune_trainer.storage.interface import (
    ObjectInfo,
    ObjectStore,
    as_prefix,
    download_whole,
    join_uri,
    read_text,
    write_text,
)

if TYPE_CHECKING:
    from kubetune_trainer.ownership import OutputClaim

MANIFEST = "manifest.json"
FETCH_OUTCOME = ".fetched.json"
"""In a download shared by a pod's ranks: what its first rank found (see `Checkpointer.fetch_shared`)."""
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_HASH_BLOCK = 4 << 20


@dataclass(frozen=True)
class FileEntry:
    """One file a manifest lists; `sha256` is None in manifests written before digests were recorded."""

    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` says: the only description of a checkpoint that loading trusts."""

    step: int
    created_at: str
    files: dict[str, FileEntry]
    owner: JobIdentity | None = None

    @classmethod
    def read(cls, store: ObjectStore, uri: str, scratch: Path) -> Manifest:
        """The manifest at `uri`; `CheckpointDamaged` when it is not one (bytes that are not UTF-8 included);
        `FileNotFoundError` when it is gone."""
        try:
            text = read_text(store, uri, scratch)
        except UnicodeDecodeError as exc:
            raise CheckpointDamaged(f"its {MANIFEST} is unreadable (not UTF-8 text)") from exc
        return cls.parse(text)

    @classmethod
    def parse(cls, text: str) -> Manifest:
        """The manifest in `text`; `CheckpointDamaged` when it is not one (truncated, garbage, unsafe names)."""
        try:
            raw = json.loads(text)
            files = {str(name): _entry(value) for name, value in dict(raw["files"]).items()}
            manifest = cls(int(raw["step"]), str(raw.get("createdAt", "")), files,
                           JobIdentity.from_dict(raw.get("owner")))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
            raise CheckpointDamaged(f"its {MANIFEST} is unreadable ({type(exc).__name__})") from exc
        unsafe = [name for name in files if not _FILE_NAME.match(name) or name == MANIFEST]
        if unsafe or not files:
            raise CheckpointDamaged(f"its {MANIFEST} lists {'unsafe names ' + str(unsafe) if unsafe else 'no files'}")
        return manifest

    def text(self) -> str:
        doc: dict[str, Any] = {"step": self.step, "createdAt": self.created_at,
                               "files": {name: asdict(entry) for name, entry in self.files.items()}}
        if self.owner is not None:
            doc["owner"] = self.owner.as_dict()
        return json.dumps(doc)


def _entry(value: Any) -> FileEntry:
    """A file's entry: `{"size", "sha256"}`, or a bare size in manifests written before digests."""
    if isinstance(value, dict):
        digest = value.get("sha256")
        return FileEntry(int(value["size"]), str(digest) if digest else None)
    if isinstance(value, bool):
        raise TypeError("a size, not a boolean")
    return FileEntry(int(value))


def file_sha256(path: Path) -> str:
    """hashlib releases the GIL on large blocks, so this runs beside an upload or download."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as source:
        for block in iter(lambda: source.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoints_to_delete(steps: list[int], keep: int, damaged: Iterable[int] = (),
                          pinned: Iterable[int] = ()) -> list[int]:
    """The steps to delete so that the newest `keep` good checkpoints remain, and every pinned one.

    Damaged checkpoints never count toward `keep` (so they cannot push out the last good one);
    they go once they are older than the oldest good checkpoint kept in rotation. A pinned good
    checkpoint (the best one, exported at the end) is out of rotation: never deleted, never counted,
    so it neither pushes out a newer one nor keeps an older damaged folder alive. Pinning protects
    good checkpoints only: a damaged pinned step is treated as damaged.
    """
    bad, held = set(damaged), set(pinned)
    rotating = sorted(set(steps) - bad - held)
    dropped, kept = rotating[: max(0, len(rotating) - keep)], rotating[max(0, len(rotating) - keep):]
    stale = [step for step in bad if kept and step < kept[0]]
    return sorted(dropped + stale)


@dataclass
class _Scan:
    """The checkpoint folders under the root, by step, and what their manifests say."""

    objects: dict[int, list[ObjectInfo]] = field(default_factory=dict)
    manifests: dict[int, Manifest] = field(default_factory=dict)
    unreadable: dict[int, str] = field(default_factory=dict)


def _group_by_step(objects: list[ObjectInfo]) -> dict[int, list[ObjectInfo]]:
    groups: dict[int, list[ObjectInfo]] = {}
    for obj in objects:
        folder, _, _ = obj.relative.partition("/")
        match = _STEP_DIR.match(folder)
        if match:
            groups.setdefault(int(match.group(1)), []).append(obj)
    return groups


class Checkpointer:
    """Saves, finds, verifies, loads and prunes checkpoints for one output URI.

    With a `claim`, manifests record its identity, and checkpoints another identity wrote are
    never listed, loaded, pruned or overwritten.
    """

    def __init__(self, store: ObjectStore, output: OutputSpec, scratch: Path,
                 claim: OutputClaim | None = None) -> None:
        self.store, self.output, self.scratch, self.claim = store, output, Path(scratch), claim
        self.root = join_uri(output.uri, "checkpoints")
        self.owner = claim.identity if claim is not None else None
        self.damaged: dict[int, str] = {}
        """Steps found damaged in this run, with why; neither complete nor counted."""
        self.pinned: frozenset[int] = frozenset()
        """Steps kept out of rotation (the best validation step's): `prune` never deletes them."""
        self.state = TrainingState()
        """The parts whose state every checkpoint saves beside the weights (optimizer, data position, ...)."""

    def register(self, name: str, part: Stateful, required: bool = True) -> None:
        """Save `part`'s state in every checkpoint under `name`; an optional part restores from `{}` when a
        checkpoint predates it."""
        self.state.register(name, part, required)

    def save_training(self, step: int, weights: dict[str, Any],
                      shards: dict[str, FileEntry] | None = None) -> tuple[CheckpointRef, float]:
        """Checkpoint `step`: the trained `weights` and every registered part's state (see `save`), with the
        `shards` other ranks uploaded already (after `begin`) listed in the same manifest."""
        folder = self.scratch / "checkpoint-out" / f"step-{step}"
        try:
            return self.save(step, write_files(folder, weights, self.state.state_dict(step)), shards,
                             begun=shards is not None)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def read_training(self, ref: CheckpointRef, shapes: dict[str, tuple[int, ...]],
                      read_shards: Callable[[dict[str, Path]], dict[str, Any]] | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A checkpoint's weights and state, verified and loaded but not yet applied: `CheckpointDamaged` if any
        of it is unusable, so a damaged checkpoint changes nothing. With `read_shards`, the weights are what it
        reads from the checkpoint's shard files instead. Its download is removed either way (everything is in
        memory by then), so skipped checkpoints do not fill the scratch volume."""
        folder = self.scratch / "resume" / f"step-{ref.step}"
        try:
            files, verified = self.load_verified(ref, folder)
            return self.open_training(ref, files, verified, shapes, read_shards)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def fetch_shared(self, ref: CheckpointRef, dest: Path, first: bool) -> tuple[dict[str, Path], frozenset[str]]:
        """A download the ranks of one pod share in `dest`. The `first` rank fetches and verifies it and records
        the outcome there (`FETCH_OUTCOME`), written only once every file verified or the fetch failed; the
        others, called after it, read that record and never download: they get the same files, or raise what
        it raised (`CheckpointDamaged` with its reason, any other failure as a `TrainerError`)."""
        record = dest / FETCH_OUTCOME
        if first:
            dest.mkdir(parents=True, exist_ok=True)  # the record is written even when the manifest fails early
            record.unlink(missing_ok=True)
            try:
                files, verified = self.load_verified(ref, dest)
            except CheckpointDamaged as exc:
                record.write_text(json.dumps({"damaged": str(exc)}))
                raise
            except Exception as exc:
                record.write_text(json.dumps({"failed": f"{type(exc).__name__}: {exc}"}))
                raise
            record.write_text(json.dumps({"files": sorted(files), "verified": sorted(verified)}))
            return files, verified
        try:
            outcome = json.loads(record.read_text())
        except (OSError, ValueError) as exc:
            raise TrainerError(f"checkpoint {ref.uri}: this pod's first rank left no record of its download "
                               f"({type(exc).__name__})") from exc
        if "damaged" in outcome:
            raise CheckpointDamaged(outcome["damaged"])
        if "failed" in outcome:
            raise TrainerError(f"checkpoint {ref.uri}: this pod's first rank could not fetch it: {outcome['failed']}")
        return {name: dest / name for name in outcome["files"]}, frozenset(outcome["verified"])

    def open_training(self, ref: CheckpointRef, files: dict[str, Path], verified: frozenset[str],
                      shapes: dict[str, tuple[int, ...]],
                      read_shards: Callable[[dict[str, Path]], dict[str, Any]] | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
        """`read_training` on files already downloaded and verified (`load_verified`), e.g. by another rank of
        this pod; with `read_shards` a collective (every rank reads its slices from the shard files)."""
        if read_shards is not None and SHARD_INDEX not in files:
            raise ConfigError(f"checkpoint {ref.uri} was written with training.parallelism ddp and this job runs "
                              "fsdp: resume with the parallelism that wrote it")
        weights, state = load_files(ref, files, verified, shapes, self.state.required())
        if read_shards is not None:
            weights = read_shards({name: path for name, path in files.items() if is_shard_file(name)})
        return weights, state

    def restore(self, state: dict[str, Any], only: tuple[str, ...] | None = None) -> int:
        """Load the registered parts (or those named in `only`) from a checkpoint's state; returns its step."""
        return self.state.load_state_dict(state, only)

    def pin(self, *steps: int) -> None:
        """Keep these steps' checkpoints out of rotation from the next prune on; steps pinned before are released."""
        self.pinned = frozenset(steps)

    def due(self, step: int) -> bool:
        return step % self.output.checkpoint_every == 0

    def uri_of(self, step: int) -> str:
        return as_prefix(join_uri(self.root, f"step-{step}"))

    def _scan(self) -> _Scan:
        scan = _Scan(_group_by_step(self.store.list(as_prefix(self.root))))
        for step, objs in scan.objects.items():
            if not any(o.relative == f"step-{step}/{MANIFEST}" for o in objs):
                continue
            try:
                scan.manifests[step] = Manifest.read(self.store, self.uri_of(step) + MANIFEST, self.scratch)
            except CheckpointDamaged as exc:
                scan.unreadable[step] = str(exc)
            except FileNotFoundError:
                continue  # deleted since the listing: a prune in another process
        return scan

    def _mine(self, manifest: Manifest) -> bool:
        """Written by this job, or before owners were recorded (adopted with the prefix, see `ownership`)."""
        return manifest.owner is None or self.owner is None or manifest.owner == self.owner

    def _good(self, scan: _Scan) -> list[int]:
        return sorted(step for step, m in scan.manifests.items() if self._mine(m) and step not in self.damaged)

    def complete(self) -> list[CheckpointRef]:
        """Complete checkpoints not known to be damaged, oldest first; unreadable manifests are noted as damaged."""
        scan = self._scan()
        self.damaged.update(scan.unreadable)
        return [CheckpointRef(step=step, uri=self.uri_of(step), created_at=scan.manifests[step].created_at)
                for step in self._good(scan)]

    def check_writable(self) -> None:
        """Record this job as the prefix's owner (the run's first lasting write; another job's prefix stops
        here, unwritten), then write and delete a tiny object, so that an output that refuses writes or
        deletes fails before training, not after. The record is written first so that the probe's delete,
        which on a local store removes folders it leaves empty, never empties the output root."""
        self.confirm_owner()
        probe = join_uri(self.root, ".write-probe")
        write_text(self.store, probe, "kubetune", self.scratch)
        self.store.delete(probe)

    def confirm_owner(self) -> None:
        """Before each lasting write (checkpoint, final outputs): the prefix's owner record names this job,
        written now if absent; `ConfigError` naming the owner if it names another."""
        if self.claim is not None:
            self.claim.confirm()

    def clean_incomplete(self) -> list[int]:
        """Delete folders that never got a manifest (an upload cut short); return their steps."""
        scan = self._scan()
        broken = sorted(set(scan.objects) - set(scan.manifests) - set(scan.unreadable))
        for step in broken:
            self._delete(scan.objects[step])
        return broken

    def begin(self, step: int) -> None:
        """Make way for checkpoint `step` (rank 0, before any rank uploads to it): this job still owns the
        prefix, and a damaged or stale folder of this step is deleted, to be replaced."""
        self.confirm_owner()
        scan = self._scan()
        self._refuse_foreign(scan)
        self._delete(scan.objects.get(step, []))
        self.damaged.pop(step, None)

    def upload_files(self, step: int, files: dict[str, Path]) -> dict[str, FileEntry]:
        """Upload `files` into checkpoint `step` (any rank, after `begin`); their manifest entries."""
        return self._upload(self.uri_of(step), files)

    def save(self, step: int, files: dict[str, Path], shards: dict[str, FileEntry] | None = None,
             begun: bool = False) -> tuple[CheckpointRef, float]:
        """Upload `files` (hashed as they upload) then the manifest, which also lists the `shards` other ranks
        uploaded; prune old ones. Returns the ref and seconds."""
        started = time.monotonic()
        if not begun:
            self.begin(step)
        prefix = self.uri_of(step)
        entries = {**(shards or {}), **self._upload(prefix, files)}
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        write_text(self.store, prefix + MANIFEST, Manifest(step, created, entries, self.owner).text(), self.scratch)
        seconds = time.monotonic() - started
        self.prune()
        return CheckpointRef(step=step, uri=prefix, created_at=created), seconds

    def _upload(self, prefix: str, files: dict[str, Path]) -> dict[str, FileEntry]:
        """Each file's upload with its sha256 computed beside it, on another thread, from the same page cache."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-sha256") as hasher:
            digests = {name: hasher.submit(file_sha256, path) for name, path in files.items()}
            for name, path in files.items():
                self.store.upload(path, prefix + name)
            return {name: FileEntry(path.stat().st_size, digests[name].result()) for name, path in files.items()}

    def _refuse_foreign(self, scan: _Scan) -> None:
        """Another identity's manifest here means another job writes to this prefix now: stop before overwriting."""
        foreign = [m.owner for m in scan.manifests.values() if m.owner is not None and not self._mine(m)]
        if foreign and self.claim is not None:
            raise self.claim.refuse(foreign[0])

    def _delete(self, objects: list[ObjectInfo]) -> None:
        """Manifest first, so that a delete cut short leaves an incomplete folder, not a damaged one."""
        for obj in sorted(objects, key=lambda o: o.relative.endswith("/" + MANIFEST), reverse=True):
            self.store.delete(obj.uri)

    def prune(self) -> None:
        scan = self._scan()
        self.damaged.update(scan.unreadable)
        good = self._good(scan)
        bad = [step for step in self.damaged if step in scan.objects]
        for step in checkpoints_to_delete(good, self.output.keep_checkpoints, bad, self.pinned):
            self._delete(scan.objects[step])
            self.damaged.pop(step, None)

    def load(self, ref: CheckpointRef, dest: Path) -> dict[str, Path]:
        """Download a checkpoint's files into `dest`, each checked against its manifest's size and sha256.

        Raises `CheckpointDamaged` saying what is wrong; storage errors propagate (they are retryable).
        """
        return self.load_verified(ref, dest)[0]

    def load_verified(self, ref: CheckpointRef, dest: Path) -> tuple[dict[str, Path], frozenset[str]]:
        """`load`, plus the names whose bytes matched a sha256 in the manifest: such a file is exactly what
        was saved, so failing to load it later is not damage (see `checkpoint_state.load_files`)."""
        try:
            manifest = Manifest.read(self.store, ref.uri + MANIFEST, self.scratch)
        except FileNotFoundError as exc:
            raise CheckpointDamaged(f"its {MANIFEST} is gone") from exc
        if not self._mine(manifest):
            raise CheckpointDamaged(f"it belongs to {manifest.owner}")
        stored = {obj.relative: obj for obj in self.store.list(ref.uri)}
        for name, entry in manifest.files.items():
            if name not in stored:
                raise CheckpointDamaged(f"{name} is listed in its {MANIFEST} but missing")
            if stored[name].size != entry.size:
                raise CheckpointDamaged(f"{name} is {stored[name].size} bytes, its {MANIFEST} says {entry.size}")
        dest.mkdir(parents=True, exist_ok=True)
        paths = {name: dest / name for name in manifest.files}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-sha256") as hasher:
            digests: dict[str, Future[str]] = {}
            for name, path in paths.items():
                try:
                    download_whole(self.store, ref.uri + name, path)
                except FileNotFoundError as exc:
                    raise CheckpointDamaged(f"{name} is listed in its {MANIFEST} but missing") from exc
                if path.stat().st_size != manifest.files[name].size:
                    raise CheckpointDamaged(f"{name} changed while it was downloaded")
                if manifest.files[name].sha256:
                    digests[name] = hasher.submit(file_sha256, path)
            for name, digest in digests.items():
                if digest.result() != manifest.files[name].sha256:
                    raise CheckpointDamaged(f"{name} does not match the sha256 in its {MANIFEST}")
        return paths, frozenset(digests)
