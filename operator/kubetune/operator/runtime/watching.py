"""Memory a reconcile pass reads instead of the API server: FineTuneJobs and their children.

Kopf watches each collection once (FineTuneJobs, and their children by the `kubetune.io/job-name` label) and its
handlers put every copy it sees here, the operator what its own writes returned. A store keeps the newest copy of each
object, so a pass never acts on a copy older than the previous pass's writes: a create is not repeated, a status
transition not reported twice. A delete leaves a tombstone, so no older copy (a write's response, a LIST begun before)
brings the object back; as Kopf never reports a delete its watch missed, a periodic relist `prune`s what is gone.
"""

from __future__ import annotations

import threading
from typing import Any

from kubetune.operator.naming import JOB_NAME_LABEL

TOMBSTONES = 10_000  # the newest deletes remembered per collection: enough for a relist period's worth

Key = tuple[str, str]  # (namespace, name)


def key_of(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def version_of(obj: dict[str, Any] | None) -> int:
    """resourceVersions are opaque in general; on etcd they are increasing integers, which is
    all that ordering our own write responses against watch events needs."""
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _job_label(obj: dict[str, Any] | None) -> str | None:
    return (((obj or {}).get("metadata") or {}).get("labels") or {}).get(JOB_NAME_LABEL)


class Store:
    """The newest copy of each object of one collection, and an index by job-name label."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[Key, dict[str, Any]] = {}
        self._by_job: dict[Key, set[str]] = {}
        self._gone: dict[Key, int] = {}  # tombstones: the resourceVersion each key was deleted at, oldest first

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get((namespace, name))

    def labelled(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        with self._lock:  # objects whose `kubetune.io/job-name` label is `job_name`
            return [self._objects[(namespace, n)] for n in self._by_job.get((namespace, job_name), ())]

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._objects.values())

    def put(self, obj: dict[str, Any]) -> bool:
        """Keep `obj` unless a newer copy is here or it was deleted at or after it; True when kept."""
        meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}  # never read
        obj, key, version = {**obj, "metadata": meta}, key_of(obj), version_of(obj)
        with self._lock:
            if version_of(self._objects.get(key)) > version or self._gone.get(key, -1) >= version:
                return False
            self._drop(key)
            self._gone.pop(key, None)
            self._objects[key] = obj
            if job := _job_label(obj):
                self._by_job.setdefault((key[0], job), set()).add(key[1])
        return True

    def remove(self, obj: dict[str, Any]) -> None:
        key = key_of(obj)
        with self._lock:
            if version_of(self._objects.get(key)) <= version_of(obj):
                self._drop(key, version_of(obj))

    def prune(self, namespace: str | None, listed: set[Key], version: int) -> list[dict[str, Any]]:
        """Drop what a LIST of `namespace` (None: all) at `version` no longer has; returns the dropped."""
        with self._lock:
            gone = [o for k, o in self._objects.items() if k not in listed and namespace in (None, k[0])
                    and version_of(o) <= version]
            for obj in gone:
                self._drop(key_of(obj), version)
        return gone

    def _drop(self, key: Key, deleted_at: int | None = None) -> None:
        """Forget `key`'s object; with `deleted_at`, as deleted at that version (its tombstone goes last)."""
        if (job := _job_label(self._objects.pop(key, None))) and (names := self._by_job.get((key[0], job))):
            names.discard(key[1])
            if not names:
                del self._by_job[(key[0], job)]
        if deleted_at is not None:
            self._gone[key] = max(deleted_at, self._gone.pop(key, -1))
            while len(self._gone) > TOMBSTONES:
                del self._gone[next(iter(self._gone))]


class Caches(dict[str, Store]):
    """One store per kind a pass reads."""

    def __init__(self) -> None:
        super().__init__({kind: Store() for kind in ("FineTuneJob", "Job", "Pod", "ConfigMap", "Service")})

    def put(self, obj: dict[str, Any] | None) -> None:
        """Remember what one of the operator's own writes returned."""
        if obj and obj.get("kind") in self:
            self[obj["kind"]].put(obj)

