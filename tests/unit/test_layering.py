"""The layers, as contracts on every import (pyproject.toml, `[tool.importlinter]`): the API imports
nothing from the project; the trainer imports only the API; the operator never imports the trainer,
torch or diffusers; the demo's props never the operator; so only the CLI imports both sides. No file
is exempt, and no import circle is allowed anywhere. Each rule is also broken on purpose in a copy of
the tree, to show that the check fails when it should."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.unit.layering_probe import SOURCE_ROOTS

REPO = Path(__file__).resolve().parents[2]
LINTER = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS = {contract["id"]: contract["name"] for contract in LINTER["contracts"]}
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "kubetune_trainer", "kubetune_demo")


def _probe(root: Path, what: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.unit.layering_probe", str(root), what],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_every_layer_contract_is_kept() -> None:
    out = _probe(REPO, "contracts")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(CONTRACTS)} kept, 0 broken" in out.stdout, out.stdout


def test_every_decision_module_is_under_the_decisions_contract() -> None:
    """The operator's decisions are every module beside `runtime/`: a new one is held to the contract too."""
    decisions = next(c for c in LINTER["contracts"] if c["id"] == "operator-decisions")
    beside_runtime = {f"kubetune.operator.{path.stem}" for path in (REPO / "operator/kubetune/operator").glob("*.py")
                      if path.stem != "__init__"}
    assert set(decisions["source_modules"]) == beside_runtime


def test_no_import_circle_anywhere() -> None:
    out = _probe(REPO, "circles")
    assert out.returncode == 0, f"import circles:\n{out.stdout}{out.stderr}"


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for name in SOURCE_ROOTS:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(root: Path, file: str, line: str) -> None:
    path = root / file
    path.write_text(path.read_text() + f"\n{line}\n")


BREACHES = [
    ("api", "api/kubetune/api/uris.py", "from kubetune_trainer import config  # noqa"),
    ("api", "api/kubetune/api/spec.py", "def _late():\n    import kubetune.operator.naming  # noqa"),
    ("trainer", "trainer/kubetune_trainer/sampling.py", "from kubetune.operator import naming  # noqa"),
    ("trainer", "trainer/kubetune_trainer/config.py", "import kubetune.cli  # noqa"),
    ("operator", "operator/kubetune/operator/naming.py", "def _late():\n    import kubetune_trainer.config  # noqa"),
    ("operator", "operator/kubetune/operator/render.py", "import torch  # noqa"),
    ("operator", "operator/kubetune/operator/status.py", "from diffusers import UNet2DConditionModel  # noqa"),
    ("demo", "demo/kubetune_demo/tiny.py", "from kubetune.operator import naming  # noqa"),
    ("operator-decisions", "operator/kubetune/operator/status.py", "import kopf  # noqa"),
    ("operator-decisions", "operator/kubetune/operator/render.py",
     "def _late():\n    from kubetune.operator.runtime import kube  # noqa"),
]


@pytest.mark.parametrize(("contract", "file", "line"), BREACHES, ids=[f"{c}:{Path(f).name}" for c, f, _ in BREACHES])
def test_a_broken_contract_fails_the_check(tree_copy: Path, contract: str, file: str, line: str) -> None:
    _append(tree_copy, file, line)
    out = _probe(tree_copy, "contracts")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{CONTRACTS[contract]} BROKEN" in out.stdout.splitlines(), out.stdout
    module = ".".join(Path(file).with_suffix("").parts[1:])
    assert f"{module} -> " in out.stdout, out.stdout


def test_an_import_circle_fails_the_check(tree_copy: Path) -> None:
    _append(tree_copy, "api/kubetune/api/base.py", "def _late():\n    from kubetune.api import spec  # noqa")
    out = _probe(tree_copy, "circles")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "kubetune.api.base" in out.stdout and "kubetune.api.spec" in out.stdout, out.stdout


def test_cli_and_operator_load_without_the_training_stack() -> None:
    """Every module of the `kubetune` namespace (API, operator, CLI with all its commands) imports
    without the trainer or the training stack: the operator image does not ship them."""
    probe = (
        "import sys, importlib, pkgutil, kubetune\n"
        "for m in pkgutil.walk_packages(kubetune.__path__, 'kubetune.'):\n"
        "    importlib.import_module(m.name)\n"
        f"loaded = sorted(n for n in sys.modules if n.split('.')[0] in {HEAVY!r})\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"loaded: {out.stdout.strip()}"
