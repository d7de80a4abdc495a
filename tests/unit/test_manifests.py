"""The plain-install manifests: valid Kubernetes objects, an operator Deployment that is locked down, write
rights only in its own namespace, and the admission policy on its writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

MANIFESTS = ["namespace.yaml", "operator.yaml", "crd/kubetune.io_finetunejobs.yaml"]


def _docs(repo_root: Path, name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((repo_root / "manifests" / name).read_text()) if d]


def test_manifests_pass_strict_schema_validation(repo_root: Path) -> None:
    files = [str(repo_root / "manifests" / name) for name in MANIFESTS]
    tool = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([str(tool), "--strict", "--quiet", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_lists_every_manifest(repo_root: Path) -> None:
    (kustomization,) = _docs(repo_root, "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)


@pytest.fixture
def operator_pod(repo_root: Path) -> dict:
    (deployment,) = [d for d in _docs(repo_root, "operator.yaml") if d["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]


def test_operator_pod_is_locked_down(operator_pod: dict) -> None:
    assert operator_pod["securityContext"]["runAsNonRoot"] is True
    assert operator_pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = operator_pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert container["livenessProbe"] and container["readinessProbe"]


def test_operator_cannot_read_secrets(repo_root: Path) -> None:
    roles = [d for d in _docs(repo_root, "operator.yaml") if d["kind"] in ("Role", "ClusterRole")]
    assert roles
    for rule in (rule for role in roles for rule in role["rules"]):
        assert "secrets" not in rule["resources"] and "*" not in rule["resources"]
        assert "*" not in rule["verbs"]


def test_operator_writes_only_in_its_own_namespace(repo_root: Path) -> None:
    """The plain install watches kubetune-system only: its write rights are a Role there, and
    cluster-wide it only reads (CRDs, namespaces)."""
    docs = _docs(repo_root, "operator.yaml")
    read_only = {"get", "list", "watch"}
    for role in (d for d in docs if d["kind"] == "ClusterRole"):
        assert {verb for rule in role["rules"] for verb in rule["verbs"]} <= read_only, role["metadata"]["name"]
    writers = [d for d in docs if d["kind"] == "Role" and any(set(r["verbs"]) - read_only for r in d["rules"])]
    assert {d["metadata"]["namespace"] for d in writers} == {"kubetune-system"}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=kubetune-system" in args and "--all-namespaces" not in args


def test_plain_install_ships_the_admission_policy(repo_root: Path) -> None:
    docs = _docs(repo_root, "operator.yaml")
    policies = {d["metadata"]["name"] for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    bound = {d["spec"]["policyName"] for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"}
    assert policies == bound == {f"kubetune-operator-{kind}" for kind in ("jobs", "configmaps", "services")}


def test_trainer_pods_run_as_the_trainer_images_user(repo_root: Path) -> None:
    """The uid the operator renders is the non-root user the trainer image is built with."""
    from kubetune.operator.render_pod import POD_SECURITY, RUN_AS_USER

    dockerfile = (repo_root / "Dockerfile").read_text()
    trainer_stage = dockerfile[dockerfile.index("AS trainer\n"):]
    users = [line.split()[1] for line in trainer_stage.splitlines() if line.startswith("USER ")]
    assert users == [f"{RUN_AS_USER}:{RUN_AS_USER}"] and RUN_AS_USER != 0
    assert POD_SECURITY["runAsNonRoot"] is True and POD_SECURITY["runAsUser"] == RUN_AS_USER
