"""The Helm chart: generated files in sync, lint-clean for each install shape, valid objects,
and bad values rejected by the schema before anything reaches a cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster.clusterbuild import helm_path

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"
SHAPES = {
    "default": [],
    "namespaced": ["--set", "watchNamespaces={team-a,team-b}"],
    "monitoring": [
        "--set",
        "monitoring.serviceMonitor.enabled=true",
        "--set",
        "monitoring.podMonitor.enabled=true",
        "--set",
        "monitoring.alerts.enabled=true",
        "--set",
        "monitoring.dashboard.enabled=true",
    ],
}
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm_path()), *args], capture_output=True, text=True)


def render(shape: str) -> list[dict]:
    out = helm("template", "kt", str(CHART), "--namespace", "kubetune-system", *SHAPES[shape])
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_generated_chart_files_are_current(repo_root: Path) -> None:
    out = subprocess.run(
        [sys.executable, "charts/generate.py", "--check"], cwd=repo_root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("shape", SHAPES)
def test_helm_lint_strict(shape: str) -> None:
    out = helm("lint", "--strict", str(CHART), *SHAPES[shape])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_objects_pass_strict_kubernetes_validation(shape: str, tmp_path: Path) -> None:
    core = [d for d in render(shape) if d["kind"] not in PROMETHEUS_OPERATOR_KINDS]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(core))
    tool = Path(sys.executable).parent / "kubernetes-validate"
    out = subprocess.run([str(tool), "--strict", "--quiet", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_namespaced_install_has_no_cluster_wide_rbac() -> None:
    docs = render("namespaced")
    kinds = {(d["kind"], d["metadata"].get("namespace")) for d in docs}
    assert ("Role", "team-a") in kinds and ("Role", "team-b") in kinds
    # Cluster-wide, the operator may only read cluster-scoped kinds (CRDs, namespaces).
    for role in (d for d in docs if d["kind"] == "ClusterRole"):
        assert {res for rule in role["rules"] for res in rule["resources"]} <= {
            "namespaces",
            "customresourcedefinitions",
        }
        assert {verb for rule in role["rules"] for verb in rule["verbs"]} <= {"get", "list", "watch"}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--all-namespaces" not in args


def test_monitoring_objects_appear_only_when_enabled() -> None:
    assert not PROMETHEUS_OPERATOR_KINDS & {d["kind"] for d in render("default")}
    assert {"ServiceMonitor", "PodMonitor"} <= {d["kind"] for d in render("monitoring")}


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("operator.replicas=two", "replicas"),
        ("operator.replicas=0", "replicas"),
        ("operator.logLevel=verbose", "logLevel"),
        ("monitoring.serviceMonitor.interval=often", "interval"),
        ("operator.colour=blue", "colour"),
    ],
)
def test_wrong_values_are_rejected(setting: str, field: str) -> None:
    out = helm("template", "kt", str(CHART), "--set", setting)
    assert out.returncode != 0
    assert field in out.stderr


def test_chart_grants_exactly_the_operators_permissions() -> None:
    from kubetune.operator.permissions import CLUSTER_RULES, LEASE_RULES

    granted = [rule for d in render("default") if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]]
    assert sorted(map(str, granted)) == sorted(map(str, [*CLUSTER_RULES, *LEASE_RULES]))
