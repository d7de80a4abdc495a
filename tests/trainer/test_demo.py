"""`kubetune demo` end to end (the same function the CLI calls), with fewer steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.demo import run_demo

pytestmark = pytest.mark.integration


def test_demo_succeeds_and_its_outputs_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result, workdir = run_demo(tmp_path / "demo", steps=4, progress_bar=False)
    assert result.exit_code == 0, result.message
    printed = capsys.readouterr().out
    assert "(exists)" in printed and "MISSING" not in printed
    status = json.loads((workdir / "status.json").read_text())
    for uri in status["outputs"]["lora"].values():
        assert (workdir / "outputs" / uri.removeprefix("s3://outputs/")).is_file()
    assert status["checkpoints"] and status["phase"] == "Succeeded"
