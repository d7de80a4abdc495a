"""`kubetune validate` and `kubetune crd` as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.api.crd import render_crd_yaml
from kubetune.cli import main
from tests.unit.jobs import job


def _write(tmp_path: Path, name: str, *docs: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs))
    return path


def test_validate_accepts_the_examples(capsys: pytest.CaptureFixture[str], repo_root: Path) -> None:
    files = sorted(str(p) for p in (repo_root / "examples").glob("*.yaml"))
    assert main(["validate", *files]) == 0
    assert capsys.readouterr().out.count(": valid") == len(files)


def test_validate_prints_each_problem_with_its_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = job().set("spec.training.maxSteps", -3).set("spec.method.type", "qlora").obj()
    path = _write(tmp_path, "bad.yaml", job().obj(), bad)
    assert main(["validate", str(path)]) == 1
    captured = capsys.readouterr()
    assert f"{path}#1 (corgi-lora): valid" in captured.out
    assert f"{path}#2 (corgi-lora): spec.training.maxSteps: must be greater than or equal to 1 (got -3)" in captured.err
    assert "spec.method.type: must be one of:" in captured.err


def test_validate_local_mode_allows_paths(tmp_path: Path) -> None:
    path = _write(tmp_path, "local.yaml", job().set("spec.data.uri", "./data").obj())
    assert main(["validate", str(path)]) == 1
    assert main(["validate", "--local", str(path)]) == 0


def test_validate_reports_unreadable_and_malformed_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    assert main(["validate", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "not valid YAML" in err


def test_crd_command_prints_the_generated_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    assert capsys.readouterr().out == render_crd_yaml()


def test_console_script_help_lists_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "--help"], capture_output=True, text=True, check=True)
    assert "validate" in out.stdout and "crd" in out.stdout


def test_committed_api_reference_matches_the_model(repo_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd", "--format", "markdown"]) == 0
    assert capsys.readouterr().out == (repo_root / "docs" / "api.md").read_text(), "docs/api.md is stale: make crd"


@pytest.mark.parametrize("absent", ["moto", "kubetune_demo", "kubetune_trainer"])
def test_demo_without_its_props_says_how_to_get_them(absent: str) -> None:
    """The demo's props are not part of the product (the trainer image has no moto): without them
    `kubetune demo` names what is missing and the extra that installs it, and retrying cannot help."""
    probe = f"import sys; sys.modules[{absent!r}] = None; from kubetune.cli import main; sys.exit(main(['demo']))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 78, out.stderr
    assert f"{absent} not installed" in out.stderr
    assert "pip install 'kubetune[trainer,demo]'" in out.stderr
