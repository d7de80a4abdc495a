"""Alerts and dashboard: valid PromQL (promtool), and only metric names the operator and the
trainer really export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from charts.dashboard import expressions
from tests.tools import needs_tools
from tests.unit.test_chart import render

PROMTOOL = shutil.which("promtool")
needs_promtool = needs_tools("promtool")
METRIC = re.compile(r"\b(kubetune_[a-z_]+|DCGM_[A-Z_]+)\b")
DCGM_EXPORTER = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"}  # shown where the DCGM exporter runs


def _sample_names(registry) -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {fam.name + s for fam in registry.collect() for s in suffixes.get(fam.type, ("",))}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    from kubetune.operator.runtime.metrics import OperatorMetrics
    from kubetune_trainer.metrics import PrometheusMetrics

    return _sample_names(OperatorMetrics().registry) | _sample_names(PrometheusMetrics("ns", "job").registry)


def _alert_rules() -> dict:
    docs = render("monitoring")
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return rule["spec"]


def _promtool_check_rules(groups: dict, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(groups))
    return subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)


@needs_promtool
def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    out = _promtool_check_rules(_alert_rules(), tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 rules found" in out.stdout


@needs_promtool
def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    rules = [
        {"record": f"kubetune:panel_{i}", "expr": expr.replace("$namespace", ".*").replace("$job", ".*")}
        for i, expr in enumerate(expressions())
    ]
    out = _promtool_check_rules({"groups": [{"name": "dashboard", "rules": rules}]}, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_and_dashboard_use_only_exported_metrics(exported: set[str]) -> None:
    used = {m for expr in expressions() for m in METRIC.findall(expr)}
    used |= {m for group in _alert_rules()["groups"] for r in group["rules"] for m in METRIC.findall(r["expr"])}
    assert used - DCGM_EXPORTER <= exported, sorted(used - DCGM_EXPORTER - exported)
    assert len(used) >= 10


def test_dashboard_has_namespace_and_job_variables(repo_root: Path) -> None:
    import json

    dashboard = json.loads((repo_root / "charts/kubetune/files/dashboard.json").read_text())
    assert {"namespace", "job"} <= {v["name"] for v in dashboard["templating"]["list"]}


def test_dashboard_configmap_is_labelled_for_the_grafana_sidecar() -> None:
    (cm,) = [d for d in render("monitoring") if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert '"uid": "kubetune"' in cm["data"]["kubetune.json"]
