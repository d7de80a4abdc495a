"""The operator's edges on loopback: the probes/metrics endpoint and its liveness, reading rank 0's
progress through the cluster seam, the Lease decisions, operator metrics and the `kubetune operator`
command line. (The progress reader's defences: `test_progress_reader.py`.)"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import fakegpu
import pytest
from ftj_builders import NOW, make_pod

from kubetune.api.status import FineTuneJobStatus
from kubetune.cli import build_parser
from kubetune.operator.runtime.kube_cluster import KubeCluster
from kubetune.operator.runtime.leader import lease_decision, micro_time, next_lease_spec
from kubetune.operator.runtime.liveness import PassClock, stuck_reason
from kubetune.operator.runtime.metrics import OperatorMetrics
from kubetune.operator.runtime.probes import serve_probes
from kubetune.operator.runtime.progress_reader import ProgressReader, bounded_report, progress_url
from kubetune.operator.runtime.workqueue import WorkQueue


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_probes_serve_metrics_health_and_readiness() -> None:
    metrics, ready = OperatorMetrics(), threading.Event()
    metrics.observe_transition("u1", "team-a", FineTuneJobStatus(), FineTuneJobStatus(phase="Pending"))
    server = serve_probes(metrics.registry, 0, ready.is_set, host="127.0.0.1")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _get(f"{base}/healthz")[0] == 200
        assert _get(f"{base}/readyz")[0] == 503, "a standby replica is alive but not ready"
        ready.set()
        assert _get(f"{base}/readyz")[0] == 200
        code, text = _get(f"{base}/metrics")
        assert code == 200
        assert 'kubetune_operator_jobs{namespace="team-a",phase="Pending"} 1.0' in text
        assert 'kubetune_operator_jobs_created_total{namespace="team-a"} 1.0' in text
        assert _get(f"{base}/nope")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


class _Rank0(BaseHTTPRequestHandler):
    body = b"{}"

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/progress" else 404)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def rank0() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Rank0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("body", "expected"), [
    (json.dumps({"stage": "training", "step": 3}).encode(), {"stage": "training", "step": 3}),
    (b"not json", None),
])
def test_take_progress_from_rank0_on_loopback(rank0: ThreadingHTTPServer, body: bytes, expected: Any) -> None:
    from ftj_builders import make_job

    from kubetune.api.validation import validate_document

    _Rank0.body = body
    job = validate_document(make_job("corgi").obj()).job
    reader = ProgressReader(rank0.server_address[1], deadline=2)
    cluster = KubeCluster(api=None, progress=reader)  # type: ignore[arg-type]
    pod = make_pod().running().pod_ip("127.0.0.1").obj()
    try:
        assert cluster.take_progress(job, pod) is None, "the pass never waits: the read starts now"
        state = fakegpu.wait_for(lambda: (s := reader.state(("team-a", "corgi"))) and not s.in_flight and s,
                                 what="the read")
        taken = cluster.take_progress(job, pod)
        assert taken == (expected and bounded_report(expected)) and (state.failures == 0) == (expected is not None)
    finally:
        cluster.close()
        reader.close()


def test_unreachable_rank0_reads_as_nothing() -> None:
    reader = ProgressReader(9, deadline=0.5)
    pod = make_pod().running().pod_ip("127.0.0.1").obj()
    try:
        reader.take("k", pod)
        state = fakegpu.wait_for(lambda: (s := reader.state("k")) and s.failures and s, what="the read to fail")
        assert "ClientConnectorError" in state.error and reader.take("k", pod) is None
    finally:
        reader.close()


@pytest.mark.parametrize(("ip", "url"), [
    (None, None),
    ("10.1.2.3", "http://10.1.2.3:9090/progress"),
    ("fd00::5", "http://[fd00::5]:9090/progress"),
])
def test_progress_url(ip: str | None, url: str | None) -> None:  # non-IP hosts: test_progress_reader.py
    pod = make_pod().running()
    if ip:
        pod.pod_ip(ip)
    assert progress_url(pod.obj(), 9090) == url


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_liveness_fails_on_a_long_pass_or_unattended_queue_and_recovers() -> None:
    clock = _Clock()
    passes, queue = PassClock(clock), WorkQueue(clock)
    assert stuck_reason(passes, queue, 60) is None
    with passes.running(("ns", "slow")):
        clock.now += 30
        with passes.running(("ns", "quick")):
            assert stuck_reason(passes, queue, 60) is None
        clock.now += 31
        assert stuck_reason(passes, queue, 60) == "the reconcile pass of ns/slow has run for 61s (limit 60s)"
    assert stuck_reason(passes, queue, 60) is None
    queue.add("a")
    clock.now += 59
    queue.add("b")
    assert queue.get(timeout=0) == "a"
    clock.now += 59  # a key is taken every minute: busy, not stuck
    assert stuck_reason(passes, queue, 60) is None
    clock.now += 2
    assert stuck_reason(passes, queue, 60) == "queued reconcile passes have waited 61s for a worker (limit 60s)"
    assert queue.get(timeout=0) == "b"
    assert stuck_reason(passes, queue, 60) is None
    clock.now += 600  # idle for long, then new work: it has not waited yet
    queue.add("c")
    assert queue.waiting_seconds() == 0 and stuck_reason(passes, queue, 60) is None


def test_healthz_fails_while_the_operator_is_stuck() -> None:
    reason: list[str] = []
    server = serve_probes(OperatorMetrics().registry, 0, lambda: True, host="127.0.0.1",
                          stuck=lambda: reason[0] if reason else None)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _get(f"{base}/healthz") == (200, "ok\n")
        reason.append("the reconcile pass of ns/a has run for 200s (limit 180s)")
        assert _get(f"{base}/healthz") == (503, "stuck: the reconcile pass of ns/a has run for 200s (limit 180s)\n")
        assert _get(f"{base}/readyz")[0] == 200
        reason.clear()
        assert _get(f"{base}/healthz")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


FRESH = micro_time(NOW - timedelta(seconds=5))
STALE = micro_time(NOW - timedelta(seconds=60))


@pytest.mark.parametrize(("spec", "decision"), [
    (None, "create"),
    ({"holderIdentity": "me", "renewTime": STALE, "leaseDurationSeconds": 15}, "renew"),
    ({"holderIdentity": "other", "renewTime": FRESH, "leaseDurationSeconds": 15}, "standby"),
    ({"holderIdentity": "other", "renewTime": STALE, "leaseDurationSeconds": 15}, "take-over"),
    ({"holderIdentity": "", "renewTime": FRESH, "leaseDurationSeconds": 15}, "take-over"),
    ({"holderIdentity": "other"}, "take-over"),
])
def test_lease_decision(spec: dict[str, Any] | None, decision: str) -> None:
    assert lease_decision(spec, "me", NOW) == decision


def test_next_lease_spec_counts_transitions_only_on_take_over() -> None:
    old = {"holderIdentity": "other", "renewTime": STALE, "leaseDurationSeconds": 15, "leaseTransitions": 2}
    taken = next_lease_spec(old, "me", NOW, 15, "take-over")
    assert (taken["holderIdentity"], taken["leaseTransitions"], taken["renewTime"]) == ("me", 3, micro_time(NOW))
    renewed = next_lease_spec(taken, "me", NOW + timedelta(seconds=2), 15, "renew")
    assert renewed["leaseTransitions"] == 3 and renewed["acquireTime"] == taken["acquireTime"]


def test_metrics_count_transitions_and_forget_deleted_jobs() -> None:
    metrics = OperatorMetrics()
    sample = metrics.registry.get_sample_value
    running, failed = FineTuneJobStatus(phase="Running"), FineTuneJobStatus(phase="Failed")
    metrics.observe_transition("a", "ns", FineTuneJobStatus(), running)
    metrics.observe_transition("b", "ns", FineTuneJobStatus(), running)
    metrics.observe_transition("a", "ns", running, failed)
    metrics.observe_transition("a", "ns", failed, failed)
    assert sample("kubetune_operator_jobs_failed_total", {"namespace": "ns"}) == 1
    assert sample("kubetune_operator_jobs", {"namespace": "ns", "phase": "Running"}) == 1
    metrics.forget("b")
    assert sample("kubetune_operator_jobs", {"namespace": "ns", "phase": "Running"}) == 0


def test_operator_command_line() -> None:
    args = build_parser().parse_args(["operator", "-n", "a", "-n", "b", "--no-leader-election",
                                      "--trainer-image", "reg/img:1"])
    assert (args.namespaces, args.no_leader_election, args.trainer_image) == (["a", "b"], True, "reg/img:1")
    chart = build_parser().parse_args(["operator", "--all-namespaces", "--log-level=info"])
    assert (chart.namespaces, chart.log_level) == (None, "info")


def test_kopf_logs_in_with_the_operators_own_credentials() -> None:
    from kubernetes import client

    from kubetune.operator.runtime.handlers import connection_info

    configuration = client.Configuration()
    configuration.host = "https://127.0.0.1:6443"
    configuration.ssl_ca_cert, configuration.cert_file, configuration.key_file = "/ca.crt", "/c.crt", "/c.key"
    info = connection_info(configuration)
    assert (info.server, info.ca_path, info.certificate_path, info.private_key_path, info.token) == (
        "https://127.0.0.1:6443", "/ca.crt", "/c.crt", "/c.key", None)
    configuration.api_key, configuration.api_key_prefix = {"BearerToken": "t0k"}, {"BearerToken": "Bearer"}
    assert connection_info(configuration).token == "t0k"


class _PodListApi:
    def __init__(self, pods: list[dict]) -> None:
        self.pods = pods
        self.listed: list[str] = []

    def get(self, path: str, labelSelector: str) -> dict:
        self.listed.append(labelSelector)
        return {"items": self.pods}


def test_an_ended_job_is_judged_by_pods_read_from_the_server_not_the_cache() -> None:
    from ftj_builders import JOB_UID, make_job

    from kubetune.api.validation import validate_document

    job = validate_document(make_job("corgi").obj()).job
    owner = [{"kind": "FineTuneJob", "uid": JOB_UID, "controller": True}]
    batch = {"kind": "Job", "metadata": {"name": "corgi", "namespace": "team-a", "resourceVersion": "5",
                                         "ownerReferences": owner}, "status": {}}
    stale, ended = make_pod("corgi", 0).running().obj(), make_pod("corgi", 0).failed(1, "Error").obj()
    for pod in (stale, ended):
        pod["metadata"].update(namespace="team-a", labels={"kubetune.io/job-name": "corgi"})
    api = _PodListApi([ended])
    cluster = KubeCluster(api=api)  # type: ignore[arg-type]
    cluster.caches.put(batch)
    cluster.caches["Pod"].put(stale)
    assert cluster.observe(job).pods == (stale,) and api.listed == []  # running: the cache is enough
    cluster.caches.put({**batch, "metadata": {**batch["metadata"], "resourceVersion": "6"},
                        "status": {"conditions": [{"type": "Failed", "status": "True"}]}})
    assert cluster.observe(job).pods == (ended,) and api.listed == ["kubetune.io/job-name=corgi"]
    cluster.close()


def test_a_worker_pool_stuck_in_a_pass_fails_healthz_until_the_pass_ends() -> None:
    """Real queue workers and probes; the seam faked is the project's own Cluster, whose reads hang."""
    from fake_cluster import FakeCluster
    from ftj_builders import S3_KEYS, make_job

    from kubetune.operator.runtime.passes import Controller
    from kubetune.operator.settings import OperatorSettings

    release = threading.Event()

    class Hanging(FakeCluster):
        def observe(self, job: Any) -> Any:
            release.wait(30)
            return super().observe(job)

    controller = Controller(Hanging(S3_KEYS), OperatorSettings(), OperatorMetrics())
    queue, passes, stop = controller.queue, controller.passes, threading.Event()
    controller.caches["FineTuneJob"].put(make_job("corgi").obj())
    workers = [threading.Thread(target=controller.work, daemon=True) for _ in range(2)]
    server = serve_probes(controller.metrics.registry, 0, lambda: True, host="127.0.0.1",
                          stuck=lambda: stuck_reason(passes, queue, 0.3))
    healthz = f"http://127.0.0.1:{server.server_address[1]}/healthz"
    try:
        for worker in workers:
            worker.start()
        assert _get(healthz)[0] == 200
        queue.add(("team-a", "corgi"))
        code, text = fakegpu.wait_for(lambda: (r := _get(healthz))[0] != 200 and r, what="/healthz to fail")
        assert code == 503 and "the reconcile pass of team-a/corgi has run for" in text
        release.set()
        fakegpu.wait_for(lambda: _get(healthz)[0] == 200, what="/healthz to recover")
        assert controller.cluster.status["phase"] == "Pending", "the pass ended and wrote its status"
    finally:
        release.set()
        stop.set()
        queue.close()
        server.shutdown()
        server.server_close()
