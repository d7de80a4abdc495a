"""The progress reader against real HTTP servers on loopback that answer as a hostile rank 0 might:
slowly, with a redirect, too much, or not at all."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import fakegpu
import pytest
from ftj_builders import make_pod
from rank0_servers import Rank0, drip, endless_body, rank0_servers, reply, silent

from kubetune.operator.runtime.progress_reader import (
    CHECKPOINTS_KEPT,
    SAMPLES_KEPT,
    SKIPPED_FILES_KEPT,
    TEXT_CHARS,
    URI_CHARS,
    ProgressReader,
    backoff,
    bounded_report,
    progress_url,
)

KEY = ("team-a", "corgi")
DOC = {"stage": "training", "step": 3}
REPORT = bounded_report(DOC)


class News:
    """Records `on_news` calls (from the reader's thread)."""

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.arrived = threading.Event()

    def __call__(self, key: Any) -> None:
        self.keys.append(key)
        self.arrived.set()


@pytest.fixture
def serve() -> Iterator[Callable[..., Rank0]]:
    with rank0_servers() as start:
        yield start


@pytest.fixture
def reader_for() -> Iterator[Callable[..., ProgressReader]]:
    made: list[ProgressReader] = []

    def make(port: int, **kwargs: Any) -> ProgressReader:
        kwargs.setdefault("deadline", 2.0)
        made.append(ProgressReader(port, **kwargs))
        return made[-1]

    yield make
    for reader in made:
        reader.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pod_at(ip: str, uid: str = "pod-1") -> dict[str, Any]:
    pod = make_pod().running().pod_ip(ip).obj()
    pod["metadata"]["uid"] = uid
    return pod


def failed_once(reader: ProgressReader, key: Any = KEY) -> str:
    state = fakegpu.wait_for(lambda: (s := reader.state(key)) and s.failures and not s.in_flight and s,
                             timeout=10, what="the read to fail")
    return state.error


def test_a_pass_takes_each_reading_once_and_news_asks_for_a_pass(serve, reader_for) -> None:
    rank0 = serve(reply(json.dumps(DOC).encode()))
    news = News()
    reader = reader_for(rank0.port, on_news=news)
    pod = pod_at(rank0.ip)
    assert reader.take(KEY, pod) is None, "the first pass finds nothing yet and asks for a read"
    assert news.arrived.wait(10) and news.keys == [KEY]
    assert reader.take(KEY, pod) == REPORT
    assert reader.take(KEY, pod) is None, "a reading is news to one pass only"
    assert rank0.requests == ["/progress"], "within the interval no second read starts"


def test_a_reading_unlike_the_last_is_news_and_the_same_is_not(serve, reader_for) -> None:
    answers = iter([DOC, DOC, {**DOC, "step": 4}])
    rank0 = serve(lambda handler: reply(json.dumps(next(answers)).encode())(handler))
    news, clock = News(), Clock()
    reader = reader_for(rank0.port, on_news=news, interval=5.0, clock=clock)
    pod = pod_at(rank0.ip)
    for expected_news in (1, 1, 2):
        before = len(rank0.requests)
        reader.take(KEY, pod)
        fakegpu.wait_for(lambda n=before: len(rank0.requests) > n and not reader.state(KEY).in_flight,
                         what="the read")
        fakegpu.wait_for(lambda n=expected_news: len(news.keys) >= n, what="news")
        assert len(news.keys) == expected_news
        clock.now += 5.0
    assert reader.take(KEY, pod) == bounded_report({**DOC, "step": 4})


def test_a_redirect_is_not_followed(serve, reader_for) -> None:
    target = serve(reply(b'{"secret": "internal"}'))
    rank0 = serve(reply(b"", 302, {"Location": f"http://127.0.0.1:{target.port}/internal"}))
    reader = reader_for(rank0.port)
    reader.take(KEY, pod_at(rank0.ip))
    assert "HTTP 302" in failed_once(reader)
    assert rank0.requests == ["/progress"] and target.requests == []
    assert reader.take(KEY, pod_at(rank0.ip)) is None


def test_a_pod_that_drips_bytes_is_cut_off_at_the_deadline(serve, reader_for) -> None:
    rank0 = serve(drip(0.1))
    reader = reader_for(rank0.port, deadline=0.5)
    reader.take(KEY, pod_at(rank0.ip))
    assert "no whole answer within 0.5s" in failed_once(reader)
    assert rank0.hung_up.wait(5), "the reader closed the connection"


@pytest.mark.parametrize(("answer", "error"), [
    (reply(b"x" * 200_001), "200001 bytes, more than 200000"),
    (reply(b"x" * 200_001, length=False), "more than 200000 bytes"),
    (endless_body, "more than 200000 bytes"),
    (reply(b"[" * 100_000), "not JSON: RecursionError"),
    (reply(b"not json"), "not JSON"),
    (reply(b"[{}, {}]"), "not a /progress document"),
    (reply(b"{}", 500), "HTTP 500"),
    (reply(gzip.compress(json.dumps(DOC).encode()), 200, {"Content-Encoding": "gzip"}), "not JSON"),  # never inflated
])
def test_answers_that_are_refused(serve, reader_for, answer, error) -> None:
    rank0 = serve(answer)
    reader = reader_for(rank0.port, max_bytes=200_000, deadline=30.0)
    reader.take(KEY, pod_at(rank0.ip))
    assert error in failed_once(reader)


def test_a_body_of_exactly_the_cap_is_read(serve, reader_for) -> None:
    body = json.dumps(DOC).encode()
    body += b" " * (1000 - len(body))
    rank0 = serve(reply(body, length=False))
    news = News()
    reader = reader_for(rank0.port, max_bytes=1000, on_news=news)
    reader.take(KEY, pod_at(rank0.ip))
    assert news.arrived.wait(10) and reader.take(KEY, pod_at(rank0.ip)) == REPORT


@pytest.mark.parametrize("ip", ["localhost", "rank0.corgi.team-a.svc", "0.0.0.0", "224.0.0.1", "fe80::1%eth0", ""])
def test_only_an_ip_literal_of_the_pod_is_read(serve, reader_for, ip: str) -> None:
    rank0 = serve(reply(json.dumps(DOC).encode()))
    reader = reader_for(rank0.port)
    pod = make_pod().running().obj()
    pod["status"]["podIP"] = ip
    assert progress_url(pod, rank0.port) is None
    assert reader.take(KEY, pod) is None and not reader.state(KEY).in_flight
    time.sleep(0.2)  # a read, had one started, would have reached the server by now
    assert rank0.requests == []


def test_one_read_per_job_and_a_failing_job_backs_off(serve, reader_for) -> None:
    rank0 = serve(silent)
    clock = Clock()
    reader = reader_for(rank0.port, deadline=0.5, interval=1.0, max_backoff=8.0, clock=clock)
    pod = pod_at(rank0.ip)
    for _ in range(20):
        reader.take(KEY, pod)
    fakegpu.wait_for(lambda: rank0.requests, what="the first read")
    failed_once(reader)
    assert len(rank0.requests) == 1, "twenty passes, one read in flight"
    waits = []
    for failures in (1, 2, 3, 4, 5):
        state = reader.state(KEY)
        assert state.failures == failures and not state.in_flight
        waits.append(state.next_read_in)
        reader.take(KEY, pod)
        assert not reader.state(KEY).in_flight, "backing off: no read yet"
        clock.now += state.next_read_in
        reader.take(KEY, pod)
        fakegpu.wait_for(lambda f=failures: reader.state(KEY).failures == f + 1, what="the next read to fail")
    assert waits == [2.0, 4.0, 8.0, 8.0, 8.0]
    assert len(rank0.requests) == 6


def test_a_pod_not_listening_yet_is_tried_again_at_the_usual_interval(serve, reader_for) -> None:
    rank0 = serve(reply(json.dumps(DOC).encode()))
    rank0.shutdown()
    rank0.server_close()  # the trainer's server is not up yet: connections are refused
    clock = Clock()
    reader = reader_for(rank0.port, interval=1.0, clock=clock)
    for failures in (1, 2, 3):
        reader.take(KEY, pod_at(rank0.ip))
        fakegpu.wait_for(lambda f=failures: reader.state(KEY).failures == f, what="the read to fail")
        state = reader.state(KEY)
        assert "Connect" in state.error and state.next_read_in == 1.0
        clock.now += 1.0


def test_a_silent_pod_does_not_delay_another_jobs_reading(serve, reader_for) -> None:
    hostile = serve(silent)
    friendly = serve(reply(json.dumps(DOC).encode()), port=hostile.port)
    news = News()
    reader = reader_for(hostile.port, deadline=30.0, on_news=news)
    reader.take(("team-a", "hostile"), pod_at(hostile.ip, "pod-h"))
    fakegpu.wait_for(lambda: hostile.requests, what="the hostile pod's read")
    reader.take(KEY, pod_at(friendly.ip))
    assert news.arrived.wait(10) and news.keys == [KEY]
    assert reader.state(("team-a", "hostile")).in_flight


def test_a_new_rank0_pod_starts_afresh_and_a_forgotten_job_hears_nothing(serve, reader_for) -> None:
    rank0 = serve(reply(json.dumps(DOC).encode()))
    news = News()
    reader = reader_for(rank0.port, on_news=news)
    reader.take(KEY, pod_at(rank0.ip, "pod-1"))
    assert news.arrived.wait(10)
    assert reader.take(KEY, pod_at(rank0.ip, "pod-2")) is None, "the old pod's reading is not the new pod's"
    fakegpu.wait_for(lambda: len(news.keys) == 2, what="the new pod's first reading")
    reader.forget(KEY)
    assert reader.state(KEY) is None



@pytest.mark.parametrize(("failures", "refused", "wait"), [
    (1, False, 10.0), (2, False, 20.0), (3, False, 40.0), (4, False, 60.0),
    (1024, False, 60.0), (10**6, False, 60.0),  # 2 ** 1024 overflows a float: the exponent is capped
    (10**6, True, 5.0),  # nothing listening: the usual interval, however many refusals came before
])
def test_backoff_doubles_up_to_its_cap_and_never_overflows(failures: int, refused: bool, wait: float) -> None:
    assert backoff(5.0, failures, refused, 60.0) == wait


class FailingOnReaderThread(Clock):
    """A clock that fails `times` times when the reader's own thread asks it: a read's bookkeeping
    raising where nothing expected it."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    def __call__(self) -> float:
        if threading.current_thread().name == "kubetune-progress" and self.times > 0:
            self.times -= 1
            raise RuntimeError("clock broke")
        return self.now


def test_a_read_that_raises_is_logged_and_the_reader_keeps_reading(serve, reader_for, caplog) -> None:
    rank0 = serve(reply(json.dumps(DOC).encode()))
    news, clock = News(), FailingOnReaderThread(times=1)
    reader = reader_for(rank0.port, on_news=news, clock=clock)
    pod = pod_at(rank0.ip)
    reader.take(KEY, pod)
    fakegpu.wait_for(lambda: "recording a read" in caplog.text, what="the failed read to be logged")
    fakegpu.wait_for(lambda: not reader.state(KEY).in_flight, what="the read to end")
    assert news.keys == [] and reader.take(KEY, pod) is None, "the broken read told nothing"
    assert news.arrived.wait(10), "the next take started a read that worked"
    assert reader.take(KEY, pod) == REPORT and len(rank0.requests) == 2
    assert "never retrieved" not in caplog.text


def test_a_thousand_failures_in_a_row_still_back_off(serve, reader_for) -> None:
    rank0 = serve(reply(b"{}", 500))
    clock = Clock()
    reader = reader_for(rank0.port, interval=1.0, max_backoff=8.0, clock=clock)
    pod = pod_at(rank0.ip)
    reader.take(KEY, pod)
    failed_once(reader)
    reader._jobs[KEY].failures = 1100  # as after hours of refusals: each counts
    clock.now += 8.0
    reader.take(KEY, pod)
    state = fakegpu.wait_for(lambda: (s := reader.state(KEY)).failures == 1101 and not s.in_flight and s,
                             what="the next read to fail")
    assert state.next_read_in == 8.0, "the back-off survives a failure count past 1024"


def samples(n: int, prompt: str = "a corgi", uri: str = "s3://out/samples/x.png") -> list[dict[str, Any]]:
    return [{"step": i, "prompt": prompt, "uri": uri} for i in range(n)]


def checkpoints(n: int, uri: str = "s3://out/checkpoints/step/") -> list[dict[str, Any]]:
    return [{"step": i, "uri": uri, "createdAt": "2026-11-21T12:00:00Z"} for i in range(n)]


@pytest.mark.parametrize(("doc", "check"), [
    ({"samples": samples(5000)}, lambda r: [s.step for s in r.samples] == list(range(5000 - SAMPLES_KEPT, 5000))),
    ({"checkpoints": checkpoints(5000)},
     lambda r: [c.step for c in r.checkpoints] == list(range(5000 - CHECKPOINTS_KEPT, 5000))),
    ({"samples": samples(2, prompt="p" * 100_000)}, lambda r: [len(s.prompt) for s in r.samples] == [TEXT_CHARS] * 2),
    ({"checkpoints": checkpoints(1, uri="s3://out/" + "k" * URI_CHARS)}, lambda r: r.checkpoints == ()),
    ({"data": {"images": 1, "skipped": 9999, "skippedFiles": [{"file": "f" * 5000, "reason": "r"}] * 500}},
     lambda r: len(r.data.skipped_files) == SKIPPED_FILES_KEPT and len(r.data.skipped_files[0].file) == TEXT_CHARS),
    ({"step": 3, "stepLoss": float("nan"), "smoothedLoss": float("-inf"), "imagesPerSecond": float("inf")},
     lambda r: (r.progress.step, r.progress.step_loss, r.progress.smoothed_loss, r.progress.images_per_second)
     == (3, None, None, None)),
    ({"step": 10**30, "checkpoints": [{"step": 10**30, "uri": "s3://x/"}]},
     lambda r: r.progress.step is None and r.checkpoints == ()),  # the API server's int64 would refuse it
    ({"stage": "training", "x": [{}] * 10_000}, lambda r: r.stage == "training" and r.progress is not None),
])
def test_a_kept_report_is_small_whatever_rank0_sent(doc: dict[str, Any], check: Callable[[Any], bool]) -> None:
    assert check(bounded_report(doc))


def test_the_trainers_own_progress_is_kept_whole() -> None:
    doc = {"phase": "Training", "step": 1500, "totalSteps": 2000, "smoothedLoss": 0.08, "checkpoints": checkpoints(10),
           "samples": samples(16), "data": {"images": 118, "skipped": 1,
                                            "skippedFiles": [{"file": "a.jpg", "reason": "truncated image"}]}}
    report = bounded_report(doc)
    assert (report.stage, report.progress.percent, len(report.checkpoints), len(report.samples)) == ("training", 75,
                                                                                                      10, 16)
    assert report.data.skipped_files[0].file == "a.jpg"


def test_the_report_page_survives_the_bounding() -> None:
    from kubetune.operator.runtime.progress_reader import bounded_report
    doc = {"stage": "training", "step": 3, "outputs": {"report": "s3://out/job/report/index.html"}}
    report = bounded_report(doc)
    assert report is not None and report.report == "s3://out/job/report/index.html"
    long = bounded_report({**doc, "outputs": {"report": "s3://out/" + "x" * 5000}})
    assert long is not None and long.report is None
