"""Memory a reconcile pass reads instead of the API server: FineTuneJobs and their children.

Kopf watches each collection once (FineTuneJobs, and Jobs, Pods, ConfigMaps and Services by
the `kubetune.io/job-name` label every child carries) and its handlers put every copy it sees
here (`handlers`). The operator also puts what its own writes returned, and a store keeps the
newest copy of each object, so a pass never acts on a copy older than what the previous pass
wrote: a create is not repeated, a status transition is not reported twice.
"""

from __future__ import annotations

import threading
from typing import Any

from kubetune.operator.naming import JOB_NAME_LABEL

CHILD_KINDS = ("Job", "Pod", "ConfigMap", "Service")

Key = tuple[str, str]  # (namespace, name)


def key_of(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def _version(obj: dict[str, Any] | None) -> int:
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
        """Keep `obj` unless a newer copy is already here; True when it was kept."""
        meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}  # never read
        obj, key = {**obj, "metadata": meta}, key_of(obj)
        with self._lock:
            if _version(self._objects.get(key)) > _version(obj):
                return False
            self._drop(key)
            self._objects[key] = obj
            if job := _job_label(obj):
                self._by_job.setdefault((key[0], job), set()).add(key[1])
        return True

    def remove(self, obj: dict[str, Any]) -> None:
        key = key_of(obj)
        with self._lock:
            if _version(self._objects.get(key)) <= _version(obj):
                self._drop(key)

    def _drop(self, key: Key) -> None:
        if (job := _job_label(self._objects.pop(key, None))) and (names := self._by_job.get((key[0], job))):
            names.discard(key[1])
            if not names:
                del self._by_job[(key[0], job)]


class Caches(dict[str, Store]):
    """One store per kind a pass reads."""

    def __init__(self) -> None:
        super().__init__({kind: Store() for kind in ("FineTuneJob", *CHILD_KINDS)})

    def put(self, obj: dict[str, Any] | None) -> None:
        """Remember what one of the operator's own writes returned."""
        if obj and obj.get("kind") in self:
            self[obj["kind"]].put(obj)

