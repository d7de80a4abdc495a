"""Loader workers (`data.loaderWorkers`) decode and augment images in their own processes, ahead of
the training loop, and hand out exactly the batches, order and resume positions of the in-process stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.spec import DataSpec
from kubetune_demo.tiny import build_image_dataset
from kubetune_trainer import data
from kubetune_trainer.batches import BatchStream, PrefetchedBatches
from kubetune_trainer.data import Batch, load_dataset

STEPS = 7  # more than an epoch: 5 images in batches of 2 is 3 batches per epoch


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_image_dataset(tmp_path_factory.mktemp("loader"), count=5, size=80)


def _stream(root: Path, rank: int = 0, world_size: int = 1) -> BatchStream:
    spec = DataSpec(uri=str(root), resolution=64, aspect_buckets=False, random_flip=True)
    return BatchStream(load_dataset(root, spec), spec, batch_size=2, seed=9, rank=rank, world_size=world_size)


def _take(stream: Any, count: int) -> list[tuple[Batch, dict[str, int], int]]:
    out = []
    for _ in range(count):
        batch = stream.next_batch()
        out.append((batch, stream.state_dict(), stream.epoch))
    return out


def _same(got: list[tuple[Batch, dict[str, int], int]], want: list[tuple[Batch, dict[str, int], int]]) -> None:
    assert [(b.keys, b.captions, b.sizes, s, e) for b, s, e in got] == [(b.keys, b.captions, b.sizes, s, e)
                                                                        for b, s, e in want]
    assert all(g.pixels.equal(w.pixels) for (g, _, _), (w, _, _) in zip(got, want, strict=True))


def test_workers_decode_in_their_own_processes(images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each decode leaves a file named by the process that did it (forked workers inherit the spy)."""
    render = data.render_image

    def spy(plan: data.ImagePlan) -> Any:
        if plan.pixels is None:
            os.close(tempfile.mkstemp(prefix=f"{os.getpid()}-", dir=tmp_path)[0])
        return render(plan)

    monkeypatch.setattr(data, "render_image", spy)
    stream = PrefetchedBatches(_stream(images), workers=2, prefetch=2)
    batches = [stream.next_batch() for _ in range(4)]
    pixels = [batch.pixels for batch in batches]  # already rendered: nothing more is decoded here
    deciders = {int(name.name.split("-")[0]) for name in tmp_path.iterdir()}
    assert os.getpid() not in deciders
    assert len(deciders) == 2
    assert len(list(tmp_path.iterdir())) >= 8
    assert all(p.shape == (2, 3, 64, 64) for p in pixels)
    for pid in deciders:  # a stop sent to the trainer's process group is the training process's to handle
        assert os.getpgid(pid) == pid != os.getpgid(0)
    os.killpg(os.getpgid(0), signal.SIGWINCH)  # harmless, but it reaches every process of the trainer's group
    assert [stream.next_batch().pixels.shape for _ in range(4)] == [(2, 3, 64, 64)] * 4
    stream.close()


def test_a_process_that_leaves_its_workers_running_still_exits(images: Path) -> None:
    """multiprocessing ends daemonic children at exit with SIGTERM; a worker deaf to it hung the exit."""
    script = (f"from tests.trainer.test_options_loader import _stream\n"
              f"from kubetune_trainer.batches import PrefetchedBatches\n"
              f"from pathlib import Path\n"
              f"KEEP = PrefetchedBatches(_stream(Path({str(images)!r})), workers=2, prefetch=2)\n"
              f"print(KEEP.next_batch().pixels.shape, flush=True)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.Size([2, 3, 64, 64])" in done.stdout
    assert time.monotonic() - started < 45


@pytest.mark.parametrize("rank", [0, 1])
def test_prefetched_batches_equal_the_in_process_ones_and_resume_the_same(images: Path, rank: int) -> None:
    straight = _take(_stream(images, rank, 2), STEPS)
    prefetched = PrefetchedBatches(_stream(images, rank, 2), workers=2, prefetch=2)
    first = _take(prefetched, 3)
    saved = prefetched.state_dict()
    _take(prefetched, 2)  # ahead of the checkpoint, then back to it, as a restarted run does
    prefetched.load_state_dict(saved)
    _same(first + _take(prefetched, STEPS - 3), straight)
    resumed = PrefetchedBatches(_stream(images, rank, 2), workers=1, prefetch=3)
    resumed.load_state_dict(saved)
    _same(_take(resumed, STEPS - 3), straight[3:])
    prefetched.close()
    resumed.close()


def test_a_worker_ends_on_a_sigterm_sent_to_it_whatever_the_trainer_handles(images: Path) -> None:
    """Workers fork from a trainer whose SIGTERM handler only asks the loop to stop; inherited, that
    handler would keep a worker alive through the SIGTERM multiprocessing ends it with at exit."""
    import multiprocessing

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as job.stop_on_signals does
    try:
        before = set(multiprocessing.active_children())
        stream = PrefetchedBatches(_stream(images), workers=1, prefetch=1)
        stream.next_batch()
        [worker] = set(multiprocessing.active_children()) - before
        os.kill(worker.pid, signal.SIGTERM)
        with pytest.raises(RuntimeError, match="killed by signal: Terminated"):  # torch's SIGCHLD handler
            worker.join(timeout=10)
            time.sleep(5)
        worker.join(timeout=10)
        assert worker.exitcode == -signal.SIGTERM
        stream._rendered = None  # the loader notices its dead worker on the next batch; none is asked
    finally:
        signal.signal(signal.SIGTERM, previous)
