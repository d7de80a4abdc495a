"""A deleted FineTuneJob leaves nothing behind in the operator: its copy, phase series, generation and rank 0's
readings go with the raw DELETED event (Kopf calls no delete handler without a finalizer), with a relist that
finds it gone (a delete Kopf missed), and after a pass that ran while it was deleted or found it gone."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import kopf
import pytest
from fake_cluster import FakeCluster

from kubetune.api.status import FineTuneJobStatus
from kubetune.operator.cluster import JobRef
from kubetune.operator.runtime.handlers import on_job_event
from kubetune.operator.runtime.kube import ApiError
from kubetune.operator.runtime.kube_cluster import KubeCluster
from kubetune.operator.runtime.metrics import OperatorMetrics
from kubetune.operator.runtime.passes import Controller
from kubetune.operator.settings import OperatorSettings

KEY = ("ml", "corgi")
BODY = {"kind": "FineTuneJob", "metadata": {"uid": "u1", "namespace": "ml", "name": "corgi", "generation": 1,
                                            "resourceVersion": "5", "annotations": {}}}


class Progress:
    """The progress reader's seam: which jobs it was told to forget."""

    def __init__(self) -> None:
        self.forgotten: list[Any] = []

    def forget(self, key: Any) -> None:
        self.forgotten.append(key)


def _controller(cluster: Any = None) -> Controller:
    metrics = OperatorMetrics()
    metrics.observe_transition("u1", "ml", FineTuneJobStatus(), FineTuneJobStatus(phase="Running"))
    controller = Controller(cluster or FakeCluster(), OperatorSettings(), metrics, progress=Progress())
    if isinstance(cluster, KubeCluster):
        controller.caches = cluster.caches
    controller.caches["FineTuneJob"].put(BODY)
    controller.generations["u1"] = 1
    return controller


def _phases(controller: Controller) -> dict[str, float]:
    samples = controller.metrics.registry.get_sample_value
    return {p: samples("kubetune_operator_jobs", {"namespace": "ml", "phase": p}) or 0.0
            for p in ("Running", "Failed")}


def _forgotten(controller: Controller) -> bool:
    return (controller.generations == {} and set(_phases(controller).values()) == {0.0}
            and controller.caches["FineTuneJob"].get(*KEY) is None and set(controller.progress.forgotten) == {KEY})


@pytest.mark.parametrize("event", [None, "ADDED", "MODIFIED"])
def test_other_events_keep_everything(event: str | None) -> None:
    controller = _controller()
    asyncio.run(on_job_event(type=event, body=kopf.Body(BODY), param=controller))
    assert controller.generations == {"u1": 1} and _phases(controller)["Running"] == 1
    assert controller.caches["FineTuneJob"].get(*KEY) is not None and controller.progress.forgotten == []


def test_deleted_forgets_the_job() -> None:
    controller = _controller()
    asyncio.run(on_job_event(type="DELETED", body=kopf.Body(BODY), param=controller))
    assert _forgotten(controller)


class DeletedDuringThePass(FakeCluster):
    """The DELETED event arrives while the pass runs, before it records the job's new phase."""

    def __init__(self) -> None:
        super().__init__()
        self.controller: Controller | None = None

    def write_status(self, ref: JobRef, patch: dict[str, Any]) -> None:
        super().write_status(ref, patch)
        asyncio.run(on_job_event(type="DELETED", body=kopf.Body({**BODY, "metadata": {
            **BODY["metadata"], "resourceVersion": "6"}}), param=self.controller))


def test_a_pass_that_ran_while_its_job_was_deleted_forgets_what_it_recorded() -> None:
    cluster = DeletedDuringThePass()
    controller = cluster.controller = _controller(cluster)
    assert controller.run_pass(KEY)
    assert cluster.status_writes, "the pass wrote a status (the job has no spec: Failed) and recorded its phase"
    assert _forgotten(controller), "the phase recorded after the delete is forgotten too"


class GoneApi:
    """The API server of a FineTuneJob deleted while the watch was away: its status write finds nothing."""

    def request(self, method: str, path: str, body: Any = None, query: Any = None) -> Any:
        raise ApiError(404, "Not Found", f"{path} not found")


def test_a_pass_whose_status_write_finds_the_job_gone_forgets_it_and_does_not_retry() -> None:
    cluster = KubeCluster(GoneApi())  # type: ignore[arg-type]
    try:
        controller = _controller(cluster)
        assert controller.run_pass(KEY) is True, "no retry of a job that is gone"
    finally:
        cluster.close()
    assert _forgotten(controller)
    assert controller.queue.get(timeout=0) is None
    assert not controller.caches["FineTuneJob"].put(BODY), "a late copy of it cannot come back"


def test_a_job_a_relist_no_longer_finds_is_forgotten() -> None:
    controller = _controller()
    controller.relist = lambda: controller.caches["FineTuneJob"].prune(None, set(), 10)
    controller.synced.set()
    controller.relist_now()
    assert _forgotten(controller)


def test_a_relist_that_fails_is_tried_again_and_the_loop_lives_on(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("kubetune.operator.runtime.passes.RELIST_SECONDS", 0.01)
    controller, calls = _controller(), []

    def relist() -> list[dict[str, Any]]:
        calls.append(1)
        if len(calls) == 1:
            raise ApiError(0, "Unreachable", "connection refused")
        return controller.caches["FineTuneJob"].prune(None, set(), 10)

    controller.relist, stop = relist, threading.Event()
    controller.start(stop)
    try:
        assert _wait_for(lambda: len(calls) >= 2), "a second relist after the first one failed"
    finally:
        stop.set()
        controller.queue.close()
    assert "relist_now failed: 0 Unreachable: connection refused" in caplog.text
    assert _wait_for(lambda: _forgotten(controller))


def _wait_for(condition: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not (ok := condition()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(ok)
