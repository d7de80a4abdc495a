"""The Helm chart: generated files in sync, lint-clean for each install shape, valid objects,
write rights only where the operator watches (cluster-wide only when asked), the admission
policy on by default, and bad values rejected by the schema before anything reaches a cluster."""

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
    "cluster-wide": ["--set", "rbac.clusterWide=true"],
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


def render(shape: str, *extra: str) -> list[dict]:
    out = helm("template", "kt", str(CHART), "--namespace", "kubetune-system", *SHAPES[shape], *extra)
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


def _writable_namespaces(docs: list[dict]) -> set[str | None]:
    """Where the operator's ServiceAccount may create Jobs (None: every namespace)."""
    out: set[str | None] = set()
    for role in (d for d in docs if d["kind"] in ("Role", "ClusterRole")):
        if any("jobs" in rule["resources"] and "create" in rule["verbs"] for rule in role["rules"]):
            out.add(role["metadata"].get("namespace"))
    return out


def _operator_args(docs: list[dict]) -> list[str]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize(
    ("shape", "watched"),
    [("default", ["kubetune-system"]), ("namespaced", ["kubetune-system", "team-a", "team-b"])],
)
def test_write_rights_only_where_the_operator_watches(shape: str, watched: list[str]) -> None:
    docs = render(shape)
    assert _writable_namespaces(docs) == set(watched)
    bound = {(d["metadata"]["namespace"], d["roleRef"]["name"]) for d in docs if d["kind"] == "RoleBinding"}
    assert {(ns, "kt-operator") for ns in watched} <= bound
    # Cluster-wide, the operator may only read cluster-scoped kinds (CRDs, namespaces).
    for role in (d for d in docs if d["kind"] == "ClusterRole"):
        assert {res for rule in role["rules"] for res in rule["resources"]} <= {
            "namespaces",
            "customresourcedefinitions",
        }
        assert {verb for rule in role["rules"] for verb in rule["verbs"]} <= {"get", "list", "watch"}
    args = _operator_args(docs)
    assert [a for a in args if a.startswith("--namespace=")] == [f"--namespace={ns}" for ns in watched]
    assert "--all-namespaces" not in args


def test_cluster_wide_rights_are_opt_in() -> None:
    docs = render("cluster-wide")
    assert _writable_namespaces(docs) == {None}
    assert "--all-namespaces" in _operator_args(docs)
    assert not [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "kt-operator"]
    bindings = {d["roleRef"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"}
    assert bindings == {"kt-operator", "kt-operator-discovery"}


def test_cluster_wide_with_watch_namespaces_is_refused() -> None:
    out = helm("template", "kt", str(CHART), "--set", "rbac.clusterWide=true", "--set", "watchNamespaces={team-a}")
    assert out.returncode != 0
    assert "rbac.clusterWide" in out.stderr and "watchNamespaces" in out.stderr


def test_admission_policy_is_on_by_default_for_the_operators_service_account() -> None:
    docs = render("default")
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    bindings = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert sorted(policies) == ["kt-operator-configmaps", "kt-operator-jobs", "kt-operator-services"]
    assert {b["spec"]["policyName"] for b in bindings} == set(policies)
    assert all(b["spec"]["validationActions"] == ["Deny"] for b in bindings)
    (service_account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    user = f"system:serviceaccount:kubetune-system:{service_account['metadata']['name']}"
    for policy in policies.values():
        spec = policy["spec"]
        assert spec["failurePolicy"] == "Fail"
        assert [c["expression"] for c in spec["matchConditions"]] == [f"request.userInfo.username == '{user}'"]
        (rule,) = spec["matchConstraints"]["resourceRules"]
        assert rule["operations"] == ["CREATE", "UPDATE", "DELETE"]
        assert policy["metadata"]["name"] == f"kt-operator-{rule['resources'][0]}"
        # on UPDATE the stored object must already be a child: no adopting someone else's object
        assert any("oldObject" in str(v) for v in spec["variables"]), policy["metadata"]["name"]


def test_every_kind_the_operator_creates_but_events_is_under_the_policy() -> None:
    """And every kind it may delete but its own FineTuneJobs (the TTL) is policed on DELETE."""
    from kubetune.operator.permissions import NAMESPACED_RULES

    def granted(verb: str) -> set[str]:
        return {r for rule in NAMESPACED_RULES if verb in rule["verbs"] for r in rule["resources"]}

    def policed(operation: str) -> set[str]:
        return {
            r
            for d in render("default")
            if d["kind"] == "ValidatingAdmissionPolicy"
            for rule in d["spec"]["matchConstraints"]["resourceRules"]
            if operation in rule["operations"]
            for r in rule["resources"]
        }

    assert granted("create") - {"events"} == policed("CREATE")
    assert granted("delete") - {"finetunejobs"} <= policed("DELETE")


def test_admission_policy_can_be_turned_off() -> None:
    kinds = {d["kind"] for d in render("default", "--set", "admissionPolicy.enabled=false")}
    assert not {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} & kinds


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
        ("watchNamespaces={Team_A}", "watchNamespaces"),
        ("admissionPolicy.validationActions={Block}", "validationActions"),
        ("rbac.clusterWide=maybe", "clusterWide"),
    ],
)
def test_wrong_values_are_rejected(setting: str, field: str) -> None:
    out = helm("template", "kt", str(CHART), "--set", setting)
    assert out.returncode != 0
    assert field in out.stderr


@pytest.mark.parametrize("shape", ["default", "cluster-wide"])
def test_chart_grants_exactly_the_operators_permissions(shape: str) -> None:
    from kubetune.operator.permissions import CLUSTER_RULES, LEASE_RULES

    granted = [rule for d in render(shape) if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]]
    assert sorted(map(str, granted)) == sorted(map(str, [*CLUSTER_RULES, *LEASE_RULES]))
