"""Two "nodes" on this host: two `kubetune train` launchers with PET_NNODES=2, one process each.

Each launcher is what a pod runs (it re-runs itself under torchrun, gloo on CPU); each has its
own scratch and termination message, both share one output folder and one step trace
(`KUBETUNE_TRAINER_TRACE`), from which a test learns that training is under way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from trainer_support import free_port

from kubetune_trainer.checkpoint import MANIFEST


@dataclass
class Node:
    rank: int
    proc: subprocess.Popen
    termination: Path
    log: Path

    def result(self) -> dict[str, Any]:
        return json.loads(self.termination.read_text())

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node {self.rank} still runs after {timeout} s; log:\n{self.tail()}") from None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:]) if self.log.is_file() else ""

    def worker_pid(self) -> int:
        """The trainer process under this node's torchrun (launcher -> torchrun -> worker)."""
        torchrun = _children(self.proc.pid)
        workers = [pid for parent in torchrun for pid in _children(parent)]
        assert len(workers) == 1, f"expected one worker under {torchrun}, found {workers}"
        return workers[0]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _descendants(pid: int) -> list[int]:
    below = _children(pid)
    return below + [d for child in below for d in _descendants(child)]


def start_nodes(doc: dict[str, Any], folder: Path, trace: Path) -> list[Node]:
    """Both launchers of a two-node job, started at once; `folder` holds their job file, scratch and logs."""
    folder.mkdir(parents=True, exist_ok=True)
    job_file = folder / "job.yaml"
    job_file.write_text(yaml.safe_dump(doc))
    port, nodes = free_port(), []
    for rank in (0, 1):
        env = {**os.environ, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port), "KUBETUNE_TRAINER_TRACE": str(trace)}
        termination, log = folder / f"termination-{rank}", folder / f"node-{rank}.log"
        command = [sys.executable, "-m", "kubetune.cli", "train", "--config", str(job_file), "--mode", "local",
                   "--port", "0", "--termination-log", str(termination), "--scratch", str(folder / f"scratch-{rank}")]
        with log.open("w") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        nodes.append(Node(rank, proc, termination, log))
    return nodes


def stop_all(nodes: list[Node]) -> None:
    """Whatever is left of both nodes, killed (a failed test must not leave trainers behind)."""
    for node in nodes:
        for pid in [node.proc.pid, *_descendants(node.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.proc.wait(timeout=30)


def wait_for_step(trace: Path, nodes: list[Node], step: int = 1, timeout: float = 400) -> None:
    """Until rank 0 has traced `step` (training is under way on both ranks)."""
    deadline = time.monotonic() + timeout
    while traced_steps(trace) < step:
        for node in nodes:
            assert node.proc.poll() is None, f"node {node.rank} ended early ({node.proc.returncode}):\n{node.tail()}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


def traced_steps(trace: Path, rank: int = 0) -> int:
    path = trace / f"rank-{rank}.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()
             if line.endswith("}") and '"event": "step"' in line]
    return max(steps, default=0)


def first_traced_step(trace: Path, rank: int = 0) -> int:
    return min(json.loads(line)["step"] for line in (trace / f"rank-{rank}.jsonl").read_text().splitlines()
               if '"event": "step"' in line)


def checkpoint_folders(output: Path) -> dict[int, bool]:
    """Every checkpoint folder under `output` by step, and whether it is complete (has its manifest)."""
    return {int(p.name.removeprefix("step-")): (p / MANIFEST).is_file() for p in output.glob("checkpoints/step-*")}
