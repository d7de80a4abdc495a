"""The operator's stores, the Kopf handlers that fill them and its work queue, without a server:
newest copy wins, every trigger is a queued key, bursts coalesce, new jobs go first."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import kopf
import pytest
from fake_cluster import FakeCluster

from kubetune.operator.runtime.handlers import CHILDREN, build_registry, cache, configure, on_child_event, on_job_event
from kubetune.operator.runtime.metrics import OperatorMetrics
from kubetune.operator.runtime.passes import Controller
from kubetune.operator.runtime.watching import Caches, Store
from kubetune.operator.runtime.workqueue import WorkQueue
from kubetune.operator.settings import OperatorSettings


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


def test_store_prune_drops_what_a_new_list_no_longer_has() -> None:
    store = Store()
    store.put(obj("a", 1))
    store.put(obj("b", 1))
    store.put(obj("c", 1, ns="team-b"))
    store.put(obj("d", 12))  # created after the list was served: kept
    gone = store.prune("team-a", {("team-a", "b")}, 10)
    assert [o["metadata"]["name"] for o in gone] == ["a"]
    assert sorted(o["metadata"]["name"] for o in store.items()) == ["b", "c", "d"], "other namespaces are kept"
    assert not store.put(obj("a", 9)), "a copy older than the list cannot bring it back"
    assert [o["metadata"]["name"] for o in store.prune(None, set(), 20)] == ["b", "c", "d"]


def test_a_deleted_object_leaves_a_tombstone_no_older_copy_passes() -> None:
    store = Store()
    store.remove(obj("corgi", 8))  # the DELETED event came before our status write's response was put
    assert not store.put(obj("corgi", 7)) and store.get("team-a", "corgi") is None
    assert not store.put(obj("corgi", 8))
    assert store.put(obj("corgi", 9)), "an object created again under the name is newer than the delete"
    store.remove(obj("corgi", 10))
    assert not store.put(obj("corgi", 9)), "a LIST begun before the delete does not restore it"


def test_tombstones_are_bounded() -> None:
    from kubetune.operator.runtime import watching

    store = Store()
    for n in range(watching.TOMBSTONES + 5):
        store.remove(obj(f"p{n}", 3))
    assert len(store._gone) == watching.TOMBSTONES and store.put(obj("p0", 2)), "the oldest are dropped first"
    assert not store.put(obj(f"p{watching.TOMBSTONES}", 2))


def test_an_older_copy_from_kopf_never_replaces_our_own_newer_write() -> None:
    caches = Caches()
    caches.put({**obj("corgi", 9, kind="FineTuneJob"), "status": {"phase": "Running"}})  # our status write
    asyncio.run(cache(body=kopf.Body(obj("corgi", 8, kind="FineTuneJob")), param=caches["FineTuneJob"]))
    assert caches["FineTuneJob"].get("team-a", "corgi")["status"] == {"phase": "Running"}
    asyncio.run(cache(body=kopf.Body(obj("corgi", 10, kind="FineTuneJob")), param=caches["FineTuneJob"]))
    assert caches["FineTuneJob"].get("team-a", "corgi")["metadata"]["resourceVersion"] == "10"


def test_caches_remember_write_responses_by_kind() -> None:
    caches = Caches()
    caches.put(obj("corgi", 9, kind="Job"))
    caches.put(None)
    assert caches["Job"].get("team-a", "corgi") is not None and caches["Pod"].items() == []


def _controller() -> Controller:
    return Controller(FakeCluster(), OperatorSettings(), OperatorMetrics())


def _job(name: str, generation: int, version: int = 1) -> kopf.Body:
    return kopf.Body({**obj(name, version, kind="FineTuneJob"), "metadata": {
        **obj(name, version)["metadata"], "uid": f"uid-{name}", "generation": generation}})


def _drain(queue: WorkQueue) -> list[Any]:
    keys = []
    while (key := queue.get(timeout=0)) is not None:
        keys.append(key)
        queue.done(key)
    return keys


def test_nothing_is_queued_until_kopf_has_listed_every_collection() -> None:
    controller = _controller()
    job = obj("corgi", 3, job="corgi", kind="Job")
    asyncio.run(on_child_event(type=None, body=kopf.Body(job), param=(controller, "Job")))
    controller.resync()
    assert len(controller.queue) == 0, "Kopf runs event handlers after every first listing: until then, no pass"
    asyncio.run(on_job_event(type=None, body=_job("corgi", 1), param=controller))
    assert controller.synced.is_set() and _drain(controller.queue) == [("team-a", "corgi")]
    asyncio.run(on_child_event(type="MODIFIED", body=kopf.Body(job), param=(controller, "Job")))
    assert _drain(controller.queue) == [("team-a", "corgi")], "a change of its Job asks for a pass of the job"


def test_a_job_gets_a_pass_when_new_or_its_spec_changed_not_on_its_own_status_writes() -> None:
    controller = _controller()
    asyncio.run(on_job_event(type=None, body=_job("corgi", 1), param=controller))
    assert _drain(controller.queue) == [("team-a", "corgi")]
    asyncio.run(on_job_event(type="MODIFIED", body=_job("corgi", 1, version=2), param=controller))
    assert len(controller.queue) == 0, "a status write (same generation) asks for nothing"
    asyncio.run(on_job_event(type="MODIFIED", body=_job("corgi", 2, version=3), param=controller))
    assert _drain(controller.queue) == [("team-a", "corgi")], "a spec change does"


def test_a_job_without_its_job_is_urgent_and_one_with_it_routine() -> None:
    controller = _controller()
    controller.synced.set()
    controller.caches["Job"].put(obj("husky", 1, job="husky", kind="Job"))
    controller.enqueue(("team-a", "husky"))
    controller.enqueue(("team-a", "corgi"))
    assert controller.queue.get(timeout=0) == ("team-a", "corgi"), "children to create come first"


def test_child_handlers_keep_the_newest_copy_and_drop_deleted_children() -> None:
    controller = _controller()
    pod = obj("corgi-0", 4, job="corgi")
    asyncio.run(cache(body=kopf.Body(pod), param=controller.caches["Pod"]))
    assert [p["metadata"]["name"] for p in controller.caches["Pod"].labelled("team-a", "corgi")] == ["corgi-0"]
    asyncio.run(on_child_event(type="DELETED", body=kopf.Body(obj("corgi-0", 5, job="corgi")),
                               param=(controller, "Pod")))
    assert controller.caches["Pod"].labelled("team-a", "corgi") == []


def test_kopf_watches_each_collection_once_and_the_children_by_label() -> None:
    from kubernetes import client

    registry = build_registry(client.Configuration(), _controller())
    indexed = {handler.id for handler in registry._indexing.get_all_handlers()}
    assert indexed == {f"cache-{kind}" for kind in ("FineTuneJob", *CHILDREN)}
    settings = kopf.OperatorSettings()
    configure(settings=settings, param=_controller())
    assert {s.any_name: v for s, v in settings.watching.label_selectors.items()} == {
        "jobs": "kubetune.io/job-name", "pods": "kubetune.io/job-name", "configmaps": "kubetune.io/job-name",
        "services": "kubetune.io/job-name"}
    for group_version, plural in [(("batch", "v1"), "jobs"), (("", "v1"), "pods"), (("", "v1"), "configmaps"),
                                  (("", "v1"), "services")]:  # what Kopf's LIST and WATCH of each send
        resource = kopf.Resource(*group_version, plural)
        assert settings.watching.label_selectors.collect(resource) == ["kubetune.io/job-name"], plural
    assert settings.watching.label_selectors.collect(kopf.Resource("kubetune.io", "v1alpha1", "finetunejobs")) == []


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


def test_queue_hands_out_urgent_keys_first_and_holds_routine_ones_while_urgent_work_runs() -> None:
    queue = WorkQueue(yield_seconds=0.2)
    queue.add("status-a")
    queue.add("new-b", urgent=True)
    queue.add("status-a", urgent=True)  # already queued: it becomes urgent, once
    assert len(queue) == 2 and queue.get(timeout=0) == "new-b"
    assert queue.get(timeout=0) == "status-a"
    assert queue.urgent_besides("new-b") and queue.urgent_besides("status-a"), "each sees the other one's pass"
    queue.add("status-c")
    began = time.monotonic()
    assert queue.get(timeout=0) == "status-c" and time.monotonic() - began >= 0.15, "it waited for them"
    queue.done("new-b")
    queue.done("status-a")
    assert not queue.urgent_besides("x")


def test_queue_hands_out_at_most_a_few_routine_keys_at_once() -> None:
    from kubetune.operator.runtime.workqueue import ROUTINE_AT_ONCE

    queue = WorkQueue()
    for n in range(ROUTINE_AT_ONCE + 1):
        queue.add(n)
    taken = [queue.get(timeout=0) for _ in range(ROUTINE_AT_ONCE)]
    assert queue.get(timeout=0) is None, "the rest waits for a routine pass to end"
    queue.add("new", urgent=True)
    assert queue.get(timeout=0) == "new", "new jobs always find a worker"
    queue.done("new")
    queue.done(taken[0])
    assert queue.get(timeout=0) == ROUTINE_AT_ONCE


def test_queue_keeps_a_worker_for_urgent_keys_and_refuses_fewer_than_two() -> None:
    queue = WorkQueue(routine_at_once=2)  # three workers
    for key in ("a", "b", "c"):
        queue.add(key)
    assert [queue.get(timeout=0), queue.get(timeout=0), queue.get(timeout=0)] == ["a", "b", None]
    with pytest.raises(ValueError, match="pass_workers"):
        WorkQueue(routine_at_once=0)


def test_closing_the_queue_wakes_a_routine_key_waiting_for_urgent_ones_and_starts_no_pass() -> None:
    queue = WorkQueue(yield_seconds=5.0)
    queue.add("new", urgent=True)
    assert queue.get(timeout=0) == "new"
    queue.add("status")
    taken: list[Any] = []
    worker = threading.Thread(target=lambda: taken.append(queue.get()))
    began = time.monotonic()
    worker.start()
    time.sleep(0.1)
    queue.close()
    worker.join(2.0)
    assert taken == [None] and time.monotonic() - began < 1.0, "no pass starts once the queue is closed"


def test_queue_holds_a_retry_until_its_delay_has_passed() -> None:
    now = [100.0]
    queue = WorkQueue(clock=lambda: now[0])
    queue.add_after("a", 10)
    assert queue.get(timeout=0) is None
    now[0] = 110.0
    assert queue.get(timeout=0) == "a"
    queue.close()
    assert queue.get() is None


def test_kopf_builds_its_essence_from_a_slim_body_and_stores_nothing() -> None:
    from kubetune.operator.runtime.bookkeeping import SlimDiffBaseStorage

    body = kopf.Body({"apiVersion": "v1", "kind": "Pod", "spec": {"a": 1}, "status": {"phase": "Running"},
                      "metadata": {"uid": "u1", "labels": {"x": "1"}, "managedFields": [{"manager": "k"}]}})
    storage = SlimDiffBaseStorage()
    essence = storage.build(body=body)
    assert essence["spec"] == {"a": 1} and essence["metadata"] == {"labels": {"x": "1"}}
    assert "status" not in essence
    assert storage.build(body=body, extra_fields=[("status", "phase")])["status"] == {"phase": "Running"}
    storage.store(body=body, patch=kopf.Patch(), essence=essence)
    assert storage.fetch(body=body) is None, "no handler compares essences: nothing is kept"
    settings = kopf.OperatorSettings()
    configure(settings=settings)
    assert isinstance(settings.persistence.diffbase_storage, SlimDiffBaseStorage)


class ListingApi:
    """An API server that lists only `kept` (at resourceVersion 10), recording what was asked."""

    def __init__(self, kept: list[dict[str, Any]]) -> None:
        self.kept, self.asked = kept, list[tuple[str, str | None]]()

    def get(self, path: str, **query: str) -> dict[str, Any]:
        self.asked.append((path, query.get("labelSelector")))
        plural = path.rsplit("/", 1)[-1]
        items = [o for o in self.kept if f"{o['kind'].lower()}s" == plural]
        return {"metadata": {"resourceVersion": "10"}, "items": items}


def test_a_relist_drops_what_kopf_missed_being_deleted_and_returns_the_jobs() -> None:
    from kubetune.operator.runtime.kube_cluster import KubeCluster

    husky = obj("husky", 5, kind="FineTuneJob")
    api = ListingApi([husky])
    cluster = KubeCluster(api)  # type: ignore[arg-type]
    try:
        for body in (obj("corgi", 5, kind="FineTuneJob"), husky, obj("corgi", 6, job="corgi", kind="Job"),
                     obj("late", 11, job="late", kind="Job")):
            cluster.caches.put(body)
        gone = cluster.relist(["team-a"])
    finally:
        cluster.close()
    assert [o["metadata"]["name"] for o in gone] == ["corgi"], "the FineTuneJobs dropped, for the passes to forget"
    assert [o["metadata"]["name"] for o in cluster.caches["FineTuneJob"].items()] == ["husky"]
    assert [o["metadata"]["name"] for o in cluster.caches["Job"].items()] == ["late"], "created after the list"
    assert ("/api/v1/namespaces/team-a/pods", "kubetune.io/job-name") in api.asked
    assert len(api.asked) == 5 and all(selector for path, selector in api.asked if "finetunejobs" not in path)
