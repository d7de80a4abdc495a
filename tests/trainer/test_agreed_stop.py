"""SIGTERM to one pod's launcher of a two-node run stops every rank at the same step.

Two `kubetune train` launchers (PET_NNODES=2, one process each, gloo on CPU) train; one of them
gets SIGTERM, as the kubelet sends it. Every process exits 143 within 30 s, the newest complete
checkpoint is the step they stopped at and no incomplete one is left, and running both launchers
again resumes from it to the weights an uninterrupted two-node run ends with.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from trainer_support import job_document
from two_nodes import checkpoint_folders, first_traced_step, start_nodes, stop_all, traced_steps, wait_for_step

from kubetune_trainer.exitcodes import EXIT_INTERRUPTED

pytestmark = pytest.mark.integration

MAX_STEPS = 10
TRAINING = {"maxSteps": MAX_STEPS, "batchSize": 1, "lrScheduler": {"type": "linear", "warmupSteps": 1}}


def _document(tiny_sd: Path, squares: Path, output: Path) -> dict[str, Any]:
    return job_document(str(tiny_sd), str(squares), str(output), training=TRAINING,
                        output={"checkpointEvery": 1000})


def _train_to_the_end(doc: dict[str, Any], folder: Path) -> None:
    nodes = start_nodes(doc, folder, folder / "trace")
    try:
        for node in nodes:
            assert node.wait(timeout=600) == 0, node.tail()
    finally:
        stop_all(nodes)


def _adapter(output: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(output / "final" / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd: Path, squares: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    _train_to_the_end(_document(tiny_sd, squares, folder / "out"), folder)
    return _adapter(folder / "out")


@pytest.mark.parametrize("signalled", [(0,), (1,), (1, 0)], ids=["rank-0-pod", "rank-1-pod", "suspend"])
def test_sigterm_to_one_launcher_stops_every_rank_at_one_step(signalled: tuple[int, ...], tiny_sd: Path,
                                                              squares: Path, tmp_path: Path,
                                                              uninterrupted: dict[str, Any]) -> None:
    """`suspend`: the operator deletes both pods, so both launchers get SIGTERM, half a second apart."""
    import torch

    output, trace = tmp_path / "out", tmp_path / "trace"
    doc = _document(tiny_sd, squares, output)
    nodes = start_nodes(doc, tmp_path / "stopped", trace)
    try:
        wait_for_step(trace, nodes)
        sent = time.monotonic()
        for rank in signalled:
            nodes[rank].proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        codes = [node.wait(timeout=30) for node in nodes]
        assert time.monotonic() - sent < 30
    finally:
        stop_all(nodes)
    assert codes == [EXIT_INTERRUPTED, EXIT_INTERRUPTED], [node.tail() for node in nodes]
    results = [node.result() for node in nodes]
    stopped_at = results[0]["step"]
    assert [r["exitCode"] for r in results] == [EXIT_INTERRUPTED] * 2 and results[1]["step"] == stopped_at
    assert [r["reason"] for r in results] == ["Interrupted"] * 2
    assert all(f"after step {stopped_at}" in r["message"] for r in results)
    assert all("sent to another rank" in results[rank]["message"] for rank in {0, 1} - set(signalled))
    assert 1 <= stopped_at < MAX_STEPS and traced_steps(trace, 0) == traced_steps(trace, 1) == stopped_at
    assert checkpoint_folders(output) == {stopped_at: True}  # complete, and nothing incomplete beside it

    _train_to_the_end(doc, tmp_path / "resumed")
    assert first_traced_step(tmp_path / "resumed" / "trace") == stopped_at + 1
    resumed = _adapter(output)
    assert resumed.keys() == uninterrupted.keys()
    for key, want in uninterrupted.items():
        torch.testing.assert_close(resumed[key], want, rtol=0, atol=1e-3)
