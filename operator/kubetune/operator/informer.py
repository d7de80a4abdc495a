"""Watch-fed caches of FineTuneJobs and their children, so a reconcile pass reads memory.

Without them every pass made four GETs (Job, ConfigMap, Service, pods) and every child
event one more, so API load grew with jobs x passes. An `Informer` lists a collection
once, then follows its watch from that resourceVersion, and lists again when the watch
expires (410 Gone) or breaks; its `Store` keeps the newest copy of each object. The
operator also puts into the stores what its own writes returned, so a pass never acts on
a copy older than what the previous pass did: a create is not repeated, a status
transition is not reported twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from kubetune.operator.kube import ApiError, KubeApi, WatchStream
from kubetune.operator.naming import JOB_NAME_LABEL

LOG = logging.getLogger(__name__)
WATCH_SECONDS = 300
RETRY_SECONDS = 2.0

Key = tuple[str, str]
"""(namespace, name)"""


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


def newest(obj: dict[str, Any], other: dict[str, Any] | None) -> dict[str, Any]:
    """`other` when it is a newer copy of `obj`, else `obj`."""
    return other if other is not None and _version(other) > _version(obj) else obj


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
        """Objects whose `kubetune.io/job-name` label is `job_name`."""
        with self._lock:
            names = self._by_job.get((namespace, job_name), ())
            return [self._objects[(namespace, n)] for n in names]

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._objects.values())

    def put(self, obj: dict[str, Any]) -> bool:
        """Keep `obj` unless a newer copy is already here; True when it was kept."""
        (obj.get("metadata") or {}).pop("managedFields", None)  # never read, often half the object
        key = key_of(obj)
        with self._lock:
            if _version(self._objects.get(key)) > _version(obj):
                return False
            self._unindex(key)
            self._objects[key] = obj
            if job := _job_label(obj):
                self._by_job.setdefault((key[0], job), set()).add(key[1])
        return True

    def remove(self, obj: dict[str, Any]) -> None:
        key = key_of(obj)
        with self._lock:
            if _version(self._objects.get(key)) <= _version(obj):
                self._unindex(key)
                self._objects.pop(key, None)

    def replace(self, objs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """A fresh list: keep exactly `objs`; returns those that were gone since (now deleted)."""
        listed = {key_of(o): o for o in objs}
        with self._lock:
            gone = [o for k, o in self._objects.items() if k not in listed]
        for obj in gone:
            self.remove(obj)
        for obj in listed.values():
            self.put(obj)
        return gone

    def _unindex(self, key: Key) -> None:
        old = self._objects.get(key)
        if old is not None and (job := _job_label(old)):
            names = self._by_job.get((key[0], job))
            if names is not None:
                names.discard(key[1])
                if not names:
                    del self._by_job[(key[0], job)]


def _job_label(obj: dict[str, Any]) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(JOB_NAME_LABEL)


class Informer:
    """List, then watch, one collection into a `Store`; `on_change` hears of every change."""

    def __init__(self, api: KubeApi, path: str, store: Store, label_selector: str | None = None,
                 on_change: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.api, self.path, self.store = api, path, store
        self.label_selector = label_selector
        self.on_change = on_change or (lambda obj: None)
        self.synced = threading.Event()
        self._stream: WatchStream | None = None

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                version = self._list()
                self.synced.set()
                while version and not stop.is_set():
                    version = self._follow(version)
            except ApiError as exc:
                if not stop.is_set():
                    LOG.warning("watching %s: %s", self.path, exc)
                    stop.wait(RETRY_SECONDS)
            except Exception:  # a cache that silently stops following would freeze every pass
                if not stop.is_set():
                    LOG.exception("watching %s failed; listing again", self.path)
                    stop.wait(RETRY_SECONDS)

    def stop(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.close()

    def _list(self) -> str:
        query = {"labelSelector": self.label_selector} if self.label_selector else {}
        listed = self.api.get(self.path, **query)
        items = listed.get("items") or []
        for obj in items:  # items of built-in kinds come without these
            obj.setdefault("apiVersion", listed.get("apiVersion"))
            obj.setdefault("kind", str(listed.get("kind", "")).removesuffix("List"))
        for obj in self.store.replace(items):
            self.on_change(obj)
        for obj in items:
            self.on_change(obj)
        return listed["metadata"]["resourceVersion"]

    def _follow(self, version: str) -> str:
        """Apply watch events until the stream ends; the version to go on from ("" to list again)."""
        self._stream = self.api.watch(self.path, version, self.label_selector, WATCH_SECONDS)
        try:
            for event in self._stream:
                obj = event["object"]
                if event["type"] == "ERROR":  # 410 Gone: too old to resume; list again
                    LOG.info("watch of %s ended: %s", self.path, obj.get("message"))
                    return ""
                version = obj["metadata"]["resourceVersion"]
                if event["type"] == "DELETED":
                    self.store.remove(obj)
                    self.on_change(obj)
                elif event["type"] != "BOOKMARK" and self.store.put(obj):
                    self.on_change(obj)
        finally:
            self._stream = None
        return version


def start_informers(informers: list[Informer], stop: threading.Event) -> list[threading.Thread]:
    threads = []
    for informer in informers:
        thread = threading.Thread(target=informer.run, args=(stop,), name=f"kubetune-watch{informer.path}",
                                  daemon=True)
        thread.start()
        threads.append(thread)
    return threads
