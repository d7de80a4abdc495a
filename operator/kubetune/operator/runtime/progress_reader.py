"""Rank 0's `/progress`, read in the background: a reconcile pass never waits for a pod.

The user picks the trainer image, so rank 0 may answer anything: a redirect to a service
inside the cluster, one byte every few seconds, a gigabyte, JSON nested ten thousand deep.
A pass used to read `/progress` itself, so eight such pods held every reconcile worker and
other jobs' status stood still. Here each read:

- goes only to the pod's own `status.podIP` (an IP literal; a name is never resolved) and
  the configured port, and never follows a redirect (any answer but 200 is a failed read);
- ends within one overall deadline (connect, headers and body together, not per socket
  read) and is refused once its body passes a size cap;
- runs on an event loop of its own thread, at most one per job at a time; a job whose reads
  keep failing waits longer before the next (doubling, capped), so a hostile pod costs a
  bounded share of one coroutine and never another job's time. A refused connection costs
  nothing and is the usual answer while the trainer starts, so it is tried again at the
  usual interval.

A pass takes what was read since the last pass (`take`, never blocking) and so asks for a
fresh read; when a read brings news, `on_news(key)` asks for the job's next pass.

What a job keeps between reads is small whatever rank 0 answers: a body becomes a bounded
`ProgressReport` (newest checkpoints and samples, first skipped files, text cut) and a digest
to tell news, in the same step that decodes it; the decoded document itself is never kept.
Parsing 64 KiB of `[{},{},...]` takes over a megabyte, so a reader that kept documents let
a few dozen hostile pods exhaust the operator's memory for every tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel

from kubetune.operator.reports import ProgressReport, parse_progress
from kubetune.operator.settings import OperatorSettings

LOG = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 32
"""Newest checkpoints kept from one reading (the status merges them with those it already lists)."""
SAMPLES_KEPT = 64
"""Newest samples kept from one reading (the trainer reports its last 16)."""
SKIPPED_FILES_KEPT = 10
"""First skipped files kept from one reading, as many as the status lists."""
TEXT_CHARS = 1024
"""Prompts, file names, reasons and timestamps are cut to this many characters."""
URI_CHARS = 2048
"""A checkpoint or sample whose URI is longer is no real one (an S3 key is at most 1024 bytes): dropped."""
MAX_BACKOFF_DOUBLINGS = 16
"""Failures past this many no longer double the wait (it is capped anyway): 2**failures would overflow a float."""
INT64 = (-(2**63), 2**63 - 1)
M = TypeVar("M", bound=BaseModel)


class ReadFailed(Exception):
    """Rank 0's answer was not a `/progress` document the operator accepts."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        """Nothing listened on the port (the trainer's server not up yet): not the pod's fault."""


def progress_url(pod: dict[str, Any], port: int) -> str | None:
    """Where rank 0 serves its progress: its own IP literal and `port`; None until it has an IP, or
    when `status.podIP` is not an IP (never resolved as a name)."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip or not isinstance(ip, str):
        return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if address.is_unspecified or address.is_multicast or getattr(address, "scope_id", None):
        return None
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{port}/progress"


def decode(body: bytes) -> Any:
    """The JSON document of a body; nesting too deep for the parser is a failed read, not a crash."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ReadFailed(f"not JSON: {type(exc).__name__}") from None


def backoff(interval: float, failures: int, refused: bool, max_backoff: float) -> float:
    """Seconds until the next read after `failures` in a row: the interval when nothing listened, else
    doubling per failure up to `max_backoff` (the exponent capped so that it never overflows)."""
    if refused:
        return interval
    return min(max_backoff, interval * 2 ** min(failures, MAX_BACKOFF_DOUBLINGS))


def _sane(model: M) -> M | None:
    """`model` with numbers the API server would refuse (NaN, infinities, past int64) set to their
    defaults; None when such a number is a required field."""
    fixes = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        bad_float = isinstance(value, float) and not math.isfinite(value)
        if bad_float or (isinstance(value, int) and not INT64[0] <= value <= INT64[1]):
            if info.is_required():
                return None
            fixes[name] = info.get_default(call_default_factory=True)
    return model.model_copy(update=fixes) if fixes else model


def _cut(model: M | None, *names: str) -> M | None:
    """`model`, sane, with the text fields `names` cut to `TEXT_CHARS`; None when it has no place in status."""
    if model is None or len(getattr(model, "uri", "") or "") > URI_CHARS:
        return None
    sane = _sane(model)
    if sane is None:
        return None
    long = {n: getattr(sane, n)[:TEXT_CHARS] for n in names if len(getattr(sane, n) or "") > TEXT_CHARS}
    return sane.model_copy(update=long) if long else sane


def bounded_report(doc: Any) -> ProgressReport | None:
    """What a pass needs of a `/progress` document, small whatever rank 0 sent (None: not a progress
    document): the newest checkpoints and samples, the first skipped files, text cut, numbers sane."""
    if not isinstance(doc, dict):
        return None
    lists = {k: doc[k][-n:] for k, n in (("checkpoints", CHECKPOINTS_KEPT), ("samples", SAMPLES_KEPT))
             if isinstance(doc.get(k), list)}  # validate no more entries than are kept
    report = parse_progress({**doc, **lists})
    if report is None:
        return None
    data = _cut(report.data)
    if data is not None:
        files = (_cut(f, "file", "reason") for f in data.skipped_files[:SKIPPED_FILES_KEPT])
        data = data.model_copy(update={"skipped_files": [f for f in files if f is not None]})
    return ProgressReport(
        report.stage,
        _cut(report.progress, "updated_at"),
        tuple(c for c in (_cut(c, "created_at") for c in report.checkpoints[-CHECKPOINTS_KEPT:]) if c is not None),
        tuple(s for s in (_cut(s, "prompt") for s in report.samples[-SAMPLES_KEPT:]) if s is not None),
        data,
        report.report if report.report is not None and len(report.report) <= URI_CHARS else None,
    )


def reading_of(body: bytes) -> tuple[bytes, ProgressReport]:
    """A body's digest (to tell news) and its bounded report, or ReadFailed; the decoded document is
    dropped before this returns, so no more than one exists at a time."""
    report = bounded_report(decode(body))
    if report is None:
        raise ReadFailed("not a /progress document (a JSON object)")
    return hashlib.sha256(body).digest(), report


async def fetch(session: aiohttp.ClientSession, url: str, deadline: float, max_bytes: int) -> bytes:
    """One GET of `url`, all of it within `deadline` seconds: the body, or ReadFailed."""
    try:
        async with asyncio.timeout(deadline):
            async with session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ReadFailed(f"HTTP {response.status} (redirects are not followed)"
                                     if 300 <= response.status < 400 else f"HTTP {response.status}")
                if (response.content_length or 0) > max_bytes:
                    raise ReadFailed(f"{response.content_length} bytes, more than {max_bytes}")
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > max_bytes:
                        raise ReadFailed(f"more than {max_bytes} bytes")
    except TimeoutError:
        raise ReadFailed(f"no whole answer within {deadline:g}s") from None
    except (aiohttp.ClientError, OSError) as exc:
        refused = isinstance(exc, ConnectionRefusedError) or isinstance(getattr(exc, "os_error", None),
                                                                       ConnectionRefusedError)
        raise ReadFailed(f"{type(exc).__name__}: {exc}", refused) from None
    return bytes(body)


@dataclass(frozen=True)
class ReadState:
    """One job's reads as they stand (for tests and logs)."""

    in_flight: bool
    failures: int
    """Reads failed in a row."""
    next_read_in: float
    """Seconds until a pass may start the next read (0: now)."""
    error: str | None
    """Why the last read failed (None: it did not)."""


@dataclass
class _Job:
    pod: tuple[str, str]
    """(uid, podIP) of the rank 0 pod these readings are of: a new pod starts afresh."""
    reading: ProgressReport | None = None
    """Read and not yet taken by a pass."""
    fresh: bool = False
    digest: bytes = b""
    """Of the last body read: the same body again is no news."""
    in_flight: bool = False
    next_read: float = 0.0
    failures: int = 0
    error: str | None = None


class ProgressReader:
    """Reads rank 0's `/progress` on a thread of its own; `take` hands each reading to one pass."""

    def __init__(self, port: int, on_news: Callable[[Hashable], object] = lambda key: None, *,
                 deadline: float = 3.0, max_bytes: int = 64 << 10, interval: float = 5.0,
                 max_backoff: float = 60.0, max_reads: int = 64,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.port, self.deadline, self.max_bytes = port, deadline, max_bytes
        self.interval, self.max_backoff = interval, max(max_backoff, interval)
        self._on_news, self._clock = on_news, clock
        self._jobs: dict[Hashable, _Job] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready, self._closing = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(max_reads),),
                                        name="kubetune-progress", daemon=True)
        self._thread.start()
        self._ready.wait()

    @classmethod
    def from_settings(cls, settings: OperatorSettings, on_news: Callable[[Any], object]) -> ProgressReader:
        return cls(settings.metrics_port, on_news, deadline=settings.progress_timeout_seconds,
                   max_bytes=settings.progress_max_bytes, interval=settings.progress_interval_seconds,
                   max_backoff=settings.progress_backoff_max_seconds)

    def take(self, key: Hashable, pod: dict[str, Any]) -> ProgressReport | None:
        """The report read from `pod` since the last take (None: nothing new); never waits.

        Starts the next read when the job's budget allows: none in flight, and the interval (or,
        after failures, the back-off) since the last one ended has passed.
        """
        url = progress_url(pod, self.port)
        identity = ((pod.get("metadata") or {}).get("uid") or "", (pod.get("status") or {}).get("podIP") or "")
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.pod != identity:
                job = self._jobs[key] = _Job(identity)
            reading, job.reading, fresh, job.fresh = job.reading, None, job.fresh, False
            if url is not None and not job.in_flight and self._clock() >= job.next_read and not self._closing.is_set():
                job.in_flight = True
                with contextlib.suppress(RuntimeError):  # closed meanwhile: no more reads
                    self._loop.call_soon_threadsafe(self._start, key, job, url)
        return reading if fresh else None

    def state(self, key: Hashable) -> ReadState | None:
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                return None
            return ReadState(job.in_flight, job.failures, max(0.0, job.next_read - self._clock()), job.error)

    def forget(self, key: Hashable) -> None:
        """The job is gone: drop its readings (a read in flight ends unheard)."""
        with self._lock:
            self._jobs.pop(key, None)

    def close(self) -> None:
        """Cancel the reads in flight and stop the thread."""
        self._closing.set()
        with contextlib.suppress(RuntimeError):  # the loop has already ended
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _serve(self, max_reads: int) -> None:
        self._stop, self._slots = asyncio.Event(), asyncio.Semaphore(max_reads)
        connector = aiohttp.TCPConnector(force_close=True, limit=max_reads)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                         headers={"Accept": "application/json", "Accept-Encoding": "identity"},
                                         timeout=aiohttp.ClientTimeout(total=None)) as session:
            self._session = session
            self._ready.set()
            await self._stop.wait()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, key: Hashable, job: _Job, url: str) -> None:
        if self._stop.is_set():
            return
        task = self._loop.create_task(self._read(key, job, url))
        self._tasks.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        """Every read's end is heard: an exception that escaped it is logged, never left unretrieved."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            LOG.error("reading rank 0's /progress failed unexpectedly", exc_info=exc)

    async def _read(self, key: Hashable, job: _Job, url: str) -> None:
        digest, report, failed = b"", None, None
        try:
            async with self._slots:  # the deadline is the pod's; waiting for a slot is not
                digest, report = reading_of(await fetch(self._session, url, self.deadline, self.max_bytes))
        except ReadFailed as exc:
            failed = exc
        except Exception as exc:  # whatever happens, the job's next read must not wait forever
            LOG.warning("%s: reading rank 0's /progress failed unexpectedly", key, exc_info=True)
            failed = ReadFailed(f"{type(exc).__name__}: {exc}")
        try:
            news = self._finish(key, job, digest, report, failed)
        except Exception:
            LOG.exception("%s: recording a read of rank 0's /progress failed", key)
            news = False
        finally:
            with self._lock:
                job.in_flight = False  # even when recording failed: the job's next read is not blocked
        if news:
            try:
                self._on_news(key)
            except Exception:
                LOG.exception("%s: asking for a pass after rank 0's news failed", key)

    def _finish(self, key: Hashable, job: _Job, digest: bytes, report: ProgressReport | None,
                failed: ReadFailed | None) -> bool:
        """Record a read's end; True when it brought a body unlike the last one."""
        with self._lock:
            job.in_flight, job.error = False, None if failed is None else str(failed)
            if failed is not None:
                job.failures += 1
                wait = backoff(self.interval, job.failures, failed.refused, self.max_backoff)
                job.next_read = self._clock() + wait
                log = LOG.info if job.failures == 1 else LOG.debug
                log("%s: rank 0's /progress not read: %s; next try in %.0fs", key, failed, wait)
                return False
            job.failures, job.next_read = 0, self._clock() + self.interval
            news = digest != job.digest
            job.reading, job.fresh, job.digest = report, True, digest
            return news and self._jobs.get(key) is job
