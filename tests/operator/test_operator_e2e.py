"""End to end: `kubectl apply` a FineTuneJob, the operator wires the pod, the pod's real command
trains the tiny model against S3 on loopback, and the FineTuneJob tells the story.

The control plane, the operator (as its ServiceAccount with the shipped RBAC) and the S3 server
(moto, in its own process) are real; `LocalPodRunner` stands in for the kubelet of the fake GPU
node and runs the rank-0 pod's command and environment on this host.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_support import condition, free_port, read, running_pods, wait_phase
from e2e_support import CREDENTIALS, DATA_URI, MODEL_URI, SECRET_NAME, create_credentials, keys_under
from kubernetes import client
from podrunner import LocalPodRunner, PodRun

pytestmark = pytest.mark.e2e


def _manifest(namespace: str, endpoint: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "corgi", "namespace": namespace},
        "spec": {
            "model": {"uri": MODEL_URI},
            "method": {"type": "lora", "lora": {"rank": 4, "alpha": 8}},
            "data": {"uri": DATA_URI, "resolution": 64},
            "output": {"uri": "s3://outputs/corgi/", "checkpointEvery": 10, "keepCheckpoints": 2},
            "training": {"maxSteps": 40, "batchSize": 2, "learningRate": 1.0e-3, "seed": 3},
            "storage": {"endpoint": endpoint, "secretRef": {"name": SECRET_NAME}},
            "resources": {"nodes": 1, "gpusPerNode": 1, "cpu": "2", "memory": "4Gi"},
        },
    }


def _watch_statuses(api: client.ApiClient, namespace: str, until: threading.Event) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def poll() -> None:
        while not until.is_set():
            seen.append(dict(read(api, namespace).get("status") or {}))
            time.sleep(0.2)

    threading.Thread(target=poll, daemon=True).start()
    return seen


def test_apply_train_and_report(kube_admin, namespace, start_operator, kubectl, s3, tmp_path: Path) -> None:
    create_credentials(kube_admin, namespace)
    start_operator(metrics_port=free_port(), progress_timeout_seconds=1.0)
    applied = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(_manifest(namespace, s3.endpoint)))
    assert applied.returncode == 0, applied.stderr

    [pod] = running_pods(kube_admin, namespace, 1)
    finished = threading.Event()
    statuses = _watch_statuses(kube_admin, namespace, finished)
    run: PodRun = LocalPodRunner(kube_admin, tmp_path).run(namespace, pod.metadata.name)
    assert run.exit_code == 0, run.output[-3000:]
    done = wait_phase(kube_admin, namespace, "Succeeded", timeout=120)
    finished.set()

    running = [s for s in statuses if s.get("phase") == "Running" and (s.get("progress") or {}).get("step")]
    assert running, f"never saw phase Running with a step; phases seen: {sorted({s.get('phase') for s in statuses})}"
    assert {"Staging", "Running"} <= {s.get("phase") for s in statuses}

    status = done["status"]
    assert condition(done, "Succeeded")["status"] == "True"
    assert status["progress"]["step"] == 40 and status["progress"]["percent"] == 100
    assert status["progress"]["smoothedLoss"] > 0
    assert [c["step"] for c in status["checkpoints"]] == [20, 30]  # every 10 steps, newest 2; step 40 is the output
    for checkpoint in status["checkpoints"]:
        assert keys_under(s3, checkpoint["uri"]), f"{checkpoint['uri']} is listed in status but not in S3"
    assert status["outputs"]["uri"].startswith("s3://outputs/corgi/")
    assert keys_under(s3, status["outputs"]["uri"]), status["outputs"]
    secret = CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    assert secret not in str(done) and secret not in run.termination_message

    table = kubectl("get", "ftj", "corgi", "-n", namespace)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:5] == ["NAME", "PHASE", "PROGRESS", "STEP", "LOSS"]
    name, phase, progress, step, loss = row.split()[:5]
    assert (name, phase, progress, step) == ("corgi", "Succeeded", "100", "40") and float(loss) > 0
