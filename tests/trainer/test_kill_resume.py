"""A real `kubetune run` process killed with SIGKILL after its second checkpoint resumes from the
newest complete checkpoint and ends with the adapter an uninterrupted run produces."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_support import job_document, local_job

from kubetune_trainer.checkpoint import MANIFEST
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job

pytestmark = pytest.mark.integration

TRAINING = {"maxSteps": 8, "batchSize": 2, "lrScheduler": {"type": "linear", "warmupSteps": 1}}


def _complete_steps(output: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("step-")) for p in output.glob(f"checkpoints/step-*/{MANIFEST}"))


def _kill_after_second_checkpoint(job_file: Path, output: Path, scratch: Path) -> list[int]:
    command = [sys.executable, "-m", "kubetune.cli", "run", str(job_file), "--no-progress", "--scratch", str(scratch)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while len(_complete_steps(output)) < 2:
            assert proc.poll() is None, "the run ended before its second checkpoint"
            assert time.monotonic() < deadline, "no second checkpoint within 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return _complete_steps(output)


def _adapter(result: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(result.progress["outputs"]["lora"]["diffusers"])


def test_sigkilled_run_resumes_and_matches_an_uninterrupted_run(tiny_sd: Path, squares: Path,
                                                                 tmp_path: Path) -> None:
    import torch

    doc = job_document(str(tiny_sd), str(squares), str(tmp_path / "out"), training=TRAINING)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(doc))
    complete = _kill_after_second_checkpoint(job_file, tmp_path / "out", tmp_path / "scratch-1")
    assert complete[:2] == [2, 4]

    steps: list[int] = []
    resumed = run_job(local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), training=TRAINING),
                      RuntimeConfig(scratch=tmp_path / "scratch-2", log_every=0),
                      hooks=[lambda trainer: steps.append(trainer.step)])
    assert resumed.exit_code == 0, resumed.message
    assert steps == list(range(complete[-1] + 1, 9))

    straight = run_job(local_job(str(tiny_sd), str(squares), str(tmp_path / "ref"), training=TRAINING),
                       RuntimeConfig(scratch=tmp_path / "scratch-3", log_every=0))
    want, got = _adapter(straight), _adapter(resumed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)  # bf16 on CPU is deterministic
