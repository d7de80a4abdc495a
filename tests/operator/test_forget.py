"""A deleted FineTuneJob leaves nothing behind in the operator: its copy, phase series, generation and
Kopf bookkeeping go with the raw DELETED event (Kopf calls no delete handler without a finalizer)."""

from __future__ import annotations

import asyncio

import kopf
import pytest
from fake_cluster import FakeCluster

from kubetune.api.status import FineTuneJobStatus
from kubetune.operator.runtime.bookkeeping import MemoryDiffBaseStorage, MemoryProgressStorage
from kubetune.operator.runtime.handlers import on_job_event
from kubetune.operator.runtime.metrics import OperatorMetrics
from kubetune.operator.runtime.passes import Controller
from kubetune.operator.settings import OperatorSettings

BODY = {"metadata": {"uid": "u1", "namespace": "ml", "name": "corgi", "generation": 1, "resourceVersion": "5",
                     "annotations": {}}}


def _controller() -> Controller:
    metrics = OperatorMetrics()
    metrics.observe_transition("u1", "ml", FineTuneJobStatus(), FineTuneJobStatus(phase="Running"))
    progress, diffbase = MemoryProgressStorage(), MemoryDiffBaseStorage()
    body, patch = kopf.Body(BODY), kopf.Patch()
    progress.store(key="on_change", record={"retries": 1}, body=body, patch=patch)
    diffbase.store(body=body, patch=patch, essence={"spec": {"a": 1}})
    controller = Controller(FakeCluster(), OperatorSettings(), metrics, bookkeeping=(progress, diffbase))
    controller.caches["FineTuneJob"].put(BODY)
    controller.generations["u1"] = 1
    return controller


def _running(controller: Controller) -> float | None:
    return controller.metrics.registry.get_sample_value("kubetune_operator_jobs", {"namespace": "ml",
                                                                                   "phase": "Running"})


@pytest.mark.parametrize("event", [None, "ADDED", "MODIFIED"])
def test_other_events_keep_everything(event: str | None) -> None:
    controller = _controller()
    asyncio.run(on_job_event(type=event, body=kopf.Body(BODY), param=controller))
    assert controller.generations == {"u1": 1} and _running(controller) == 1
    assert controller.caches["FineTuneJob"].get("ml", "corgi") is not None


def test_deleted_forgets_the_job() -> None:
    controller = _controller()
    asyncio.run(on_job_event(type="DELETED", body=kopf.Body(BODY), param=controller))
    body = kopf.Body(BODY)
    progress, diffbase = controller.bookkeeping
    assert controller.generations == {} and _running(controller) == 0
    assert controller.caches["FineTuneJob"].get("ml", "corgi") is None
    assert progress.fetch(key="on_change", body=body) is None and diffbase.fetch(body=body) is None
