"""Retry back-off: a failed attempt waits before the next one; a node disruption does not."""

from __future__ import annotations

from datetime import timedelta

import pytest
from ftj_builders import NOW, make_job, observed

from kubetune.api.status import Condition, FineTuneJobStatus
from kubetune.operator.actions import CreateChild, plan_actions
from kubetune.operator.conditions import NODE_DISRUPTED, RESTARTING
from kubetune.operator.restart import BACKOFF_CAP_SECONDS, next_attempt_at, restart_delay
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.timefmt import format_time


@pytest.mark.parametrize(("restarts", "seconds"), [(0, 0.0), (1, 10.0), (2, 20.0), (3, 40.0), (12, 300.0)])
def test_delay_doubles_per_restart_up_to_the_cap(restarts: int, seconds: float) -> None:
    assert restart_delay(restarts, 10.0) == seconds
    assert restart_delay(restarts, 10.0) <= BACKOFF_CAP_SECONDS


def _restarting(reason: str, restarts: int, since_seconds: float) -> FineTuneJobStatus:
    since = format_time(NOW - timedelta(seconds=since_seconds))
    condition = Condition(type="Restarting", status="True", reason=reason, message="", last_transition_time=since)
    return FineTuneJobStatus(phase="Restarting", restarts=restarts, conditions=[condition])


def _creates_job(status: FineTuneJobStatus) -> bool:
    job = make_job().typed()
    actions = plan_actions(job, observed(), status, OperatorSettings(restart_backoff_seconds=10.0), NOW)
    return any(isinstance(a, CreateChild) and a.obj["kind"] == "Job" for a in actions)


@pytest.mark.parametrize(("restarts", "since", "creates"), [
    (1, 5.0, False),   # first restart waits 10 s
    (1, 10.0, True),
    (2, 15.0, False),  # second restart waits 20 s
    (2, 20.5, True),
])
def test_a_counted_restart_waits_for_its_backoff(restarts: int, since: float, creates: bool) -> None:
    assert _creates_job(_restarting(RESTARTING.reason, restarts, since)) is creates


def test_a_node_disruption_restarts_at_once() -> None:
    status = _restarting(NODE_DISRUPTED.reason, 0, 0.0)
    assert next_attempt_at(status, 10.0) is None
    assert _creates_job(status)


def test_a_job_that_is_not_restarting_is_never_held_back() -> None:
    assert next_attempt_at(FineTuneJobStatus(phase="Pending"), 10.0) is None
