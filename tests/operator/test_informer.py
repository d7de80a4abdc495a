"""The operator's caches and work queue, without a server: newest copy wins, bursts coalesce."""

from __future__ import annotations

import threading
from typing import Any

import kopf

from kubetune.operator.caches import Caches
from kubetune.operator.informer import Informer, Store, newest
from kubetune.operator.kube import ApiError
from kubetune.operator.workqueue import WorkQueue


def obj(name: str, version: int, job: str | None = None, kind: str = "Pod", ns: str = "team-a") -> dict[str, Any]:
    labels = {"kubetune.io/job-name": job} if job else {}
    return {"kind": kind, "metadata": {"name": name, "namespace": ns, "resourceVersion": str(version),
                                       "labels": labels, "managedFields": [{"manager": "kubelet"}]}}


def test_store_keeps_the_newest_copy_and_indexes_by_job_label() -> None:
    store = Store()
    assert store.put(obj("p", 5, job="corgi"))
    assert not store.put(obj("p", 4, job="corgi")), "a stale watch event never replaces our own newer write"
    assert store.get("team-a", "p")["metadata"]["resourceVersion"] == "5"
    assert "managedFields" not in store.get("team-a", "p")["metadata"]
    assert [o["metadata"]["name"] for o in store.labelled("team-a", "corgi")] == ["p"]
    store.put(obj("p", 6, job="husky"))
    assert store.labelled("team-a", "corgi") == [] and len(store.labelled("team-a", "husky")) == 1
    store.remove(obj("p", 5))
    assert store.get("team-a", "p") is not None, "a delete older than the copy held is ignored"
    store.remove(obj("p", 7))
    assert store.get("team-a", "p") is None and store.labelled("team-a", "husky") == []


def test_store_replace_drops_what_a_new_list_no_longer_has() -> None:
    store = Store()
    store.put(obj("a", 1))
    store.put(obj("b", 1))
    gone = store.replace([obj("b", 2), obj("c", 2)])
    assert [o["metadata"]["name"] for o in gone] == ["a"]
    assert sorted(o["metadata"]["name"] for o in store.items()) == ["b", "c"]


def test_newest_prefers_the_higher_resource_version() -> None:
    assert newest(obj("x", 3), obj("x", 4))["metadata"]["resourceVersion"] == "4"
    assert newest(obj("x", 3), obj("x", 2))["metadata"]["resourceVersion"] == "3"
    assert newest(obj("x", 3), None)["metadata"]["resourceVersion"] == "3"


def test_caches_remember_write_responses_by_kind() -> None:
    caches = Caches()
    caches.put(obj("corgi", 9, kind="Job"))
    caches.put(None)
    assert caches["Job"].get("team-a", "corgi") is not None and caches["Pod"].items() == []


class _Stream:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    def __iter__(self) -> Any:
        return iter(self.events)

    def close(self) -> None:
        pass


class _Api:
    """Answers one informer: a list per call, then the scripted watches; stops it when out of script."""

    def __init__(self, lists: list[tuple[str, list[dict[str, Any]]]], watches: list[Any],
                 stop: threading.Event) -> None:
        self.lists, self.watches, self.stop = lists, watches, stop
        self.watched_from: list[str] = []

    def get(self, path: str, **query: str) -> dict[str, Any]:
        version, items = self.lists.pop(0)
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": version},
                "items": [{k: v for k, v in o.items() if k != "kind"} for o in items]}

    def watch(self, path: str, version: str, label_selector: str | None, timeout: int) -> _Stream:
        self.watched_from.append(version)
        if not self.watches:
            self.stop.set()
            raise ApiError(0, "Unreachable", "end of script")
        script = self.watches.pop(0)
        if isinstance(script, Exception):
            raise script
        return _Stream(script)


def test_informer_lists_follows_the_watch_and_lists_again_after_410() -> None:
    stop = threading.Event()
    changed: list[tuple[str, str]] = []
    watch = [{"type": "ADDED", "object": obj("b", 21, job="corgi")},
             {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "25"}}},
             {"type": "DELETED", "object": obj("a", 26, job="corgi")},
             {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}]
    api = _Api([("10", [obj("a", 10, job="corgi")]), ("30", [obj("b", 30, job="corgi")])], [watch], stop)
    store = Store()
    informer = Informer(api, "/api/v1/pods", store,  # type: ignore[arg-type]
                        on_change=lambda o: changed.append((o["metadata"]["name"], o["metadata"]["resourceVersion"])))
    informer.run(stop)
    assert informer.synced.is_set()
    assert api.watched_from == ["10", "30"], "after 410 Gone it lists again and watches from the new list"
    assert changed == [("a", "10"), ("b", "21"), ("a", "26"), ("b", "30")]
    assert [o["metadata"]["name"] for o in store.items()] == ["b"]
    assert store.get("team-a", "b")["kind"] == "Pod", "list items get the kind their list names"


def test_queue_coalesces_a_burst_and_requeues_a_key_changed_while_its_pass_ran() -> None:
    queue = WorkQueue()
    for key in ("a", "b", "a", "a"):
        queue.add(key)
    assert len(queue) == 2
    assert queue.get(timeout=0) == "a"
    queue.add("a")  # changed while its pass runs: one more pass, but not alongside this one
    assert queue.get(timeout=0) == "b"
    assert queue.get(timeout=0) is None
    queue.done("a")
    assert queue.get(timeout=0) == "a"


def test_queue_holds_a_retry_until_its_delay_has_passed() -> None:
    now = [100.0]
    queue = WorkQueue(clock=lambda: now[0])
    queue.add_after("a", 10)
    assert queue.get(timeout=0) is None
    now[0] = 110.0
    assert queue.get(timeout=0) == "a"
    queue.close()
    assert queue.get() is None


def test_kopf_bookkeeping_lives_in_memory_and_writes_only_a_retry_touch() -> None:
    from kubetune.operator.bookkeeping import TOUCH_ANNOTATION, MemoryDiffBaseStorage, MemoryProgressStorage

    body = kopf.Body({"metadata": {"uid": "u1", "annotations": {}}})
    progress, diffbase = MemoryProgressStorage(), MemoryDiffBaseStorage()
    patch = kopf.Patch()
    progress.store(key="on_change", record={"retries": 1}, body=body, patch=patch)
    diffbase.store(body=body, patch=patch, essence={"spec": {"a": 1}})
    progress.touch(body=body, patch=patch, value=None)
    assert not patch, "storing and a plain touch write nothing to the object"
    assert progress.fetch(key="on_change", body=body) == {"retries": 1}
    assert diffbase.fetch(body=body) == {"spec": {"a": 1}}
    progress.touch(body=body, patch=patch, value="2026-11-21T12:00:00")
    assert patch["metadata"]["annotations"] == {TOUCH_ANNOTATION: "2026-11-21T12:00:00"}
    progress.forget("u1")
    diffbase.forget("u1")
    assert progress.fetch(key="on_change", body=body) is None and diffbase.fetch(body=body) is None
