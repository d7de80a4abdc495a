"""A deleted FineTuneJob leaves nothing behind in the operator: its phase series, lock and
Kopf bookkeeping go with the raw DELETED event (Kopf calls no delete handler without a finalizer)."""

from __future__ import annotations

import threading

import kopf
import pytest

from kubetune.api.status import FineTuneJobStatus
from kubetune.operator.bookkeeping import MemoryDiffBaseStorage, MemoryProgressStorage
from kubetune.operator.handlers import on_event
from kubetune.operator.metrics import OperatorMetrics


def _memo() -> kopf.Memo:
    metrics = OperatorMetrics()
    metrics.observe_transition("u1", "ml", FineTuneJobStatus(), FineTuneJobStatus(phase="Running"))
    progress, diffbase = MemoryProgressStorage(), MemoryDiffBaseStorage()
    body, patch = kopf.Body({"metadata": {"uid": "u1", "annotations": {}}}), kopf.Patch()
    progress.store(key="on_change", record={"retries": 1}, body=body, patch=patch)
    diffbase.store(body=body, patch=patch, essence={"spec": {"a": 1}})
    return kopf.Memo(metrics=metrics, locks={"u1": threading.Lock()}, bookkeeping=(progress, diffbase))


def _running(memo: kopf.Memo) -> float | None:
    return memo.metrics.registry.get_sample_value("kubetune_operator_jobs", {"namespace": "ml", "phase": "Running"})


@pytest.mark.parametrize("event", [None, "ADDED", "MODIFIED"])
def test_other_events_keep_everything(event: str | None) -> None:
    memo = _memo()
    on_event(type=event, uid="u1", memo=memo)
    assert "u1" in memo.locks and _running(memo) == 1


def test_deleted_forgets_the_job() -> None:
    memo = _memo()
    on_event(type="DELETED", uid="u1", memo=memo)
    body = kopf.Body({"metadata": {"uid": "u1", "annotations": {}}})
    progress, diffbase = memo.bookkeeping
    assert "u1" not in memo.locks and _running(memo) == 0
    assert progress.fetch(key="on_change", body=body) is None and diffbase.fetch(body=body) is None
