"""The operator on a real control plane: real API server, Job controller, scheduler, kwok nodes.

The operator runs in a thread under a ServiceAccount bound to the ClusterRoles and Role of
`manifests/operator.yaml`, so a missing permission fails here. Pods are driven to
their end with `fakegpu.finish_pod`, the way a trainer would end them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import fakegpu
import pytest
from cluster_support import (
    GROUP,
    LEASE,
    PLURAL,
    TIMEOUT,
    VERSION,
    RunningOperator,
    batch_job,
    condition,
    create,
    event_reasons,
    free_port,
    ftj,
    job_or_none,
    read,
    running_pods,
    wait_phase,
)
from kubernetes import client

from kubetune.operator.runtime.kube import KubeApi, collection_path, object_path
from kubetune.operator.runtime.leader import LeaderElector

pytestmark = pytest.mark.integration


def test_job_runs_on_wired_pods_and_succeeds_with_outputs(kube_admin, namespace, start_operator) -> None:
    operator = start_operator()
    create(kube_admin, ftj(namespace, nodes=2))
    pods = running_pods(kube_admin, namespace, 2)
    job = batch_job(kube_admin, namespace)
    assert job.spec.completion_mode == "Indexed" and job.spec.completions == 2
    assert job.metadata.owner_references[0].kind == "FineTuneJob"
    service = client.CoreV1Api(kube_admin).read_namespaced_service("corgi", namespace)
    assert service.spec.cluster_ip == "None"
    env = {e.name: e.value for e in pods[0].spec.containers[0].env}
    assert env["PET_MASTER_ADDR"] == "corgi-0.corgi" and env["PET_NNODES"] == "2"
    assert {p.spec.hostname for p in pods} == {"corgi-0", "corgi-1"}
    staging = wait_phase(kube_admin, namespace, "Staging")
    assert staging["status"]["workers"]["active"] == 2

    result = {"phase": "Succeeded", "exitCode": 0, "reason": "Completed", "message": "training finished",
              "step": 100, "totalSteps": 100, "checkpoints": [{"step": 100, "uri": "s3://outputs/corgi/ckpt/100/",
                                                                "createdAt": "2026-11-21T12:00:00Z"}],
              "outputs": {"uri": "s3://outputs/corgi/final/"}}
    for pod in sorted(pods, key=lambda p: p.metadata.annotations["batch.kubernetes.io/job-completion-index"]):
        fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 0, message=json.dumps(result))
    done = wait_phase(kube_admin, namespace, "Succeeded")
    assert done["status"]["outputs"]["uri"] == "s3://outputs/corgi/final/"
    assert done["status"]["progress"]["percent"] == 100
    assert condition(done, "Succeeded")["status"] == "True"
    reasons = fakegpu.wait_for(lambda: (r := event_reasons(kube_admin, namespace)) and "Succeeded" in r and r,
                               what="the Succeeded event")
    assert {"Creating", "ChildrenCreated", "Staging"} <= set(reasons)
    code, text = operator.get("/metrics")
    assert code == 200 and f'kubetune_operator_jobs_succeeded_total{{namespace="{namespace}"}} 1.0' in text


def test_failed_attempt_restarts_on_a_new_job(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace))
    [pod] = running_pods(kube_admin, namespace, 1)
    first_uid = batch_job(kube_admin, namespace).metadata.uid
    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 1, message="CUDA error: an illegal memory access")
    restarting = wait_phase(kube_admin, namespace, "Restarting")
    assert restarting["status"]["restarts"] == 1
    assert "illegal memory access" in condition(restarting, "Restarting")["message"]
    new = fakegpu.wait_for(lambda: (j := job_or_none(kube_admin, namespace)) and j.metadata.uid != first_uid and j,
                           timeout=TIMEOUT, what="a new Job for the next attempt")
    assert new.metadata.annotations["kubetune.io/restarts"] == "1"
    running_pods(kube_admin, namespace, 1, job_uid=new.metadata.uid)
    staged = wait_phase(kube_admin, namespace, "Staging")
    assert staged["status"]["restarts"] == 1


def test_config_error_fails_at_once(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace))
    [pod] = running_pods(kube_admin, namespace, 1)
    message = json.dumps({"phase": "Failed", "exitCode": 78, "reason": "ConfigError",
                          "message": "model.uri: no model_index.json under s3://models/sd15/"})
    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 78, message=message)
    failed = wait_phase(kube_admin, namespace, "Failed")
    assert condition(failed, "Failed")["reason"] == "ConfigError"
    assert "no model_index.json" in failed["status"]["message"] and failed["status"]["restarts"] == 0


def test_node_disruption_is_not_counted(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace))
    [pod] = running_pods(kube_admin, namespace, 1)
    fakegpu.add_disruption_target(kube_admin, namespace, pod.metadata.name)
    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 137)
    [replacement] = running_pods(kube_admin, namespace, 1, exclude=pod.metadata.name)
    assert replacement.metadata.annotations["batch.kubernetes.io/job-completion-index"] == "0"
    obj = wait_phase(kube_admin, namespace, "Staging")
    assert obj["status"]["restarts"] == 0


def test_a_lost_node_of_a_multi_node_job_restarts_the_whole_group_uncounted(kube_admin, namespace,
                                                                             start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, nodes=2, runPolicy={"backoffLimit": 0}))
    pods = running_pods(kube_admin, namespace, 2)
    first_uid = batch_job(kube_admin, namespace).metadata.uid
    lost = next(p for p in pods if p.metadata.annotations["batch.kubernetes.io/job-completion-index"] == "1")
    fakegpu.add_disruption_target(kube_admin, namespace, lost.metadata.name)
    fakegpu.finish_pod(kube_admin, namespace, lost.metadata.name, 137)
    restarting = wait_phase(kube_admin, namespace, "Restarting")
    assert condition(restarting, "Restarting")["reason"] == "NodeDisrupted"
    assert f"pod {lost.metadata.name} was lost" in restarting["status"]["message"]
    new = fakegpu.wait_for(lambda: (j := job_or_none(kube_admin, namespace)) and j.metadata.uid != first_uid and j,
                           timeout=TIMEOUT, what="a new Job for every rank")
    assert new.metadata.annotations["kubetune.io/restarts"] == "0"
    running_pods(kube_admin, namespace, 2, job_uid=new.metadata.uid)
    staged = wait_phase(kube_admin, namespace, "Staging")
    assert staged["status"]["restarts"] == 0
    assert "NodeDisrupted" in event_reasons(kube_admin, namespace)


def test_missing_secret_then_created(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, storage={"secretRef": {"name": "s3-credentials"}}))
    pending = fakegpu.wait_for(lambda: (o := read(kube_admin, namespace)).get("status", {}).get("message", "")
                               .startswith("Secret s3-credentials") and o, timeout=TIMEOUT, what="SecretNotFound")
    assert condition(pending, "Running")["reason"] == "SecretNotFound"
    assert job_or_none(kube_admin, namespace) is None
    client.CoreV1Api(kube_admin).create_namespaced_secret(namespace, {
        "metadata": {"name": "s3-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}})
    [pod] = running_pods(kube_admin, namespace, 1)
    refs = {e.name: e.value_from.secret_key_ref.name for e in pod.spec.containers[0].env
            if e.value_from and e.value_from.secret_key_ref}
    assert refs == {"AWS_ACCESS_KEY_ID": "s3-credentials", "AWS_SECRET_ACCESS_KEY": "s3-credentials",
                    "AWS_SESSION_TOKEN": "s3-credentials"}
    configmap = client.CoreV1Api(kube_admin).read_namespaced_config_map("corgi-config", namespace)
    assert "secret" not in configmap.data["job.yaml"].replace("secretRef", "")
    fakegpu.wait_for(lambda: "SecretNotFound" in event_reasons(kube_admin, namespace), what="the warning event")


def test_spec_the_api_server_accepts_but_the_operator_rejects(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, output={"uri": "s3://datasets/corgis/out/"}))
    failed = wait_phase(kube_admin, namespace, "Failed")
    assert condition(failed, "Failed")["reason"] == "InvalidSpec"
    assert "spec.output.uri" in failed["status"]["message"]
    assert job_or_none(kube_admin, namespace) is None


def test_suspend_and_resume(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, runPolicy={"suspend": True}))
    wait_phase(kube_admin, namespace, "Suspended")
    assert batch_job(kube_admin, namespace).spec.suspend is True
    client.CustomObjectsApi(kube_admin).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "corgi", {"spec": {"runPolicy": {"suspend": False}}})
    running_pods(kube_admin, namespace, 1)
    wait_phase(kube_admin, namespace, "Staging")


def test_kueue_queue_creates_the_job_suspended(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, scheduling={"queueName": "team-a-gpus"}))
    queued = wait_phase(kube_admin, namespace, "Suspended")
    assert condition(queued, "Suspended")["reason"] == "Queued"
    job = batch_job(kube_admin, namespace)
    assert job.spec.suspend is True and job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    client.BatchV1Api(kube_admin).patch_namespaced_job("corgi", namespace, {"spec": {"suspend": False}})
    running_pods(kube_admin, namespace, 1)
    wait_phase(kube_admin, namespace, "Staging")


def test_two_replicas_only_one_acts(kube_admin, namespace, start_operator) -> None:
    first = start_operator("op-a", lease_seconds=4)
    fakegpu.wait_for(lambda: first.get("/readyz")[0] == 200, timeout=TIMEOUT, what="op-a to lead")
    second = start_operator("op-b", lease_seconds=4)
    fakegpu.wait_for(lambda: second.get("/healthz")[0] == 200, what="op-b to be alive")
    create(kube_admin, ftj(namespace))
    running_pods(kube_admin, namespace, 1)
    assert second.get("/readyz")[0] == 503
    lease = client.CoordinationV1Api(kube_admin).read_namespaced_lease(LEASE, namespace)
    assert lease.spec.holder_identity == "op-a"
    first.halt()
    fakegpu.wait_for(lambda: second.get("/readyz")[0] == 200, timeout=TIMEOUT, what="op-b to take over")
    client.CustomObjectsApi(kube_admin).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "corgi", {"spec": {"runPolicy": {"suspend": True}}})
    wait_phase(kube_admin, namespace, "Suspended")


def test_of_two_replicas_taking_over_one_stale_lease_only_one_wins(kube_admin, namespace) -> None:
    """Both read the Lease before either writes: the second write's resourceVersion is stale, so it conflicts."""
    admin = KubeApi(kube_admin.configuration)
    stale = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    admin.request("POST", collection_path("Lease", namespace), {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": LEASE}, "spec": {"holderIdentity": "gone", "renewTime": stale,
                                                       "leaseDurationSeconds": 15}})
    seen = admin.get(object_path("Lease", namespace, LEASE))

    class ReadBeforeEitherWrote(KubeApi):
        def get_or_none(self, path: str) -> Any:
            return seen

    api = ReadBeforeEitherWrote(kube_admin.configuration)
    first, second = (LeaderElector(api, namespace, LEASE, name) for name in ("op-a", "op-b"))
    assert first.try_hold() and not second.try_hold()
    spec = admin.get(object_path("Lease", namespace, LEASE))["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("op-a", 1)


def test_pods_that_fit_no_node_are_reported(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, nodes=3))  # two untainted 8-GPU nodes
    pending = fakegpu.wait_for(
        lambda: (o := read(kube_admin, namespace)).get("status", {}).get("conditions") and
        condition(o, "Running")["reason"] == "Unschedulable" and o, timeout=TIMEOUT, what="Unschedulable")
    assert pending["status"]["phase"] == "Pending" and "nvidia.com/gpu" in pending["status"]["message"]


def test_deadline_fails_the_job(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, runPolicy={"activeDeadlineSeconds": 2}))
    failed = wait_phase(kube_admin, namespace, "Failed")
    assert condition(failed, "Failed")["reason"] == "DeadlineExceeded" and failed["status"]["restarts"] == 0


def test_ttl_deletes_the_finished_job(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, runPolicy={"ttlSecondsAfterFinished": 1}))
    [pod] = running_pods(kube_admin, namespace, 1)
    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 0, message='{"phase": "Succeeded"}')
    fakegpu.wait_for(lambda: not client.CustomObjectsApi(kube_admin).list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL)["items"], timeout=TIMEOUT, what="the TTL to delete the FineTuneJob")


def test_a_restarted_operator_adopts_what_it_finds(kube_admin, namespace, start_operator) -> None:
    # an orphaned child (its FineTuneJob deleted with propagationPolicy Orphan): labelled, no owner
    orphan_labels = {"kubetune.io/job-name": "corgi", "app.kubernetes.io/managed-by": "kubetune-operator"}
    client.CoreV1Api(kube_admin).create_namespaced_config_map(namespace, {
        "metadata": {"name": "corgi-config", "labels": orphan_labels}, "data": {"job.yaml": "stale"}})
    first = start_operator("op-a", lease_seconds=2)
    create(kube_admin, ftj(namespace))
    [pod] = running_pods(kube_admin, namespace, 1)
    wait_phase(kube_admin, namespace, "Staging")
    configmap = client.CoreV1Api(kube_admin).read_namespaced_config_map("corgi-config", namespace)
    assert configmap.metadata.owner_references[0].kind == "FineTuneJob"
    assert configmap.data["job.yaml"].startswith("apiVersion: kubetune.io/v1alpha1")
    job_uid = batch_job(kube_admin, namespace).metadata.uid
    first.halt()
    assert first.exit_code == [0]
    fakegpu.finish_pod(kube_admin, namespace, pod.metadata.name, 0,
                       message='{"phase": "Succeeded", "outputs": {"uri": "s3://outputs/corgi/final/"}}')
    start_operator("op-b", lease_seconds=2)
    done = wait_phase(kube_admin, namespace, "Succeeded")
    assert batch_job(kube_admin, namespace).metadata.uid == job_uid
    assert done["status"]["outputs"]["uri"] == "s3://outputs/corgi/final/"


def test_kubetune_operator_command_runs_and_stops_on_sigterm(kube_cluster, kube_admin, namespace,
                                                            finetunejob_crd) -> None:
    port = free_port()
    env = dict(os.environ, POD_NAMESPACE=namespace, POD_NAME="op-cli", KUBETUNE_RESYNC_SECONDS="1")
    command = [sys.executable, "-m", "kubetune.cli", "operator", "-n", namespace, "--http-port", str(port),
               "--kubeconfig", str(kube_cluster.kubeconfig), "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        probe = RunningOperator("op-cli", threading.Thread(), threading.Event(), threading.Event(), port, [])
        fakegpu.wait_for(lambda: probe.get("/readyz")[0] == 200, timeout=TIMEOUT, what="the operator to lead")
        create(kube_admin, ftj(namespace))
        fakegpu.wait_for(lambda: job_or_none(kube_admin, namespace), timeout=TIMEOUT, what="the Job")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "Traceback" not in output, output
