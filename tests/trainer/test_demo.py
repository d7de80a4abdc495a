"""`kubetune demo` as `make demo` runs it: the console script, a fresh working directory, then the
snippet it prints pasted into the project's Python; and the demo's folder rules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kubetune.cli import main
from kubetune_demo.demo import MARKER, publish
from kubetune_trainer.exitcodes import EXIT_CONFIG

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"  # what the demo tells users to paste into
ROW = re.compile(r"^\[demo\]   (?P<label>\S.{15}\S*) +(?P<path>/.+?)(?:  \(.*\))?$")
PASTE = "paste into .venv/bin/python"


def _rows(stdout: str) -> dict[str, Path]:
    """The demo's "label  path  (note)" lines."""
    return {m["label"].strip(): Path(m["path"]) for m in map(ROW.match, stdout.splitlines()) if m}


def _snippet(stdout: str) -> list[str]:
    """The lines after the one that says to paste them, exactly as printed."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(PASTE)) + 1
    return [line for line in lines[start:] if line.strip()]


@pytest.mark.integration
@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_demo_output_names_local_paths_and_a_snippet_that_loads_the_lora(family: str, tmp_path: Path) -> None:
    kubetune = Path(sys.executable).parent / "kubetune"
    home = tmp_path / "user"
    home.mkdir()
    demo = subprocess.run([str(kubetune), "demo", "--steps", "4", "--family", family], cwd=home,
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-4000:]
    out = home / "kubetune-demo"
    rows = _rows(demo.stdout)
    assert rows["LoRA (diffusers)"] == out / "final" / "pytorch_lora_weights.safetensors"
    assert rows["base pipeline"] == out / "base" and (out / "base" / "model_index.json").is_file()
    assert rows["status"] == out / "status.json"
    assert rows["report"] == out / "report" / "index.html"
    assert all(path.exists() for path in rows.values()), rows
    assert "s3://" not in demo.stdout[demo.stdout.rindex("\n}\n"):]  # after the status: local paths only

    snippet = _snippet(demo.stdout)
    assert len(snippet) == 2, snippet
    python = PYTHON if PYTHON.exists() else Path(sys.executable)
    check = "\nprint('adapters:', pipe.get_active_adapters())\n"
    pasted = subprocess.run([str(python)], input="\n".join(snippet) + check, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert pasted.returncode == 0, pasted.stderr[-4000:]
    assert "adapters: ['default_0']" in pasted.stdout
    with Image.open(out / "lora-sample.png") as image:
        image.load()
        assert image.size == (64, 64)


def test_demo_refuses_a_folder_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--steps", "1"]) == EXIT_CONFIG
    assert str(tmp_path) in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me" and not (tmp_path / MARKER).exists()


def test_a_demo_folder_is_replaced_whole(tmp_path: Path) -> None:
    outputs, base, out = tmp_path / "outputs", tmp_path / "model", tmp_path / "kubetune-demo"
    for path in (outputs / "final" / "w.safetensors", outputs / "cache" / "c", base / "model_index.json",
                 out / MARKER, out / "final" / "old.safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    publish(outputs, base, tmp_path / "no-status.json", out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        MARKER, "base/model_index.json", "final/w.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
