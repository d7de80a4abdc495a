"""Real Prometheus scrapes a running trainer (`kubetune run`) and a running operator on
loopback; loss and step come back through its HTTP API. Both live expositions pass
`promtool check metrics`, and the dashboard and alerts use only names they expose."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from charts.dashboard import expressions
from kubetune_demo.tiny import build_image_dataset, build_tiny_pipeline
from tests.tools import needs_tools
from tests.trainer.trainer_support import free_port, job_document
from tests.unit.test_monitoring import DCGM_EXPORTER, METRIC, _alert_rules

pytestmark = [
    pytest.mark.integration,
    needs_tools("prometheus", "promtool"),
]


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _wait(check: Callable[[], object], what: str, seconds: float = 120.0) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if found := check():
                return found
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in reversed(started):
        _stop(process)


def _trainer(tmp_path: Path, port: int) -> list[str]:
    model = build_tiny_pipeline(tmp_path / "model")
    data = build_image_dataset(tmp_path / "data", count=8, size=64)
    doc = job_document(
        str(model), str(data), str(tmp_path / "out"), output={"checkpointEvery": 100000}, training={"maxSteps": 100000}
    )
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    return [
        sys.executable,
        "-m",
        "kubetune.cli",
        "run",
        str(job),
        "--port",
        str(port),
        "--no-progress",
        "--scratch",
        str(tmp_path / "scratch"),
    ]


def _prometheus(tmp_path: Path, port: int, targets: dict[str, int]) -> list[str]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{p}"]}]} for name, p in targets.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    return [
        "prometheus",
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]


def _query(prom_port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    body = json.loads(_get(url))
    assert body["status"] == "success", body
    return body["data"]["result"]


def _exposed_names(exposition: str) -> set[str]:
    """Series names an exposition declares (TYPE lines, even before a first sample) or carries."""
    declared = re.findall(r"^# TYPE (\S+) (\S+)", exposition, re.M)
    names = {
        name + s for name, kind in declared for s in (("_bucket", "_sum", "_count") if kind == "histogram" else ("",))
    }
    return names | set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", exposition, re.M))


def _promtool_check_metrics(exposition: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True)


def test_prometheus_reads_loss_and_step_from_trainer_and_operator(
    tmp_path: Path,
    processes: list[subprocess.Popen],
    kube_cluster,
    kube_admin,
    namespace: str,
    finetunejob_crd: str,
    kubectl,
) -> None:
    trainer_port, operator_port, prom_port = free_port(), free_port(), free_port()
    processes.append(_spawn(_trainer(tmp_path, trainer_port), tmp_path / "trainer.log"))
    processes.append(
        _spawn(
            [
                sys.executable,
                "-m",
                "kubetune.cli",
                "operator",
                "--namespace",
                namespace,
                "--kubeconfig",
                str(kube_cluster.kubeconfig),
                "--http-port",
                str(operator_port),
            ],
            tmp_path / "operator.log",
        )
    )
    job = Path("examples/lora-sd15.yaml").read_text().replace("namespace: team-a", f"namespace: {namespace}")
    assert kubectl("apply", "-f", "-", stdin=job).returncode == 0
    processes.append(
        _spawn(
            _prometheus(tmp_path, prom_port, {"trainer": trainer_port, "operator": operator_port}),
            tmp_path / "prometheus.log",
        )
    )

    step = _wait(lambda: [r for r in _query(prom_port, 'kubetune_trainer_step{job="trainer"} > 0')], "a step > 0")
    assert step[0]["metric"]["name"] == "test-lora" and step[0]["metric"]["namespace"] == "tests"
    loss = _wait(lambda: _query(prom_port, "kubetune_trainer_smoothed_loss"), "the smoothed loss")
    assert float(loss[0]["value"][1]) > 0
    created = _wait(
        lambda: _query(prom_port, f'kubetune_operator_jobs_created_total{{namespace="{namespace}"}}'),
        "the operator's created counter",
    )
    assert float(created[0]["value"][1]) == 1

    live = {
        name: _get(f"http://127.0.0.1:{port}/metrics").decode()
        for name, port in (("trainer", trainer_port), ("operator", operator_port))
    }
    for name, exposition in live.items():
        out = _promtool_check_metrics(exposition)
        assert out.returncode == 0 and not out.stdout.strip(), f"{name}: {out.stdout}{out.stderr}"
    exposed = set().union(*(_exposed_names(e) for e in live.values()))
    used = {m for expr in expressions() for m in METRIC.findall(expr)}
    used |= {m for group in _alert_rules()["groups"] for r in group["rules"] for m in METRIC.findall(r["expr"])}
    assert used - DCGM_EXPORTER <= exposed, sorted(used - DCGM_EXPORTER - exposed)
