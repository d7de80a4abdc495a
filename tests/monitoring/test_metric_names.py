"""The numbers say what they are: docs/observability.md lists exactly the series the trainer and
the operator expose (no undocumented `*_created`, no gauge sample before its value), and the step
loss and the smoothed loss carry their documented names in all four places a user reads them:
/metrics, /progress (and the termination message), the FineTuneJob status, the log line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kubetune.operator.reports import parse_result
from kubetune.operator.runtime.progress_reader import bounded_report
from kubetune.operator.status import compute_status
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job, termination_message
from tests.conftest import REPO_ROOT
from tests.operator.ftj_builders import NOW, make_batch_job, make_job, make_pod, observed
from tests.tools import needs_tools
from tests.trainer.trainer_support import free_port, job_document, local_job

DOCS = REPO_ROOT / "docs" / "observability.md"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
STEPS = 3


def documented(section: str) -> dict[str, str]:
    """Metric name -> type from the table under `## <section>` in docs/observability.md."""
    part = DOCS.read_text(encoding="utf-8").split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(kubetune_[a-z_]+)(?:\{[a-z,]*\})?` \| (gauge|counter|histogram) \|", part, re.M))


def exposed(exposition: str) -> dict[str, str]:
    """Metric name -> type as the docs name them (a counter with `_total`), every family declared,
    sampled yet or not; fails on a sample no family explains (e.g. `*_created`)."""
    names = {}
    for family in text_string_to_metric_families(exposition):
        name = family.name + ("_total" if family.type == "counter" else "")
        names[name] = family.type
        allowed = {family.name + s for s in SUFFIXES[family.type]}
        strays = {s.name for s in family.samples} - allowed
        assert not strays, f"{name}: series the docs do not list: {sorted(strays)}"
    return names


def sampled(exposition: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(exposition) for s in family.samples}


def promtool_problems(exposition: str) -> str:
    done = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True,
                          timeout=60, check=False)
    return "" if done.returncode == 0 and not done.stdout.strip() else done.stdout + done.stderr


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


def test_the_docs_tables_parse() -> None:
    trainer, operator = documented("Trainer"), documented("Operator")
    assert trainer["kubetune_trainer_step_loss"] == trainer["kubetune_trainer_smoothed_loss"] == "gauge"
    assert operator["kubetune_operator_jobs_created_total"] == "counter"
    assert "kubetune_trainer_loss" not in trainer


OPERATOR_EXPOSITION = textwrap.dedent("""
    import socket, sys, urllib.request
    from kubetune.api.status import FineTuneJobStatus
    from kubetune.operator.runtime.metrics import OperatorMetrics
    from kubetune.operator.runtime.probes import serve_probes

    metrics = OperatorMetrics()
    metrics.observe_transition("u1", "team-a", FineTuneJobStatus(), FineTuneJobStatus(phase="Running"))
    metrics.observe_transition("u1", "team-a", FineTuneJobStatus(phase="Running"), FineTuneJobStatus(phase="Failed"))
    metrics.reconcile_duration.observe(0.01)
    metrics.api_errors.labels("patch").inc()
    server = serve_probes(metrics.registry, 0, lambda: True, host="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=10) as r:
        sys.stdout.write(r.read().decode())
""")


@needs_tools("promtool")
def test_the_operator_exposes_exactly_the_documented_series() -> None:
    """In a process of its own: `disable_created_metrics` is process-wide, so the trainer's call in
    this test process must not hide a missing one in the operator."""
    done = subprocess.run([sys.executable, "-c", OPERATOR_EXPOSITION], capture_output=True, text=True, timeout=120,
                          check=True)
    assert exposed(done.stdout) == documented("Operator")
    assert "kubetune_operator_jobs_failed_total" in sampled(done.stdout)
    assert not any(name.endswith("_created") for name in sampled(done.stdout))
    assert not promtool_problems(done.stdout), promtool_problems(done.stdout)


def _status_progress(report: object, result: object = None) -> dict[str, object]:
    status = compute_status(make_job().typed(), observed(make_batch_job().active(1), (make_pod().running(),)), NOW,
                            progress=report, result=result)
    return status.model_dump(by_alias=True, exclude_none=True)["progress"]


@needs_tools("promtool")
def test_step_loss_and_smoothed_loss_have_their_names_in_all_four_places(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from kubetune_demo.tiny import build_image_dataset, build_tiny_pipeline

    model, data = build_tiny_pipeline(tmp_path / "model"), build_image_dataset(tmp_path / "data", count=6, size=64)
    job = local_job(str(model), str(data), str(tmp_path / "out"), training={"maxSteps": STEPS})
    port, seen = free_port(), []
    runtime = RuntimeConfig(scratch=tmp_path / "s", port=port, host="127.0.0.1")
    result = run_job(job, runtime, hooks=[lambda _: seen.append((_get(port, "/metrics"),
                                                                 json.loads(_get(port, "/progress"))))])
    assert result.exit_code == 0, result.message
    metrics, progress = seen[-1]
    log = capsys.readouterr().out

    values = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    step_loss, smoothed_loss = progress["stepLoss"], progress["smoothedLoss"]
    assert values["kubetune_trainer_step_loss"] == pytest.approx(step_loss, abs=1e-6)
    assert values["kubetune_trainer_smoothed_loss"] == pytest.approx(smoothed_loss, abs=1e-6)
    assert step_loss != smoothed_loss, "after three steps the average differs from the last step"
    assert progress["validationLoss"] is None and "kubetune_trainer_validation_loss" not in values
    assert ("kubetune_trainer_gpu_memory_allocated_bytes" in values) == torch.cuda.is_available()
    assert exposed(metrics) == documented("Trainer")
    assert not promtool_problems(metrics), promtool_problems(metrics)

    from_progress = _status_progress(bounded_report(progress))
    from_result = _status_progress(None, parse_result(termination_message(result)))
    for status in (from_progress, from_result):
        assert (status["stepLoss"], status["smoothedLoss"]) == (step_loss, smoothed_loss)
        assert "loss" not in status
    assert f"step {STEPS}/{STEPS} (100%) step loss {step_loss:.4f} smoothed loss {smoothed_loss:.4f} " in log


@pytest.mark.integration
@needs_tools("promtool")
def test_a_live_trainer_and_operator_expose_exactly_the_documented_series(
    tmp_path: Path, kube_cluster, kube_admin, namespace: str, finetunejob_crd: str, kubectl
) -> None:
    from kubetune_demo.tiny import build_image_dataset, build_tiny_pipeline
    from tests.monitoring.test_prometheus_scrape import _spawn, _stop, _wait

    doc = job_document(str(build_tiny_pipeline(tmp_path / "model")), str(build_image_dataset(tmp_path / "data")),
                       str(tmp_path / "out"), output={"checkpointEvery": 100000}, training={"maxSteps": 100000})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    trainer_port, operator_port = free_port(), free_port()
    processes = [
        _spawn([sys.executable, "-m", "kubetune.cli", "run", str(tmp_path / "job.yaml"), "--port", str(trainer_port),
                "--no-progress", "--scratch", str(tmp_path / "scratch")], tmp_path / "trainer.log"),
        _spawn([sys.executable, "-m", "kubetune.cli", "operator", "--namespace", namespace, "--kubeconfig",
                str(kube_cluster.kubeconfig), "--http-port", str(operator_port)], tmp_path / "operator.log"),
    ]
    try:
        job = Path("examples/lora-sd15.yaml").read_text().replace("namespace: team-a", f"namespace: {namespace}")
        assert kubectl("apply", "-f", "-", stdin=job).returncode == 0
        _wait(lambda: json.loads(_get(trainer_port, "/progress"))["step"] >= 1, "a trained step")
        _wait(lambda: "kubetune_operator_jobs_created_total{" in _get(operator_port, "/metrics"), "a created job")
        live = {"Trainer": _get(trainer_port, "/metrics"), "Operator": _get(operator_port, "/metrics")}
    finally:
        for process in reversed(processes):
            _stop(process)
    for section, exposition in live.items():
        assert exposed(exposition) == documented(section), section
        assert not any(name.endswith("_created") for name in sampled(exposition)), section
        assert not promtool_problems(exposition), f"{section}: {promtool_problems(exposition)}"
    assert "kubetune_trainer_validation_loss" not in sampled(live["Trainer"])  # no validation split
