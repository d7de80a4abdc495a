"""The reconcile pass end to end against an in-memory cluster: a job's whole life, and its failures."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from fake_cluster import FakeCluster
from ftj_builders import NOW, S3_KEYS, make_job, make_pod

from kubetune.operator.actions import CreateChild, DeleteFineTuneJob, DeleteJob
from kubetune.operator.reconcile import reconcile, status_patch
from kubetune.operator.runtime.kube import collection_path
from kubetune.operator.runtime.metrics import OperatorMetrics
from kubetune.operator.runtime.passes import Controller
from kubetune.operator.runtime.progress_reader import bounded_report
from kubetune.operator.runtime.workqueue import WorkQueue
from kubetune.operator.settings import OperatorSettings

SETTINGS = OperatorSettings()


class Pass:
    """Runs passes over one FineTuneJob document, as the handlers would."""

    def __init__(self, doc: dict[str, Any], cluster: FakeCluster | None = None) -> None:
        self.doc = doc
        self.cluster = cluster or FakeCluster(S3_KEYS)
        self.metrics = OperatorMetrics()
        self.now = NOW

    def __call__(self) -> Any:
        self.now += timedelta(seconds=10)
        return reconcile(self.cluster.body(self.doc), self.cluster, SETTINGS, self.metrics, self.now)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


def _running_pods(cluster: FakeCluster, uid: str, nodes: int = 1) -> None:
    cluster.pods = [make_pod("corgi", i).owner(uid).running().pod_ip("10.0.0.5").obj() for i in range(nodes)]


def test_a_job_from_creation_to_success_through_one_restart() -> None:
    run = Pass(make_job("corgi").obj())
    first = run()
    assert [a.obj["kind"] for a in first.actions if isinstance(a, CreateChild)] == ["ConfigMap", "Service", "Job"]
    assert run.cluster.status["phase"] == "Pending"
    assert run.metric("kubetune_operator_jobs_created_total", namespace="team-a") == 1

    cluster = run.cluster
    uid = cluster.batch_job("corgi")["metadata"]["uid"]
    cluster.set_job_status("corgi", active=1, ready=1, startTime="2026-11-21T12:00:05Z")
    _running_pods(cluster, uid)
    cluster.progress = bounded_report({"stage": "training", "step": 40, "totalSteps": 100, "smoothedLoss": 0.2,
                                       "checkpoints": [{"step": 25, "uri": "s3://outputs/corgi/checkpoints/step-25/"}]})
    run()
    assert cluster.status["phase"] == "Running"
    assert cluster.status["progress"]["percent"] == 40
    assert cluster.status["checkpoints"][-1]["step"] == 25
    assert cluster.status["workers"]["ready"] == 1

    cluster.finish_job("corgi", "Failed", "BackoffLimitExceeded")
    cluster.pods = [make_pod("corgi", 0).owner(uid).failed(137, "OOMKilled").obj()]
    restart = run()
    assert restart.actions == [DeleteJob("corgi", uid)]
    assert (cluster.status["phase"], cluster.status["restarts"]) == ("Restarting", 1)
    assert run.metric("kubetune_operator_jobs_restarted_total", namespace="team-a") == 1

    cluster.remove_job("corgi")
    again = run()
    (create,) = again.actions
    assert isinstance(create, CreateChild) and create.obj["metadata"]["annotations"]["kubetune.io/restarts"] == "1"
    assert cluster.status["phase"] == "Restarting"

    cluster.finish_job("corgi", "Complete")
    cluster.pods = [make_pod("corgi", 0).owner(cluster.batch_job("corgi")["metadata"]["uid"]).succeeded(
        '{"outputs": {"uri": "s3://outputs/corgi/final/"}, "step": 100, "totalSteps": 100}').obj()]
    run()
    assert cluster.status["phase"] == "Succeeded"
    assert cluster.status["outputs"]["uri"] == "s3://outputs/corgi/final/"
    assert cluster.status["progress"]["percent"] == 100
    assert cluster.status["checkpoints"][-1]["step"] == 25, "checkpoints survive the restart"
    assert run.metric("kubetune_operator_jobs_succeeded_total", namespace="team-a") == 1
    assert run.metric("kubetune_operator_jobs", namespace="team-a", phase="Succeeded") == 1
    assert run.metric("kubetune_operator_jobs", namespace="team-a", phase="Running") == 0
    reasons = [e.reason for e in cluster.events]
    assert reasons == ["Creating", "ChildrenCreated", "Training", "CheckpointSaved", "Restarting", "Succeeded"]


def test_a_pass_that_changes_nothing_writes_nothing() -> None:
    run = Pass(make_job("corgi").obj())
    run()
    writes, events = len(run.cluster.status_writes), len(run.cluster.events)
    run.cluster.children.pop(("Job", "corgi"))  # the same observation as the first pass
    outcome = run()
    assert outcome.events == [] and len(run.cluster.events) == events
    assert not outcome.wrote_status and len(run.cluster.status_writes) == writes
    assert status_patch(run.cluster.status, outcome.status) is None


def test_invalid_spec_fails_naming_the_field_and_creates_nothing() -> None:
    doc = make_job("corgi").set("spec.training.epochs", 3).obj()
    run = Pass(doc)
    outcome = run()
    assert outcome.actions == [] and run.cluster.children == {}
    assert run.cluster.status["phase"] == "Failed"
    failed = next(c for c in run.cluster.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.training.maxSteps" in failed["message"]
    assert [(e.type, e.reason) for e in run.cluster.events] == [("Warning", "InvalidSpec")]


def test_missing_secret_waits_with_one_warning_and_no_error() -> None:
    run = Pass(make_job("corgi").secret("s3").obj(), FakeCluster(secret_keys=None))
    first, second = run(), run()
    assert first.errors == second.errors == [] and run.cluster.children == {}
    assert run.cluster.status["phase"] == "Pending"
    assert "Secret s3" in run.cluster.status["message"]
    assert [e.reason for e in run.cluster.events] == ["SecretNotFound"]
    run.cluster.secret_keys = S3_KEYS
    run()
    assert ("Job", "corgi") in run.cluster.children


def test_failed_action_keeps_the_status_true_and_is_reported() -> None:
    cluster = FakeCluster(S3_KEYS)
    cluster.fail_actions = {CreateChild}
    outcome = Pass(make_job("corgi").obj(), cluster)()
    assert len(outcome.errors) == 3 and "injected" in outcome.errors[0]
    assert cluster.status["phase"] == "Pending"


def test_ttl_deletes_the_finished_job_without_writing_status() -> None:
    doc = make_job("corgi").ttl(5).obj()
    doc["status"] = {"phase": "Succeeded", "completionTime": "2026-11-21T11:00:00Z",
                     "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded"}]}
    cluster = FakeCluster(S3_KEYS)
    cluster.status = doc.pop("status")
    outcome = Pass(doc, cluster)()
    assert outcome.actions == [DeleteFineTuneJob()] and cluster.deleted and cluster.status_writes == []


def _controller(cluster: FakeCluster, *names: str) -> Controller:
    controller = Controller(cluster, SETTINGS, OperatorMetrics())
    controller.synced.set()
    for name in names:
        controller.caches["FineTuneJob"].put(cluster.body(make_job(name).obj()))
    return controller


def test_a_pass_turns_api_errors_into_a_retry_after_a_delay() -> None:
    cluster = FakeCluster(S3_KEYS)
    cluster.fail_observe = True
    controller = _controller(cluster, "corgi")
    assert controller.run_pass(("team-a", "corgi")) is False
    metrics = controller.metrics.registry
    assert metrics.get_sample_value("kubetune_operator_api_errors_total", {"operation": "reconcile"}) == 1
    assert metrics.get_sample_value("kubetune_operator_reconcile_duration_seconds_count") == 1
    assert controller.queue._later and len(controller.queue) == 0, "queued again, after the retry delay"


def test_a_pass_retries_failed_actions(caplog: pytest.LogCaptureFixture) -> None:
    cluster = FakeCluster(S3_KEYS)
    cluster.fail_actions = {CreateChild}
    controller = _controller(cluster, "corgi")
    assert controller.run_pass(("team-a", "corgi")) is False
    assert "CreateChild" in caplog.text and controller.queue._later
    assert controller.metrics.registry.get_sample_value("kubetune_operator_api_errors_total",
                                                        {"operation": "apply"}) == 3


@pytest.mark.parametrize(("kind", "namespace", "path"), [
    ("FineTuneJob", None, "/apis/kubetune.io/v1alpha1/finetunejobs"),
    ("FineTuneJob", "a", "/apis/kubetune.io/v1alpha1/namespaces/a/finetunejobs"),
    ("Job", "a", "/apis/batch/v1/namespaces/a/jobs"),
    ("Pod", None, "/api/v1/pods"),
    ("ConfigMap", "b", "/api/v1/namespaces/b/configmaps"),
])
def test_caches_list_where_the_operator_watches(kind: str, namespace: str | None, path: str) -> None:
    assert collection_path(kind, namespace) == path


def _drain(controller: Controller) -> list[bool]:
    results = []
    while (key := controller.queue.get(timeout=0)) is not None:
        results.append(controller.run_pass(key))  # type: ignore[arg-type]
        controller.queue.done(key)
    return results


def test_resync_queues_every_cached_job_once_and_the_workers_reconcile_them() -> None:
    cluster = FakeCluster(S3_KEYS)
    controller = _controller(cluster, "a", "b")
    controller.resync()
    controller.resync()  # a second round while the first is queued asks for nothing more
    assert len(controller.queue) == 2
    assert _drain(controller) == [True, True]
    assert {name for kind, name in cluster.children if kind == "Job"} == {"a", "b"}


def test_a_failed_queued_pass_is_retried_later_and_a_deleted_job_is_skipped() -> None:
    cluster = FakeCluster(S3_KEYS)
    cluster.fail_observe = True
    controller = _controller(cluster, "a")
    controller.queue.add(("team-a", "a"))
    controller.queue.add(("team-a", "gone"))
    assert _drain(controller) == [False, True]
    assert len(controller.queue) == 0 and controller.queue.get(timeout=0) is None  # the retry waits its delay
    assert controller.metrics.registry.get_sample_value("kubetune_operator_api_errors_total",
                                                        {"operation": "reconcile"}) == 1


class BusyCluster(FakeCluster):
    """Other jobs' children are being created while this pass runs."""

    def others_first(self, ref: Any) -> bool:
        return True


def test_in_a_burst_the_status_of_a_job_just_created_waits_for_the_next_pass() -> None:
    run = Pass(make_job("corgi").obj(), BusyCluster(S3_KEYS))
    first = run()
    assert first.deferred and not first.wrote_status and first.events == []
    assert {a.obj["kind"] for a in first.actions if isinstance(a, CreateChild)} == {"ConfigMap", "Service", "Job"}
    assert run.cluster.status_writes == [] and run.cluster.events == []
    second = run()
    assert not second.deferred and second.actions == [], "nothing created twice"
    assert run.cluster.status["phase"] == "Pending"
    assert [e.reason for e in run.cluster.events][:1] == ["ChildrenCreated"]


def test_a_deferred_status_is_queued_behind_the_new_jobs() -> None:
    cluster = BusyCluster(S3_KEYS)
    controller = _controller(cluster, "corgi")
    controller.queue = WorkQueue(yield_seconds=2.0)
    controller.queue.add(("team-a", "husky"), urgent=True)  # another new job, waiting for its children
    assert controller.run_pass(("team-a", "corgi")) is True and cluster.status_writes == []
    assert controller.queue.get(timeout=0) == ("team-a", "husky"), "the other job's children first"
    threading.Timer(0.2, controller.queue.done, args=(("team-a", "husky"),)).start()
    began = time.monotonic()
    assert controller.queue.get(timeout=0) == ("team-a", "corgi"), "then a routine pass writes the status"
    assert 0.15 < time.monotonic() - began < 1.5, "once the new job's pass has ended"


def test_a_pass_that_fails_unexpectedly_is_retried_and_the_worker_lives_on() -> None:
    class Broken(FakeCluster):
        def observe(self, job: Any) -> Any:
            raise RuntimeError("a bug")

    controller = _controller(Broken(S3_KEYS), "corgi")
    assert controller.run_pass(("team-a", "corgi")) is False
    assert controller.queue._later, "the job is queued again, after the retry delay"
