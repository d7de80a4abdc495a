"""The one rule that classifies how each pod of an attempt ended, and what that makes of the attempt.

docs/operator.md ("Which exits count") states the same table; a disruption is never counted, a
configuration error fails at once, an out-of-memory kill is counted, and so is a stall that no
pod explains.
"""

from __future__ import annotations

from typing import Any

import pytest
from ftj_builders import make_batch_job, make_job, make_pod, observed

from kubetune.operator.restart import classify_pod, failure_verdict

# (case, pod, how it ended)
POD_ENDS: list[tuple[str, Any, str]] = [
    ("still running", make_pod().running(), "running"),
    ("not started", make_pod(), "running"),
    ("succeeded", make_pod().succeeded(), "succeeded"),
    ("node lost: killed", make_pod().failed(137).disrupted(), "lost"),
    ("drained: checkpointed in time", make_pod().failed(143).disrupted(), "lost"),
    ("lost before its container ended", make_pod().running().disrupted(), "lost"),
    ("configuration error", make_pod().failed(78), "config-error"),
    ("stopped by SIGTERM after a checkpoint", make_pod().failed(143), "stopped"),
    ("a peer's process is gone", make_pod().failed(76), "peer-lost"),
    ("out of memory", make_pod().failed(137, reason="OOMKilled"), "failed"),
    ("killed, no disruption", make_pod().failed(137), "failed"),
    ("trainer failure", make_pod().failed(1), "failed"),
    ("storage unreachable", make_pod().failed(75), "failed"),
]


@pytest.mark.parametrize(("case", "pod", "end"), POD_ENDS, ids=[c for c, _, _ in POD_ENDS])
def test_every_pod_end_has_one_kind(case: str, pod: Any, end: str) -> None:
    assert classify_pod(pod.obj()) == end


DISRUPTION_MESSAGE = "Pod team-a/corgi-1-abcde has condition DisruptionTarget matching FailJob rule at index 1"

# (case, batch Job, pods, verdict kind, counted restarts after it)
ATTEMPTS: list[tuple[str, Any, tuple[Any, ...], str, int]] = [
    ("rank 0 lost, rank 1 stopped", make_batch_job().failed("PodFailurePolicy", DISRUPTION_MESSAGE),
     (make_pod().failed(137).disrupted(), make_pod(index=1).failed(143)), "disrupted", 0),
    ("rank 1 lost, rank 0 lost its peer", make_batch_job().failed(),
     (make_pod().failed(76), make_pod(index=1).failed(137).disrupted()), "disrupted", 0),
    ("rank 1 lost, rank 0's collective broke another way", make_batch_job().failed(),
     (make_pod().failed(1), make_pod(index=1).failed(137).disrupted()), "disrupted", 0),
    ("the lost pod is already gone: the Job names the rule", make_batch_job().failed("PodFailurePolicy",
                                                                                     DISRUPTION_MESSAGE),
     (make_pod().failed(143),), "disrupted", 0),
    ("a configuration error beside a lost node still fails", make_batch_job().failed("PodFailurePolicy"),
     (make_pod().failed(78), make_pod(index=1).failed(137).disrupted()), "config-error", 0),
    ("out of memory, peer lost it", make_batch_job().failed(),
     (make_pod().failed(76), make_pod(index=1).failed(137, reason="OOMKilled")), "restart", 1),
    ("a failure explains the peer's stop (the Job's deletion)", make_batch_job().failed(),
     (make_pod().failed(143), make_pod(index=1).failed(1)), "restart", 1),
    ("a stop from outside, no failure: not counted", make_batch_job().failed(),
     (make_pod().failed(143), make_pod(index=1).failed(143)), "disrupted", 0),
    ("a stop beside a peer that lost it: not counted", make_batch_job().failed(),
     (make_pod().failed(76), make_pod(index=1).failed(143)), "disrupted", 0),
    ("peers lost each other, no other cause (a stall): counted", make_batch_job().failed(),
     (make_pod().failed(76), make_pod(index=1).failed(76)), "restart", 1),
    ("counted retries run out", make_batch_job().restarts(2).failed(),
     (make_pod().failed(1), make_pod(index=1).failed(143)), "exhausted", 2),
    ("one node: a lost pod replaced in the same Job, then the replacement crashes: counted",
     make_batch_job().failed(),
     (make_pod().failed(137).disrupted(), make_pod().created("2026-11-21T11:05:00Z").failed(1)), "restart", 1),
    ("one node: replaced in the same second, the replacement crashes: counted", make_batch_job().failed(),
     (make_pod().failed(1), make_pod().failed(137).disrupted()), "restart", 1),
    ("a disruption is free even with no retries left", make_batch_job().restarts(2).failed(),
     (make_pod().failed(1), make_pod(index=1).failed(137).disrupted()), "disrupted", 2),
]


@pytest.mark.parametrize(("case", "batch", "pods", "kind", "restarts"), ATTEMPTS, ids=[a[0] for a in ATTEMPTS])
def test_the_pod_that_explains_the_attempt_decides(case: str, batch: Any, pods: tuple[Any, ...], kind: str,
                                                   restarts: int) -> None:
    verdict = failure_verdict(make_job().nodes(2).backoff_limit(2).typed(), observed(batch, pods))
    assert verdict is not None and (verdict.kind, verdict.restarts) == (kind, restarts), verdict


def test_the_cause_names_the_lost_pod() -> None:
    pods = (make_pod().failed(1, "gloo: connection closed by peer"), make_pod(index=1).failed(137).disrupted())
    verdict = failure_verdict(make_job().nodes(2).typed(), observed(make_batch_job().failed(), pods))
    assert verdict is not None and verdict.cause == "pod corgi-1-abcde was lost (DeletionByTaintManager)"


def test_no_verdict_while_the_job_has_not_failed() -> None:
    pods = (make_pod().running(), make_pod(index=1).failed(137).disrupted())
    assert failure_verdict(make_job().nodes(2).typed(), observed(make_batch_job().active(1), pods)) is None
