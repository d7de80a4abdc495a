"""Resumable checkpoints under `<output.uri>/checkpoints/step-N/`, through the storage interface.

A checkpoint is its files plus `manifest.json`, uploaded last: a folder without a manifest
was interrupted and is ignored and cleaned. Which checkpoints to keep is decided by one pure
function, `checkpoints_to_delete()`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from kubetune.api.spec import OutputSpec
from kubetune_trainer.storage import ObjectInfo, ObjectStore, as_prefix, join_uri, read_text, write_text

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint, as reported in /progress and the job status."""

    step: int
    uri: str
    createdAt: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def checkpoints_to_delete(steps: list[int], keep: int) -> list[int]:
    """The steps of complete checkpoints to delete so that the newest `keep` remain."""
    ordered = sorted(set(steps))
    return ordered[: max(0, len(ordered) - keep)]


def _group_by_step(objects: list[ObjectInfo]) -> dict[int, list[ObjectInfo]]:
    groups: dict[int, list[ObjectInfo]] = {}
    for obj in objects:
        folder, _, _ = obj.relative.partition("/")
        match = _STEP_DIR.match(folder)
        if match:
            groups.setdefault(int(match.group(1)), []).append(obj)
    return groups


class Checkpointer:
    """Saves, finds, loads and prunes checkpoints for one output URI."""

    def __init__(self, store: ObjectStore, output: OutputSpec, scratch: Path) -> None:
        self.store, self.output, self.scratch = store, output, Path(scratch)
        self.root = join_uri(output.uri, "checkpoints")

    def due(self, step: int) -> bool:
        return step % self.output.checkpoint_every == 0

    def uri_of(self, step: int) -> str:
        return as_prefix(join_uri(self.root, f"step-{step}"))

    def _scan(self) -> tuple[dict[int, list[ObjectInfo]], set[int]]:
        groups = _group_by_step(self.store.list(as_prefix(self.root)))
        complete = {step for step, objs in groups.items() if any(o.relative.endswith("/" + MANIFEST)
                                                                 for o in objs)}
        return groups, complete

    def complete(self) -> list[CheckpointRef]:
        """Complete checkpoints, oldest first."""
        _, complete = self._scan()
        return [self._ref(step) for step in sorted(complete)]

    def _ref(self, step: int) -> CheckpointRef:
        manifest = json.loads(read_text(self.store, self.uri_of(step) + MANIFEST, self.scratch))
        return CheckpointRef(step, self.uri_of(step), manifest.get("createdAt", ""))

    def check_writable(self) -> None:
        """Write and delete a tiny object, so that an unwritable output fails before training, not after."""
        probe = join_uri(self.root, ".write-probe")
        write_text(self.store, probe, "kubetune", self.scratch)
        self.store.delete(probe)

    def clean_incomplete(self) -> list[int]:
        """Delete folders that never got a manifest (an upload cut short); return their steps."""
        groups, complete = self._scan()
        broken = sorted(set(groups) - complete)
        for step in broken:
            for obj in groups[step]:
                self.store.delete(obj.uri)
        return broken

    def save(self, step: int, files: dict[str, Path]) -> tuple[CheckpointRef, float]:
        """Upload `files` then the manifest; prune old ones. Returns the ref and upload seconds."""
        started = time.monotonic()
        prefix = self.uri_of(step)
        for name, path in files.items():
            self.store.upload(path, prefix + name)
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        manifest = {"step": step, "createdAt": created,
                    "files": {name: path.stat().st_size for name, path in files.items()}}
        write_text(self.store, prefix + MANIFEST, json.dumps(manifest), self.scratch)
        seconds = time.monotonic() - started
        self.prune()
        return CheckpointRef(step, prefix, created), seconds

    def prune(self) -> None:
        groups, complete = self._scan()
        for step in checkpoints_to_delete(sorted(complete), self.output.keep_checkpoints):
            for obj in sorted(groups[step], key=lambda o: o.relative.endswith(MANIFEST), reverse=True):
                self.store.delete(obj.uri)

    def load(self, ref: CheckpointRef, dest: Path) -> dict[str, Path]:
        """Download a checkpoint's files into `dest`."""
        manifest = json.loads(read_text(self.store, ref.uri + MANIFEST, self.scratch))
        dest.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in manifest["files"]:
            paths[name] = dest / name
            self.store.download(ref.uri + name, paths[name])
        return paths
