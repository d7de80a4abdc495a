"""How `KubeCluster` writes: a new job's children at once, events off the pass and after new jobs' passes.

The API is the operator's own `KubeApi` seam, recorded in memory; no server is involved.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

from ftj_builders import make_job

from kubetune.operator.actions import CreateChild, ReplaceConfigMapData
from kubetune.operator.cluster import JobRef
from kubetune.operator.events import Event
from kubetune.operator.kube import ApiError
from kubetune.operator.kube_cluster import EventPoster, KubeCluster
from kubetune.operator.render import Attempt, render_configmap, render_job, render_service
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.workqueue import WorkQueue


class RecordingApi:
    """Creates that take `delay` seconds each, recorded with the number in flight when each began."""

    def __init__(self, delay: float = 0.2, fail_kinds: tuple[str, ...] = ()) -> None:
        self.delay = delay
        self.fail_kinds = fail_kinds
        self.lock = threading.Lock()
        self.in_flight = 0
        self.calls: list[tuple[str, str, int]] = []

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.in_flight += 1
            label = f"Event {body['reason']}" if body.get("kind") == "Event" else body.get("kind", "")
            self.calls.append(("create", label, self.in_flight))
        try:
            time.sleep(self.delay)
            if body.get("kind") in self.fail_kinds:
                raise ApiError(500, "Internal Server Error", "injected")
            return {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}
        finally:
            with self.lock:
                self.in_flight -= 1

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.calls.append(("patch", path, self.in_flight))
        return {}


def children(settings: OperatorSettings) -> list[CreateChild]:
    job = make_job().typed()
    return [CreateChild(render_configmap(job)), CreateChild(render_service(job, settings)),
            CreateChild(render_job(job, settings, Attempt(0, None)))]


def test_a_new_jobs_children_are_created_at_once() -> None:
    api = RecordingApi(delay=0.3)
    cluster = KubeCluster(api)  # type: ignore[arg-type]
    try:
        began = time.monotonic()
        errors = cluster.apply_all(make_job().typed(), children(OperatorSettings()))
        took = time.monotonic() - began
    finally:
        cluster.close()
    assert errors == []
    assert sorted(kind for _, kind, _ in api.calls) == ["ConfigMap", "Job", "Service"]
    assert max(depth for _, _, depth in api.calls) == 3, "all three were in flight together"
    assert took < 0.3 * 3, f"three 0.3 s creates took {took:.2f}s: one after another"


def test_a_failed_create_is_reported_and_the_others_still_happen() -> None:
    api = RecordingApi(delay=0.0, fail_kinds=("Service",))
    cluster = KubeCluster(api)  # type: ignore[arg-type]
    try:
        errors = cluster.apply_all(make_job().typed(), children(OperatorSettings()))
    finally:
        cluster.close()
    assert len(errors) == 1 and errors[0].startswith("CreateChild: 500")
    assert sorted(kind for _, kind, _ in api.calls) == ["ConfigMap", "Job", "Service"]


def test_a_replaced_configmap_comes_before_the_new_attempts_job() -> None:
    api = RecordingApi(delay=0.1)
    cluster = KubeCluster(api)  # type: ignore[arg-type]
    settings = OperatorSettings()
    job = make_job().typed()
    try:
        cluster.apply_all(job, [ReplaceConfigMapData("corgi-config", {"job.yaml": "x"}), children(settings)[2]])
    finally:
        cluster.close()
    assert [(verb, depth) for verb, _, depth in api.calls] == [("patch", 0), ("create", 1)]


def test_events_wait_for_new_jobs_passes_and_keep_their_order() -> None:
    api, work = RecordingApi(delay=0.3), WorkQueue()
    cluster = KubeCluster(api, work=work)  # type: ignore[arg-type]
    ref, now = JobRef("team-a", "corgi", "ftj-uid-1"), datetime.now(UTC)
    job = make_job().typed()
    work.add(("team-a", "corgi"), urgent=True)
    key = work.get(timeout=0)

    def new_jobs_pass() -> None:  # as a worker runs it: the key is given back once the creates are done
        cluster.apply_all(job, children(OperatorSettings()))
        work.done(key)

    try:
        creating = threading.Thread(target=new_jobs_pass)
        creating.start()
        time.sleep(0.05)  # the creates are in flight
        for reason in ("Created", "Pending", "Staging"):
            cluster.post_event(ref, Event("Normal", reason, "m"), now)
        creating.join()
    finally:
        cluster.close()
    labels = [label for _, label, _ in api.calls]
    assert set(labels[:3]) == {"ConfigMap", "Service", "Job"}, labels
    assert labels[3:] == ["Event Created", "Event Pending", "Event Staging"], labels


def test_close_posts_what_is_queued() -> None:
    api = RecordingApi(delay=0.0)
    cluster = KubeCluster(api)  # type: ignore[arg-type]
    ref, now = JobRef("team-a", "corgi", "ftj-uid-1"), datetime.now(UTC)
    for n in range(20):
        cluster.post_event(ref, Event("Normal", f"R{n}", "m"), now)
    cluster.close()
    assert len(api.calls) == 20


def test_calm_waits_for_urgent_passes_and_no_longer_than_asked() -> None:
    work = WorkQueue()
    assert work.calm(0.0), "nothing urgent: calm at once"
    work.add("new", urgent=True)
    work.add("old")
    assert not work.calm(0.1), "a new job waits for its children"
    key = work.get(timeout=0)
    assert key == "new" and not work.calm(0.1), "and now its pass runs"
    threading.Timer(0.2, work.done, args=(key,)).start()
    assert work.calm(2.0), "the pass ends well within 2 s"
    assert work.calm(0.0) and len(work) == 1, "a routine key does not hold anything back"


def test_a_poster_survives_any_error_and_posts_the_next_event() -> None:
    class Flaky(RecordingApi):
        def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
            if body.get("reason") == "Boom":
                raise ValueError("not JSON")
            return super().create(path, body)

    api = Flaky(delay=0.0)
    cluster = KubeCluster(api)  # type: ignore[arg-type]
    ref, now = JobRef("team-a", "corgi", "ftj-uid-1"), datetime.now(UTC)
    cluster.post_event(ref, Event("Normal", "Boom", "m"), now)
    cluster.post_event(ref, Event("Normal", "After", "m"), now)
    cluster.close()
    assert [label for _, label, _ in api.calls] == ["Event After"]


def test_closing_posts_the_backlog_without_giving_way_to_creates() -> None:
    api = RecordingApi(delay=0.0)
    waited: list[float] = []
    poster = EventPoster(api, calm=lambda: waited.append(5.0) or time.sleep(5.0))  # type: ignore[arg-type]
    poster._closing.set()  # as close() does first
    body = {"reason": "Created", "kind": "Event", "metadata": {}, "involvedObject": {"name": "corgi"}}
    began = time.monotonic()
    for _ in range(3):
        poster.post("ftj-uid-1", "team-a", body)
    poster.close(timeout=2.0)
    assert len(api.calls) == 3 and waited == [] and time.monotonic() - began < 1.0
