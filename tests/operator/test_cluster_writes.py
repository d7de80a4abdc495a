"""How `KubeCluster` writes: a new job's children at once, events in order, after new jobs' passes.

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
from kubetune.operator.render import Attempt, render_configmap, render_job, render_service
from kubetune.operator.runtime.kube import ApiError
from kubetune.operator.runtime.kube_cluster import KubeCluster
from kubetune.operator.runtime.workqueue import WorkQueue
from kubetune.operator.settings import OperatorSettings


class RecordingApi:
    """Creates that take `delay` seconds each, recorded with the number in flight when each began."""

    def __init__(self, delay: float = 0.2, fail_kinds: tuple[str, ...] = ()) -> None:
        self.delay = delay
        self.fail_kinds = fail_kinds
        self.lock = threading.Lock()
        self.in_flight = 0
        self.calls: list[tuple[str, str, int]] = []

    def request(self, method: str, path: str, body: Any = None, query: Any = None) -> dict[str, Any]:
        return self.create(path, body) if method == "POST" else self.merge_patch(path, body)

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


def test_the_pass_that_posts_events_waits_for_new_jobs_passes() -> None:
    """Events are posted by the pass that decided them; in a burst that pass is a routine one, and the
    queue hands it out only once the new jobs' passes (their creates) are done, or after the yield."""
    work = WorkQueue(yield_seconds=5.0)
    work.add("new", urgent=True)
    work.add("status")
    assert work.get(timeout=0) == "new"
    threading.Timer(0.2, work.done, args=("new",)).start()
    began = time.monotonic()
    assert work.get(timeout=2.0) == "status"
    assert 0.15 < time.monotonic() - began < 2.0, "given out when the new job's pass ended"


def test_a_new_jobs_status_waits_while_other_new_jobs_are_in_the_passes_queue() -> None:
    work = WorkQueue()  # empty: a queue with nothing in it is still the one to ask
    cluster = KubeCluster(RecordingApi(delay=0.0), work=work)  # type: ignore[arg-type]
    ref = JobRef("team-a", "corgi", "ftj-uid-1")
    assert not cluster.others_first(ref)
    work.add(("team-a", "corgi"), urgent=True)
    assert work.get(timeout=0) == ("team-a", "corgi") and not cluster.others_first(ref), "its own pass is no reason"
    work.add(("team-a", "husky"), urgent=True)
    assert cluster.others_first(ref)
    cluster.close()


def test_events_are_posted_at_once_and_in_order_and_close_has_nothing_left() -> None:
    api = RecordingApi(delay=0.0)
    cluster = KubeCluster(api)  # type: ignore[arg-type]
    ref, now = JobRef("team-a", "corgi", "ftj-uid-1"), datetime.now(UTC)
    for n in range(20):
        cluster.post_event(ref, Event("Normal", f"R{n}", "m"), now)
    assert [label for _, label, _ in api.calls] == [f"Event R{n}" for n in range(20)]
    began = time.monotonic()
    cluster.close()
    assert time.monotonic() - began < 1.0


def test_a_routine_key_waits_for_urgent_passes_no_longer_than_the_yield() -> None:
    work = WorkQueue(yield_seconds=0.3)
    work.add("new", urgent=True)
    work.add("status")
    assert work.get(timeout=0) == "new"
    began = time.monotonic()
    assert work.get(timeout=0) == "status", "a new job's pass runs: the status waits for it"
    assert 0.25 < time.monotonic() - began < 1.0, "but no longer than the yield"


def test_an_event_that_cannot_be_posted_fails_nothing_and_the_next_one_is_posted() -> None:
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
