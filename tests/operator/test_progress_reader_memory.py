"""What the progress reader keeps between passes stays small whatever rank 0 answers: many jobs
answering a whole `/progress` cap of cheap-to-send, costly-to-parse JSON, measured with tracemalloc."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

import fakegpu
from ftj_builders import make_pod
from rank0_servers import Rank0, rank0_servers, reply

from kubetune.operator.runtime.progress_reader import ProgressReader
from kubetune.operator.settings import OperatorSettings

CAP = OperatorSettings().progress_max_bytes
JOBS_PER_BODY = 12


def filled(head: bytes, item: bytes, tail: bytes, size: int = CAP) -> bytes:
    """`head item,item,...,item tail` as long as fits in `size` bytes."""
    count = (size - len(head) - len(tail) + 1) // (len(item) + 1)
    return head + b",".join([item] * count) + tail


DEPTH = 300
BODIES = {
    "a list of empty objects": filled(b"[", b"{}", b"]"),
    "empty objects under an ignored key": filled(b'{"x": [', b"{}", b"]}"),
    "samples with empty text": filled(b'{"samples": [', b'{"step": 1, "prompt": "", "uri": ""}', b"]}"),
    "deep and then wide": filled(b'{"x": ' + b"[" * DEPTH, b"{}", b"]" * DEPTH + b"}"),
    "the most a report keeps": filled(b'{"samples": [', b'{"step": 1, "prompt": "' + b"p" * 960 + b'", "uri": ""}',
                                      b"]}"),  # 64 samples of 960 characters: nothing dropped or cut
}




def hostile_pods(serve: Callable[..., Rank0]) -> tuple[int, dict[tuple[str, int], dict[str, Any]]]:
    """The one port every rank 0 listens on, and `JOBS_PER_BODY` jobs' rank 0 pods per body, each
    body served on a loopback address of its own."""
    port, jobs = 0, {}
    for name, body in BODIES.items():
        server = serve(reply(body), port=port)
        port = server.port
        for i in range(JOBS_PER_BODY):
            pod = make_pod().running().pod_ip(server.ip).obj()
            pod["metadata"]["uid"] = f"{name}-{i}"
            jobs[(name, i)] = pod
    return port, jobs


def retained_by_reads(reader: Any, jobs: dict[tuple[str, int], dict[str, Any]]) -> tuple[int, int]:
    """Bytes the reader still holds once every job's read has ended (nothing taken yet, as when the
    passes are behind), and the most it held meanwhile."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for key, pod in jobs.items():
            reader.take(key, pod)
        fakegpu.wait_for(lambda: not any(reader.state(key).in_flight for key in jobs), timeout=60, what="the reads")
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before, peak - before


def test_many_hostile_answers_keep_the_readers_memory_bounded() -> None:
    with rank0_servers() as serve:
        port, jobs = hostile_pods(serve)
        reader = ProgressReader(port, deadline=30.0)
        try:
            retained, peak = retained_by_reads(reader, jobs)
        finally:
            reader.close()
    print(f"\n{len(jobs)} jobs answering {CAP} bytes: {retained} bytes retained ({retained // len(jobs)} a job), "
          f"peak {peak}")
    assert retained < len(jobs) * CAP, "a job keeps a bounded report and a digest, never the parsed document"
    assert peak < 3 * len(jobs) * CAP, "the bodies in flight and one decoded document at a time, no more"
