"""A rank whose peer is gone or stalls ends with 76 (retryable, the cause is on another pod).

Two `kubetune train` launchers (PET_NNODES=2, one process each, gloo on CPU). Killing every
process of rank 1's pod, as a lost pod looks, closes its connections: rank 0's next collective
fails at once, long before the timeout. Stopping rank 1's trainer process (SIGSTOP: it holds its
connections and answers nothing) makes rank 0 wait in a collective for
`runPolicy.processGroupTimeoutSeconds` (5 s here, an hour by default), then fail with a message
that names the setting.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from trainer_support import job_document
from two_nodes import start_nodes, stop_all, wait_for_step

from kubetune_trainer.exitcodes import EXIT_PEER_LOST

pytestmark = pytest.mark.integration

TIMEOUT_SECONDS = 5


def _nodes(tiny_sd: Path, squares: Path, tmp_path: Path, timeout: int) -> list:
    doc = job_document(str(tiny_sd), str(squares), str(tmp_path / "out"),
                       training={"maxSteps": 10_000, "batchSize": 1},
                       output={"checkpointEvery": 100_000},
                       runPolicy={"processGroupTimeoutSeconds": timeout})
    nodes = start_nodes(doc, tmp_path / "nodes", tmp_path / "trace")
    wait_for_step(tmp_path / "trace", nodes)
    return nodes


def test_a_killed_peer_ends_the_other_rank_at_once_with_76(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    nodes = _nodes(tiny_sd, squares, tmp_path, timeout=600)
    try:
        stop_all(nodes[1:])
        killed = time.monotonic()
        code = nodes[0].wait(timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        stop_all(nodes)
    assert code == EXIT_PEER_LOST, nodes[0].tail()
    assert elapsed < 60  # a closed connection fails the collective: the 600 s timeout plays no part
    result = nodes[0].result()
    assert (result["exitCode"], result["reason"]) == (EXIT_PEER_LOST, "PeerLost")
    assert "another rank went away" in result["message"], result["message"]


def test_a_stalled_peer_fails_the_collective_after_the_process_group_timeout(tiny_sd: Path, squares: Path,
                                                                             tmp_path: Path) -> None:
    nodes = _nodes(tiny_sd, squares, tmp_path, timeout=TIMEOUT_SECONDS)
    try:
        os.kill(nodes[1].worker_pid(), signal.SIGSTOP)
        stalled = time.monotonic()
        code = nodes[0].wait(timeout=TIMEOUT_SECONDS + 60)
        elapsed = time.monotonic() - stalled
    finally:
        stop_all(nodes)
    assert code == EXIT_PEER_LOST, nodes[0].tail()
    assert elapsed < TIMEOUT_SECONDS + 60  # the default timeout, an hour, would still be waiting
    message = nodes[0].result()["message"]
    assert f"runPolicy.processGroupTimeoutSeconds ({TIMEOUT_SECONDS} s)" in message, message
