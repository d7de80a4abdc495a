"""End to end: a 2-node FineTuneJob loses one node mid-training and still ends as if nothing happened.

Every pod of the job runs on this host (`LocalPodRunner`: each pod its own loopback address, the
headless Service's names resolved to them). Once a complete checkpoint exists, one pod's
processes are SIGKILLed and the pod gets the `DisruptionTarget` condition, as after a node loss.
The Job fails at once (podFailurePolicy), the operator deletes it (the runner turns the deletion
into SIGTERM for the survivor, as a kubelet does), creates the next attempt without counting the
disruption (`backoffLimit: 0` leaves no room for a counted one), and both ranks resume from the
newest complete checkpoint. Run once losing rank 0 (which hosts torchrun's rendezvous store) and
once losing rank 1. The final weights must equal those of an uninterrupted 2-rank run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakegpu
import pytest
import yaml
from cluster_support import batch_job, create, event_reasons, free_port, running_pods, wait_phase
from e2e_support import (
    CREDENTIALS,
    DATA_URI,
    MODEL_URI,
    SECRET_NAME,
    complete_checkpoints,
    create_credentials,
    read_object,
)
from kubernetes import client
from podrunner import LocalPodRunner, RunningPod

from kubetune.operator.observed import completion_index
from kubetune_trainer.lora_files import DIFFUSERS_FILE
from kubetune_trainer.trace import TRACE_ENV

pytestmark = pytest.mark.e2e

MAX_STEPS, CHECKPOINT_EVERY = 6, 2
TOLERANCE = 1e-3
"""bf16 (the API default): the restarted run may round differently from the uninterrupted one."""


def _manifest(namespace: str, name: str, endpoint: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": MODEL_URI},
            "method": {"type": "lora", "lora": {"rank": 4, "alpha": 8}},
            "data": {"uri": DATA_URI, "resolution": 64},
            "output": {"uri": f"s3://outputs/{name}/", "checkpointEvery": CHECKPOINT_EVERY,
                       "keepCheckpoints": MAX_STEPS},
            "training": {"maxSteps": MAX_STEPS, "batchSize": 2, "learningRate": 1.0e-3, "seed": 5},
            "storage": {"endpoint": endpoint, "secretRef": {"name": SECRET_NAME}},
            "resources": {"nodes": 2, "gpusPerNode": 1, "cpu": "2", "memory": "4Gi"},
            "runPolicy": {"backoffLimit": 0, "terminationGracePeriodSeconds": 30},
        },
    }


def _lora_weights(s3: Any, output_uri: str) -> dict[str, Any]:
    from safetensors.torch import load

    return load(read_object(s3, f"{output_uri}final/{DIFFUSERS_FILE}"))


def _steps(trace: Path, rank: int = 0) -> list[int]:
    """The optimizer steps a rank recorded (after each step's checkpoint, if one was due)."""
    path = trace / f"rank-{rank}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r["step"] for r in map(json.loads, lines) if r["event"] == "step"]


def _last_step(trace: Path) -> int:
    return max([0, *_steps(trace, 0), *_steps(trace, 1)])


@pytest.fixture(scope="module")
def uninterrupted(s3: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same job trained by two `kubetune train` processes on this host (one per node), never stopped."""
    root = tmp_path_factory.mktemp("uninterrupted")
    doc = _manifest("reference", "uninterrupted", s3.endpoint)
    (root / "job.yaml").write_text(yaml.safe_dump(doc))
    port = free_port()
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, **CREDENTIALS, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "kubetune.cli", "train", "--config", str(root / "job.yaml"),
                   "--port", "0", "--termination-log", str(root / f"termination-{rank}"),
                   "--scratch", str(root / f"scratch-{rank}")]
        with (root / f"log-{rank}").open("wb") as log:
            ranks.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=600) for p in ranks]
    assert codes == [0, 0], (root / "log-0").read_text()[-3000:] + (root / "log-1").read_text()[-3000:]
    return _lora_weights(s3, doc["spec"]["output"]["uri"])


@pytest.fixture
def runners() -> Iterator[list[LocalPodRunner]]:
    """Every runner a test made; whatever they still run is killed when the test ends."""
    made: list[LocalPodRunner] = []
    yield made
    for runner in made:
        runner.close()


def _start_attempt(api: client.ApiClient, namespace: str, name: str, folder: Path, runners: list[LocalPodRunner],
                   previous_uid: str = "") -> tuple[LocalPodRunner, list[RunningPod], Path, str]:
    """Run every pod of the attempt's Job on this host, rank 0 first (the others resolve its name)."""
    uid = fakegpu.wait_for(lambda: _job_uid(api, namespace, name, previous_uid), timeout=180, what=f"Job {name}")
    pods = running_pods(api, namespace, 2, job_uid=uid, name=name)
    trace = folder / "trace"
    runner = LocalPodRunner(api, folder, extra_env={TRACE_ENV: str(trace)})
    runners.append(runner)
    ordered = sorted(pods, key=lambda p: completion_index(api.sanitize_for_serialization(p)))
    return runner, [runner.start(namespace, p.metadata.name) for p in ordered], trace, str(uid)


def _job_uid(api: client.ApiClient, namespace: str, name: str, previous_uid: str) -> str | None:
    """The uid of the job's live batch Job, once it is not `previous_uid`."""
    try:
        job = batch_job(api, namespace, name)
    except client.ApiException:
        return None
    fresh = job.metadata.uid != previous_uid and job.metadata.deletion_timestamp is None
    return job.metadata.uid if fresh else None


def _max_difference(got: dict[str, Any], expected: dict[str, Any]) -> float:
    assert sorted(got) == sorted(expected)
    return max(float((got[k].float() - expected[k].float()).abs().max()) for k in expected)


@pytest.mark.parametrize("lost_rank", [0, 1], ids=["rank-0-lost", "rank-1-lost"])
def test_a_lost_node_restarts_every_rank_from_the_newest_checkpoint(
        lost_rank: int, kube_admin, namespace, start_operator, s3, uninterrupted, runners, tmp_path: Path) -> None:
    name, started = f"lost-rank-{lost_rank}", time.monotonic()
    output = f"s3://outputs/{name}/"
    create_credentials(kube_admin, namespace)
    start_operator(metrics_port=free_port(), master_port=free_port(), progress_timeout_seconds=1.0)
    create(kube_admin, _manifest(namespace, name, s3.endpoint))

    runner, first, first_trace, first_uid = _start_attempt(kube_admin, namespace, name, tmp_path / "attempt-1",
                                                           runners)
    fakegpu.wait_for(lambda: complete_checkpoints(s3, output) or any(p.done.is_set() for p in first),
                     timeout=300, interval=0.05, what="a complete checkpoint")
    assert not any(p.done.is_set() for p in first), [p.output()[-3000:] for p in first]
    runner.lose(first[lost_rank])
    survivor = first[1 - lost_rank].wait(timeout=120)  # its collective broke, or the Job's deletion stopped it
    newest = complete_checkpoints(s3, output)[-1]  # every process of the first attempt has ended

    _, second, second_trace, _ = _start_attempt(kube_admin, namespace, name, tmp_path / "attempt-2", runners,
                                                first_uid)
    ended = [p.wait(timeout=600) for p in second]
    assert [e.exit_code for e in ended] == [0, 0], [e.output[-3000:] for e in ended]
    done = wait_phase(kube_admin, namespace, "Succeeded", name=name, timeout=120)
    difference = _max_difference(_lora_weights(s3, output), uninterrupted)
    print(f"[e2e] rank {lost_rank} lost after step {_last_step(first_trace)}; the survivor exited "
          f"{survivor.exit_code}; resumed from step {newest}; weights within {difference:.1e} of the "
          f"uninterrupted run; {time.monotonic() - started:.0f}s in all")

    status = done["status"]
    assert status["restarts"] == 0 and "NodeDisrupted" in event_reasons(kube_admin, namespace, name)
    assert status["progress"]["step"] == MAX_STEPS
    assert CHECKPOINT_EVERY <= newest <= _last_step(first_trace) < MAX_STEPS, "lost mid-training, after a checkpoint"
    assert _steps(second_trace) == list(range(newest + 1, MAX_STEPS + 1)), "every rank resumed from the newest"
    assert difference <= TOLERANCE
