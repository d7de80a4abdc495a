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

from kubetune.operator.progress_reader import ProgressReader, progress_url

KEY = ("team-a", "corgi")
DOC = {"stage": "training", "step": 3}


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
    assert reader.take(KEY, pod) == DOC
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
    assert reader.take(KEY, pod) == {**DOC, "step": 4}


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
    assert news.arrived.wait(10) and reader.take(KEY, pod_at(rank0.ip)) == DOC


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

