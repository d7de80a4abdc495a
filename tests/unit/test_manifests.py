"""The plain-install manifests: valid Kubernetes objects, and an operator Deployment that is locked down."""

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
    role = next(d for d in _docs(repo_root, "operator.yaml") if d["kind"] == "ClusterRole")
    for rule in role["rules"]:
        assert "secrets" not in rule["resources"] and "*" not in rule["resources"]
        assert "*" not in rule["verbs"]
