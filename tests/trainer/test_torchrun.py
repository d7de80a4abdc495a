"""`kubetune train` in a pod asking for two processes: it runs them under torchrun (DDP on CPU,
gloo) and still exits with rank 0's code, so a configuration error stays 78."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trainer_support import free_port, job_document

from kubetune_trainer.exitcodes import EXIT_CONFIG

pytestmark = pytest.mark.integration


def _train(tmp_path: Path, doc: dict) -> tuple[int, dict]:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_MASTER_ADDR": "127.0.0.1",
           "PET_MASTER_PORT": str(free_port())}
    command = [sys.executable, "-m", "kubetune.cli", "train", "--config", str(tmp_path / "job.yaml"),
               "--mode", "local", "--port", "0", "--termination-log", str(tmp_path / "termination"),
               "--scratch", str(tmp_path / "scratch")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    return done.returncode, json.loads((tmp_path / "termination").read_text())


def test_two_processes_train_and_export(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    code, result = _train(tmp_path, job_document(str(tiny_sd), str(squares), str(tmp_path / "out")))
    assert code == 0 and result["phase"] == "Succeeded", result
    assert Path(result["outputs"]["lora"]["diffusers"]).is_file()
    assert [c["step"] for c in result["checkpoints"]] == [2]


def test_a_config_error_in_a_worker_keeps_exit_code_78(tiny_sd: Path, tmp_path: Path) -> None:
    code, result = _train(tmp_path, job_document(str(tiny_sd), str(tmp_path / "missing"), str(tmp_path / "out")))
    assert code == EXIT_CONFIG and result["reason"] == "InvalidConfiguration"
