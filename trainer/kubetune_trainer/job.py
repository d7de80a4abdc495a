"""Run one FineTuneJob to the end and say how it ended: the shared core of `train` and `run`.

Every failure becomes a result with a phase, a one-line message and an exit code (see
`exitcodes`); the result is printed, written to the status file and, in a pod, to the
termination message the operator reads.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.report import COMPLETED, EARLY_STOPPED, TrainerResult
from kubetune.api.resource import FineTuneJob
from kubetune_trainer.config import TERMINATION_LIMIT_BYTES, RuntimeConfig
from kubetune_trainer.distributed import collective_failure
from kubetune_trainer.exitcodes import EXIT_FAILED, EXIT_OK, ConfigError, Interrupted, TrainerError
from kubetune_trainer.parts import StepHook
from kubetune_trainer.report import ReportWriter, finish_reports, report_hooks
from kubetune_trainer.reporting import ProgressState, Reporter, Reporters, console_reporter
from kubetune_trainer.trainer import StopRequest


@dataclass
class RunResult:
    """How a run ended: what the termination message and `--status-file` hold (`report()`)."""

    phase: str
    exit_code: int
    reason: str = ""
    message: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    """The last `/progress` reading as JSON values (`TrainerProgress.wire()`); empty when none was taken."""

    def report(self) -> TrainerResult:
        """The result as the operator reads it: the run's end and the progress fields of the last reading."""
        return TrainerResult.model_validate({**self.progress, "phase": self.phase, "exitCode": self.exit_code,
                                             "reason": self.reason, "message": self.message})

    def as_dict(self) -> dict[str, Any]:
        return self.report().wire()


def termination_message(result: RunResult, limit: int = TERMINATION_LIMIT_BYTES) -> str:
    """The result as JSON within `limit` bytes: older samples go first, then the last skipped files
    named (the counts stay), then older checkpoints, then the end of the message."""
    body = result.as_dict()
    data = body["data"]
    skipped: list[Any] = list(data.get("skippedFiles") or []) if data else []
    body.update(samples=list(body["samples"]), checkpoints=list(body["checkpoints"]),
                data={**data, "skippedFiles": skipped} if data else None)  # trimmed below, not the result's lists
    text = json.dumps(body)
    for items, drop in ((body["samples"], 0), (skipped, -1), (body["checkpoints"], 0)):
        while len(text.encode()) > limit and items:
            items.pop(drop)
            text = json.dumps(body)
    while len(text.encode()) > limit and body["message"]:
        excess = len(text.encode()) - limit
        body["message"] = body["message"][: max(0, len(body["message"]) - excess - 1)]
        text = json.dumps(body)
    return text


def quiet_libraries() -> None:
    """Library progress bars and advice would drown the trainer's own lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def _reporters(job: FineTuneJob, runtime: RuntimeConfig, progress: ProgressState) -> tuple[Reporter, Any]:
    from kubetune_trainer.metrics import PrometheusMetrics
    from kubetune_trainer.status_server import StatusServer

    reporters: list[Reporter] = [progress]
    server = None
    if runtime.port is not None:
        metrics = PrometheusMetrics(job.metadata.namespace or "default", job.metadata.name)
        server = StatusServer(progress, metrics, runtime.port, runtime.host)
        url = f"http://{runtime.host}:{server.port}"
        print(f"[kubetune] serving {url}/metrics and {url}/progress", flush=True)
        reporters.append(metrics)
    if not runtime.quiet:
        reporters.append(console_reporter(runtime.progress_bar, step_lines=runtime.log_every != 0))
        reporters.append(ReportWriter(job, runtime, progress))  # rank 0 writes <output>/report/
    return Reporters(reporters), server


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """SIGTERM and SIGINT ask every rank to checkpoint and stop (main thread only, as Python requires).

    Before training starts, or on a second signal before the ranks agreed, they stop at once:
    staging is restartable. Once the ranks agreed to stop, further signals (a suspend signals
    every pod, at different times) change nothing: the checkpoint is under way.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop.signal is not None or stop.ended:
            return
        if not stop.armed or stop.received is not None:
            raise Interrupted(f"stopped by {name} before a checkpoint could be saved")
        stop.received = name

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_job(job: FineTuneJob, runtime: RuntimeConfig, hooks: list[StepHook] | None = None) -> RunResult:
    """Train `job` on this process; never raises for a failed run, returns how it ended."""
    quiet_libraries()
    progress, stop = ProgressState(), StopRequest()
    deferred: list[Reporter] = []
    with stop_on_signals(stop):
        result = _run(job, runtime, hooks, progress, stop, deferred)
        stop.ended = True
        write_result(result, runtime)
        for reporter in deferred:  # a stop signal ended the run: the last report once the result is safe
            reporter.close()
    return result


def _run(job: FineTuneJob, runtime: RuntimeConfig, hooks: list[StepHook] | None, progress: ProgressState,
         stop: StopRequest, deferred: list[Reporter]) -> RunResult:
    """The final report is written before the result's snapshot (so the result names it), except after a
    stop signal: then `reporter` goes into `deferred`, closed once the result is written (grace period)."""
    from kubetune_trainer.assembly import build_trainer

    reporter, server, stopped = Reporter(), None, False
    try:
        reporter, server = _reporters(job, runtime, progress)
        trainer = build_trainer(job, runtime, reporter, [*(hooks or []), *report_hooks(reporter)], stop)
        trainer.train()
        progress.phase("Succeeded")
        finish_reports(reporter)
        reason, message = (EARLY_STOPPED, trainer.early_stop_message) if trainer.early_stop_message else (
            COMPLETED, "training finished")
        result = RunResult("Succeeded", EXIT_OK, reason, message, progress.snapshot())
    except TrainerError as exc:
        progress.phase("Failed")
        stopped = isinstance(exc, Interrupted) or stop.signal is not None
        if not stopped:
            finish_reports(reporter)
        result = RunResult("Failed", exc.exit_code, exc.reason, str(exc), progress.snapshot())
    except Exception as exc:  # the last line of defence: report, keep the traceback in the log
        traceback.print_exc(file=sys.stderr)
        progress.phase("Failed")
        lost = collective_failure(exc, job.spec.run_policy.process_group_timeout_seconds)
        message = str(lost) if lost else f"{type(exc).__name__}: {exc}".splitlines()[0]
        code, reason = (lost.exit_code, lost.reason) if lost else (EXIT_FAILED, "TrainingFailed")
        finish_reports(reporter)
        result = RunResult("Failed", code, reason, message, progress.snapshot())
    finally:
        if stopped:
            deferred.append(reporter)
        else:
            reporter.close()
        if server is not None:
            server.close()
    return result


def write_result(result: RunResult, runtime: RuntimeConfig) -> None:
    """The short form to the termination message, the full one to the status file."""
    texts = {runtime.termination_path: termination_message(result),
             runtime.status_file: json.dumps(result.as_dict(), indent=2) + "\n"}
    for path, text in texts.items():
        if path is None:
            continue
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"[kubetune] cannot write result to {path}: {exc}", file=sys.stderr)


def load_job_file(path: Path, mode: str) -> FineTuneJob:
    """The one FineTuneJob in a YAML or JSON file, validated for `mode`; ConfigError otherwise."""
    from kubetune.api.validation import load_documents, validate_document, yaml_problem

    try:
        docs = load_documents(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError carries the position
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
    if len(docs) != 1:
        raise ConfigError(f"{path}: expected one FineTuneJob document, found {len(docs)}")
    validated = validate_document(docs[0], mode=mode)
    if validated.job is None:
        raise ConfigError(f"{path}: " + "; ".join(str(p) for p in validated.problems))
    return validated.job
