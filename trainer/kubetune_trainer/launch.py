"""One trainer process per GPU: `kubetune train` re-runs itself under torchrun when asked to.

The operator sets Kubeflow's PET_* variables (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT), which torchrun reads as its own flags. When they ask for
more than one process and this process was not started by torchrun, `launch_workers` starts
torchrun with the same arguments and stays as the pod's first process:

- It passes the first SIGTERM or SIGINT to torchrun's workers, each worker process alone (each
  then tells its peers through the per-step stop agreement, see `distributed`). Not through
  torchrun: torchrun signals each worker's whole process group, which holds the worker's data
  loader processes, and they would die before the worker could checkpoint; and after 30 s it
  kills the workers. Only before the workers exist does torchrun get the signal itself. torchrun
  runs in its own session, so a Ctrl-C reaches the workers once, from here, and when torchrun is
  signalled some other way it gives them the pod's grace period less a margin
  (`--shutdown-timeout`), not 30 s.
- It exits with one code for the pod, from the result every local worker writes (torchrun
  itself reports any worker failure as 1, and the operator must see 78 for a configuration
  error and 143 after a stop on every pod, not only on rank 0's): see `pod_exit_code`.
- It writes that result to the pod's termination message, so every pod says how it ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune_trainer import exitcodes as ec

WORKER_RESULTS_ENV = "KUBETUNE_WORKER_RESULTS"
"""The folder, set by the launcher, where each worker writes `rank-<RANK>.json`."""
SHUTDOWN_MARGIN_SECONDS = 10
"""Of the pod's grace period, what torchrun leaves for itself and the launcher after the workers."""
PRECEDENCE = (ec.EXIT_CONFIG, ec.EXIT_INTERRUPTED, ec.EXIT_FAILED, ec.EXIT_STORAGE_UNAVAILABLE, ec.EXIT_PEER_LOST)
"""When this pod was signalled, its code is the first of these any local worker ended with: a cause
on this pod before a symptom of another pod's (peer lost); a worker that wrote no result counts as
a failure."""
UNSIGNALLED_PRECEDENCE = (ec.EXIT_CONFIG, ec.EXIT_FAILED, ec.EXIT_STORAGE_UNAVAILABLE, ec.EXIT_INTERRUPTED,
                          ec.EXIT_PEER_LOST)
"""When it was not, a local worker's failure comes before 143: torchrun stops a failed worker's
local peers with SIGTERM, and a stop that lost work to a failure must count as that failure, not
pass for a disruption (which the operator would retry uncounted, forever)."""


def requested_processes(env: dict[str, str] | None = None) -> int:
    """Processes the whole job asks for: nodes times processes per node."""
    env = os.environ if env is None else env
    return int(env.get("PET_NNODES", "1")) * int(env.get("PET_NPROC_PER_NODE", "1"))


def needs_launcher(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return requested_processes(env) > 1 and "LOCAL_RANK" not in env


def worker_status_file(env: dict[str, str] | None = None) -> Path | None:
    """Where this worker (started by `launch_workers`) writes its result; None outside a launcher."""
    env = os.environ if env is None else env
    folder, rank = env.get(WORKER_RESULTS_ENV), env.get("RANK")
    return Path(folder) / f"rank-{rank}.json" if folder and rank is not None else None


def recorded_results(folder: Path, workers: int) -> list[dict[str, Any] | None]:
    """Each local worker's result by rank order; None for each of `workers` that wrote none."""
    results: list[dict[str, Any] | None] = []
    for path in sorted(folder.glob("rank-*.json"), key=lambda p: int(p.stem.removeprefix("rank-"))):
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(body, dict) and isinstance(body.get("exitCode"), int):
            results.append(body)
    return results + [None] * max(0, workers - len(results))


def pod_exit_code(results: list[dict[str, Any] | None], stopped: bool) -> int:
    """The pod's code: 0 when every worker succeeded; else 78 if any worker found a configuration
    error; then, when this pod was stopped, 143, a failure here, storage, 76; when it was not, a
    failure here, storage, 143 (a stop agreed with another pod), 76."""
    codes = {ec.EXIT_FAILED if result is None else result["exitCode"] for result in results}
    if codes <= {ec.EXIT_OK}:
        return ec.EXIT_OK
    if stopped:
        codes.add(ec.EXIT_INTERRUPTED)
    order = PRECEDENCE if stopped else UNSIGNALLED_PRECEDENCE
    return next((code for code in order if code in codes), max(codes))


def _pod_result(results: list[dict[str, Any] | None], code: int, stopped: str | None,
                torchrun_code: int) -> dict[str, Any]:
    """The lowest rank's result with the pod's code, or one that says why no worker has one."""
    chosen = next((r for r in results if r is not None and r["exitCode"] == code), None)
    if chosen is not None:
        return chosen
    if code == ec.EXIT_INTERRUPTED:
        return {"phase": "Failed", "exitCode": code, "reason": "Interrupted",
                "message": f"stopped by {stopped or 'a signal'} before the workers recorded a result"}
    return {"phase": "Failed", "exitCode": code, "reason": "TrainingFailed",
            "message": f"a worker ended without a result (torchrun exited with {torchrun_code}); see the pod's log"}


def _write_termination(result: dict[str, Any], path: Path | None) -> None:
    from kubetune_trainer.config import RuntimeConfig
    from kubetune_trainer.job import RunResult, write_result

    if path is None:
        return
    run = RunResult(result.get("phase", "Failed"), result["exitCode"], result.get("reason", ""),
                    result.get("message", ""), result)
    write_result(run, RuntimeConfig(scratch=path.parent, termination_path=path))


def _children(pid: int) -> list[int]:
    """The processes `pid` started (torchrun's workers), from /proc; none where there is no /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies, so torchrun never outlives it."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def passing_stops_to_workers(torchrun: subprocess.Popen) -> Iterator[list[str]]:
    """Meanwhile the first SIGTERM or SIGINT goes to each of torchrun's workers (to torchrun itself
    while it has none yet); yields the names of the signals passed on."""
    stopped: list[str] = []

    def forward(signum: int, frame: object) -> None:
        if not stopped:  # once: a second signal would cut a graceful shutdown short
            stopped.append(signal.Signals(signum).name)
            for pid in _children(torchrun.pid) or [torchrun.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopped
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch_workers(cli_args: list[str], termination: Path | None, results_dir: Path, grace_seconds: int) -> int:
    """Run `python -m kubetune.cli <cli_args>` under torchrun; return the pod's exit code (`pod_exit_code`)."""
    if termination is not None and termination.is_file():
        termination.write_text("", encoding="utf-8")
    shutil.rmtree(results_dir, ignore_errors=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    shutdown = max(5, grace_seconds - SHUTDOWN_MARGIN_SECONDS)
    command = [sys.executable, "-m", "torch.distributed.run", "--shutdown-timeout", str(shutdown),
               "-m", "kubetune.cli", *cli_args]
    env = {**os.environ, WORKER_RESULTS_ENV: str(results_dir)}
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # NCCL errors raise in the worker, see `distributed`
    proc = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    with passing_stops_to_workers(proc) as stopped:
        torchrun_code = proc.wait()
    results = recorded_results(results_dir, int(os.environ.get("PET_NPROC_PER_NODE", "1")))
    code = pod_exit_code(results, bool(stopped))
    _write_termination(_pod_result(results, code, stopped[0] if stopped else None, torchrun_code), termination)
    return code
