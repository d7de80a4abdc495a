"""Layering rules: the API model imports nothing else from the project, and the operator
never imports torch, diffusers or the trainer (its image does not ship them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "operator" / "kubetune"
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "kubetune_trainer")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(SOURCE / "api"), ids=lambda p: p.name)
def test_api_imports_only_itself_from_the_project(path: Path) -> None:
    own = {name for name in _imports(path) if name.split(".")[0] in ("kubetune", "kubetune_trainer")}
    assert all(name.startswith("kubetune.api") for name in own), own


def _operator_side() -> list[Path]:
    trainer_commands = {"train.py", "run.py", "demo.py"}  # import the trainer lazily, by design
    return [p for p in _modules(SOURCE) if not (p.parent.name == "commands" and p.name in trainer_commands)]


@pytest.mark.parametrize("path", _operator_side(), ids=lambda p: str(p.relative_to(SOURCE)))
def test_operator_side_never_imports_the_training_stack(path: Path) -> None:
    heavy = {name for name in _imports(path) if name.split(".")[0] in HEAVY}
    assert not heavy, f"{path} imports {heavy}"


def test_cli_and_operator_load_without_the_training_stack() -> None:
    probe = (
        "import sys, importlib, pkgutil, kubetune, kubetune.cli\n"
        "for m in pkgutil.walk_packages(kubetune.__path__, 'kubetune.'):\n"
        "    if not m.name.startswith('kubetune.commands.') or m.name.split('.')[-1] not in "
        "('train', 'run', 'demo'):\n"
        "        importlib.import_module(m.name)\n"
        f"loaded = sorted(n for n in sys.modules if n.split('.')[0] in {HEAVY!r})\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"loaded: {out.stdout.strip()}"
