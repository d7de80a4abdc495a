"""Output ownership on the operator's side: a job whose output prefix overlaps a live job's is refused
before it creates anything, naming the other job; which of two new jobs wins depends only on the objects."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from ftj_builders import NOW, make_batch_job, make_job, make_pod, observed

from kubetune.api.status import FineTuneJobStatus
from kubetune.operator import conditions as cond
from kubetune.operator.actions import plan_actions
from kubetune.operator.events import events_for_transition
from kubetune.operator.output_claims import holder
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import compute_status, is_final


def peer(name: str, uri: str, created: str = "2026-11-21T10:00:00Z", phase: str | None = None,
         namespace: str = "team-a", **status: Any) -> dict[str, Any]:
    doc = make_job(name).set("spec.output.uri", uri).obj()
    doc["metadata"].update(uid=f"uid-{name}", creationTimestamp=created, namespace=namespace)
    doc["status"] = {"phase": phase, **status} if phase else dict(status)
    return doc


def me(uri: str = "s3://outputs/shared/", created: str = "2026-11-21T11:00:00Z") -> Any:
    return make_job("corgi").set("spec.output.uri", uri).set("metadata.creationTimestamp", created).typed()


@pytest.mark.parametrize(("case", "other", "refused"), [
    ("older live job, same prefix", peer("first", "s3://outputs/shared/", phase="Running"), True),
    ("older job not yet given a status", peer("first", "s3://outputs/shared"), True),
    ("older job writing inside my prefix", peer("first", "s3://outputs/shared/sub/", phase="Pending"), True),
    ("older job writing above my prefix", peer("first", "s3://outputs/", phase="Suspended"), True),
    ("newer job that has started", peer("later", "s3://outputs/shared/", "2026-11-21T12:00:00Z", "Running"), True),
    ("newer job, not started", peer("later", "s3://outputs/shared/", "2026-11-21T12:00:00Z", "Pending"), False),
    ("older job that succeeded", peer("first", "s3://outputs/shared/", phase="Succeeded"), False),
    ("older job that failed", peer("first", "s3://outputs/shared/", phase="Failed"), False),
    ("older job being deleted", {**peer("first", "s3://outputs/shared/", phase="Running"),
                                 "metadata": {"name": "first", "namespace": "team-a", "uid": "u",
                                              "creationTimestamp": "2026-11-21T10:00:00Z",
                                              "deletionTimestamp": "2026-11-21T11:30:00Z"}}, False),
    ("sibling prefix", peer("first", "s3://outputs/shared-2/", phase="Running"), False),
    ("same prefix in another bucket", peer("first", "s3://other/shared/", phase="Running"), False),
    ("same prefix, other namespace", peer("first", "s3://outputs/shared/", phase="Running", namespace="b"), True),
    ("same bucket on another S3 endpoint", {**peer("first", "s3://outputs/shared/", phase="Running"),
                                            "spec": {"output": {"uri": "s3://outputs/shared/"},
                                                     "storage": {"endpoint": "http://minio.other:9000"}}}, False),
])

def test_who_holds_an_output_prefix(case: str, other: dict[str, Any], refused: bool) -> None:
    assert (holder(me(), (other,)) is not None) is refused, case


@pytest.mark.parametrize(("namespace", "refused"), [("team-a", True), ("team-b", False)])
def test_a_pvc_is_one_place_only_within_its_namespace(namespace: str, refused: bool) -> None:
    mine = make_job("corgi").set("spec.output.uri", "pvc://outputs/x/").set("metadata.creationTimestamp",
                                                                              "2026-11-21T11:00:00Z").typed()
    other = peer("first", "pvc://outputs/x/", phase="Running", namespace=namespace)
    assert (holder(mine, (other,)) is not None) is refused


def test_a_malformed_peer_is_ignored() -> None:
    assert holder(me(), ({"metadata": {"name": "x"}}, {"spec": {"output": {"uri": 5}}}, {})) is None


def test_the_refusal_names_the_other_job_and_creates_nothing() -> None:
    job = me()
    other = peer("first", "s3://outputs/shared/", phase="Running")
    seen = dataclasses.replace(observed(children=False), peers=(other,))
    status = compute_status(job, seen, NOW, FineTuneJobStatus())
    assert status.phase == "Failed"
    failed = cond.find(status.conditions, "Failed")
    assert failed is not None and failed.reason == "OutputConflict"
    assert "team-a/first" in status.message and "s3://outputs/shared/" in status.message
    assert "choose another spec.output.uri" in status.message
    assert plan_actions(job, seen, status, OperatorSettings(), NOW) == []
    events = events_for_transition(FineTuneJobStatus(), status)
    assert [(e.type, e.reason) for e in events] == [("Warning", "OutputConflict")]
    assert is_final(status, 1) and not is_final(status, 2)  # a changed spec is looked at again


def test_a_started_job_is_never_refused_later() -> None:
    job = me()
    other = peer("first", "s3://outputs/shared/", phase="Running")
    running = make_batch_job().active(1)
    seen = dataclasses.replace(observed(running, (make_pod().running(),)), peers=(other,))
    before = FineTuneJobStatus(phase="Running", start_time="2026-11-21T11:00:00Z")
    assert compute_status(job, seen, NOW, before).phase != "Failed"
