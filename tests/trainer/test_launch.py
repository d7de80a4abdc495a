"""When `kubetune train` starts torchrun, and which exit code its pod ends with."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune_trainer.exitcodes import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PEER_LOST,
    EXIT_STORAGE_UNAVAILABLE,
)
from kubetune_trainer.launch import needs_launcher, pod_exit_code, recorded_results, worker_status_file


def test_launcher_decisions() -> None:
    assert needs_launcher({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1"})
    assert not needs_launcher({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1"})
    assert not needs_launcher({"PET_NPROC_PER_NODE": "4", "LOCAL_RANK": "0"})
    assert worker_status_file({"KUBETUNE_WORKER_RESULTS": "/r", "RANK": "3"}) == Path("/r/rank-3.json")
    assert worker_status_file({"RANK": "3"}) is None


def _result(code: int) -> dict:
    return {"exitCode": code}


def test_the_pod_code_names_a_cause_on_this_pod_before_a_lost_peer() -> None:
    assert pod_exit_code([_result(0), _result(0)], stopped=True) == 0
    assert pod_exit_code([_result(EXIT_PEER_LOST), _result(EXIT_CONFIG)], stopped=False) == EXIT_CONFIG
    assert pod_exit_code([_result(EXIT_INTERRUPTED)], stopped=False) == EXIT_INTERRUPTED
    assert pod_exit_code([None], stopped=True) == EXIT_INTERRUPTED
    assert pod_exit_code([_result(EXIT_PEER_LOST), None], stopped=False) == EXIT_FAILED
    assert pod_exit_code([_result(EXIT_PEER_LOST)], stopped=False) == EXIT_PEER_LOST


def test_a_worker_failure_is_not_hidden_by_the_stops_torchrun_sends_its_peers() -> None:
    """Unsignalled, a 143 beside a failure is torchrun stopping the failed worker's local peers: the pod
    failed (counted), it was not disrupted (uncounted, retried forever)."""
    assert pod_exit_code([_result(EXIT_FAILED), _result(EXIT_INTERRUPTED)], stopped=False) == EXIT_FAILED
    assert pod_exit_code([None, _result(EXIT_INTERRUPTED)], stopped=False) == EXIT_FAILED
    assert pod_exit_code([_result(EXIT_STORAGE_UNAVAILABLE), _result(EXIT_INTERRUPTED)],
                         stopped=False) == EXIT_STORAGE_UNAVAILABLE
    assert pod_exit_code([_result(EXIT_INTERRUPTED), _result(EXIT_INTERRUPTED)], stopped=False) == EXIT_INTERRUPTED
    assert pod_exit_code([_result(EXIT_FAILED), _result(EXIT_INTERRUPTED)], stopped=True) == EXIT_INTERRUPTED


def test_recorded_results_count_the_workers_that_wrote_none(tmp_path: Path) -> None:
    (tmp_path / "rank-10.json").write_text(json.dumps({"exitCode": 143}))
    (tmp_path / "rank-2.json").write_text(json.dumps({"exitCode": 76}))
    (tmp_path / "rank-3.json").write_text("{not json")
    assert recorded_results(tmp_path, workers=3) == [{"exitCode": 76}, {"exitCode": 143}, None]
