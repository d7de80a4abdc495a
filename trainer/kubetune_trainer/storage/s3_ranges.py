"""Download one S3 object as ranged GETs into a preallocated file, checked as it lands.

How an object is cut is a `RangePolicy`. By default the first GET asks for the whole object
(`bytes=0-`) and its Content-Range tells the total, so a small object costs exactly one
request (its MD5 ETag hashed as it streams). Once the first `probe` bytes have arrived, the
rest is split over more streams only if each range would be long enough that the server's
time to first byte, measured on that first GET, stays a small share of the range's time: a
server with a fixed, small cost per request (S3) gets parallel ranges, one whose cost grows
with the object (moto reads the whole object for every range) keeps one stream per object.
With a fixed `chunk`, the first GET asks for the first chunk and the rest follows in chunks.

An object longer than the probe, or split, costs one HEAD for its stored checksum. The other
ranges are fetched by a few threads and written with pwrite at their offsets; they carry
If-Match on the first answer's ETag, so a replaced object fails instead of mixing versions.
A stream whose body breaks off is asked for again from where it stopped.

Every byte is checked where the object carries a digest (`transfer_checks`), chosen by
`_choose_check`: an object long enough to be worth a HEAD is checked against S3's stored
full-object CRC32 where it has one (per range, in parallel); else a multipart object against
its ETag, the MD5 of its parts' MD5s (one HEAD of part 1 tells the part size; each part hashed
on its own), and a single-part object against its ETag's MD5. An object encrypted with SSE-KMS
or SSE-C, or in an S3 Express directory bucket, has an ETag that is no MD5: it is checked
against a stored full-object CRC32 if it has one, and otherwise arrives unchecked
(`Fetched.digest` empty; the stager counts it).
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from kubetune_trainer.exitcodes import StorageUnavailable
from kubetune_trainer.storage.interface import Fetched, is_md5_etag, is_multipart_etag
from kubetune_trainer.storage.s3_http import Answer, ObjectGetter
from kubetune_trainer.storage.transfer_checks import (
    BUFFER,
    OrderedMD5,
    PartMD5s,
    RangeCheck,
    RangedCRC32,
    SizeOnly,
    uniform_parts,
)

MiB = 1 << 20
STREAM_ATTEMPTS = 3
PART_HEADS = 8  # HEADs at once when a multipart object's exact part sizes are needed
DIRECTORY_BUCKET = "--x-s3"  # S3 Express One Zone: its ETags are no MD5s
RANGE_TO_LATENCY = 4  # a range streams at least 4x as long as its first byte takes: latency <= 20%
Landed = Callable[[int, memoryview], None]  # told of each block written: its offset and bytes


def plan_ranges(total: int, chunk: int, start: int = 0) -> list[tuple[int, int]]:
    """Inclusive (first, last) byte ranges of at most `chunk` bytes covering bytes start..total-1."""
    return [(first, min(first + chunk, total) - 1) for first in range(start, total, chunk)]


@dataclass(frozen=True)
class RangePolicy:
    """How one object is cut into ranged GETs, up to `streams` at once (see the module's docstring)."""

    chunk: int | None = None  # fixed range size; None: decided from the first GET
    streams: int = 4
    probe: int = 16 * MiB  # bytes the first stream brings before the rest is planned
    min_range: int = 8 * MiB

    def split(self, total: int, reached: int, latency: float, rate: float) -> list[tuple[int, int]]:
        """Ranges for bytes reached..total-1, the first one kept by the running stream; [] for no split.

        `latency` is the first GET's time to its answer (s), `rate` its body's bytes per second.
        """
        shortest = max(self.min_range, int(RANGE_TO_LATENCY * latency * rate))
        pieces = min(self.streams, (total - reached) // shortest)
        if pieces < 2:
            return []
        return plan_ranges(total, -(-(total - reached) // pieces), reached)


def total_size(answer: Answer) -> int:
    """The whole object's size from a (possibly ranged) GET's answer."""
    if answer.content_range:  # "bytes 0-99/1234"
        return int(answer.content_range.rpartition("/")[2])
    return answer.content_length


def answer_end(answer: Answer) -> int:
    """One past the last byte a GET's answer holds."""
    if answer.content_range:  # "bytes 0-99/1234"
        return int(answer.content_range.partition("-")[2].partition("/")[0]) + 1
    return answer.content_length


class _Span:
    """What one stream brings in: bytes from `offset` up to `end`, which may be lowered while it runs."""

    def __init__(self, first: int, last: int) -> None:
        self.offset, self.end = first, last + 1


class _Download:
    """One object's transfer: where it comes from, the open file, its ETag and a stop flag."""

    def __init__(self, getter: ObjectGetter, bucket: str, key: str, fd: int, uri: str) -> None:
        self.getter, self.bucket, self.key, self.fd, self.uri = getter, bucket, key, fd, uri
        self.etag = ""
        self.stop = threading.Event()

    def first(self, chunk: int | None) -> Answer:
        """The answer to a GET of the first `chunk` bytes, of the whole object without a chunk or
        when it is empty."""
        from botocore.exceptions import ClientError

        try:
            return self.get(0, chunk - 1 if chunk else None)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidRange":
                raise
            return self.getter.get(self.bucket, self.key, {})  # an empty object has no byte 0

    def full_object_crc32(self) -> int | None:
        """S3's stored CRC32 of the whole object, when it keeps one (a composite one does not count)."""
        head = self.getter.client.head_object(Bucket=self.bucket, Key=self.key, ChecksumMode="ENABLED",
                                              IfMatch=f'"{self.etag}"')
        value, kind = head.get("ChecksumCRC32") or "", head.get("ChecksumType")
        full_object = kind == "FULL_OBJECT" or (kind is None and not is_multipart_etag(self.etag))
        if not value or "-" in value or not full_object:
            return None
        return int.from_bytes(base64.b64decode(value), "big")

    def part(self, number: int) -> tuple[int, int]:
        """(size of part `number`, number of parts) from a part-numbered HEAD. No If-Match: some servers
        (moto) compare it with the part's own ETag; a replaced object fails its ranges' If-Match anyway."""
        head = self.getter.client.head_object(Bucket=self.bucket, Key=self.key, PartNumber=number)
        return int(head["ContentLength"]), int(head.get("PartsCount") or 0)

    def likely_parts(self, total: int) -> list[int] | None:
        """The part sizes a multipart object most likely has: all as long as part 1 but the last
        (one HEAD); its exact sizes where that cut cannot give `total`; None where the server
        does not tell part sizes."""
        from botocore.exceptions import ClientError

        count = int(self.etag.rpartition("-")[2])
        try:
            first, told = self.part(1)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (400, 501):
                return None  # no part-numbered HEADs here
            raise
        if told not in (0, count):
            return None
        parts = uniform_parts(total, first, count) or self.exact_parts(count)
        return parts if sum(parts) == total else None

    def exact_parts(self, count: int) -> list[int]:
        """Every part's size, one HEAD each: asked for only when the likely cut does not fit."""
        with ThreadPoolExecutor(max_workers=PART_HEADS, thread_name_prefix="part-head") as pool:
            return [size for size, _ in pool.map(self.part, range(1, count + 1))]

    def get(self, first: int, last: int | None) -> Answer:
        headers = {"Range": f"bytes={first}-{'' if last is None else last}"}
        if self.etag:
            headers["If-Match"] = f'"{self.etag}"'
        answer = self.getter.get(self.bucket, self.key, headers)
        if first and not answer.content_range.startswith(f"bytes {first}-"):
            answer.body.close()
            raise StorageUnavailable(f"{self.uri}: the server answered bytes {first}-{last} with "
                                     f"{answer.content_range or 'the whole object'}")
        return answer

    def write_body(self, body: Any, span: _Span, asked_end: int, landed: Landed) -> None:
        """Copy `body`, which holds bytes up to `asked_end`, to the file from `span.offset` until `span.end`."""
        view = memoryview(bytearray(min(BUFFER, span.end - span.offset)))  # small objects need small buffers
        try:
            while span.offset < span.end and not self.stop.is_set():
                count = body.readinto(view[:min(BUFFER, span.end - span.offset)])
                if not count:
                    break
                written = 0
                while written < count:
                    written += os.pwrite(self.fd, view[written:count], span.offset + written)
                offset = span.offset
                span.offset += count
                landed(offset, view[:count])
        finally:
            if span.offset == asked_end:
                body.release_conn()
            else:
                body.close()  # a connection with unread bytes cannot be reused

    def fetch(self, first: int, last: int, landed: Landed, answer: Answer | None = None,
              span: _Span | None = None) -> None:
        """Bring bytes first..last (inclusive; `span.end` if given, which may be lowered meanwhile)
        into the file, re-asking from where a broken stream stopped."""
        from urllib3.exceptions import ProtocolError, ReadTimeoutError

        span = span or _Span(first, last)
        asked_end = answer_end(answer) if answer else span.end  # an open-ended answer runs past span.end
        for attempt in range(1, STREAM_ATTEMPTS + 1):
            try:
                if answer is None:
                    answer, asked_end = self.get(span.offset, span.end - 1), span.end
                self.write_body(answer.body, span, asked_end, landed)
            except (ProtocolError, ReadTimeoutError) as exc:
                if attempt == STREAM_ATTEMPTS:
                    raise StorageUnavailable(f"{self.uri}: download broke off {STREAM_ATTEMPTS} times: "
                                             f"{type(exc).__name__}") from exc
            answer = None
            if span.offset >= span.end or self.stop.is_set():
                return
        raise StorageUnavailable(f"{self.uri}: bytes {first}-{span.end - 1} arrived short {STREAM_ATTEMPTS} "
                                 f"times ({span.offset - first} bytes)")


def ranged_get(getter: ObjectGetter, bucket: str, key: str, path: Path, policy: RangePolicy, uri: str) -> Fetched:
    """Download s3://bucket/key to `path`: its ETag and the digest its bytes were checked against."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    check: RangeCheck = SizeOnly()
    try:
        job = _Download(getter, bucket, key, fd, uri)
        sent = time.monotonic()
        first = job.first(policy.chunk)
        latency = time.monotonic() - sent
        job.etag = first.etag
        total = total_size(first)
        os.ftruncate(fd, total)
        ranges = plan_ranges(total, policy.chunk) if first.content_range and policy.chunk else [(0, total - 1)]
        try:
            etag_is_digest = not first.encrypted and not bucket.endswith(DIRECTORY_BUCKET)
            check, digest = _choose_check(job, fd, ranges, total, etag_is_digest,
                                          want_crc=len(ranges) > 1 or total > policy.probe)
        except BaseException:
            first.body.close()  # its bytes are not wanted now
            raise
        may_split = policy.chunk is None and policy.streams > 1 and bool(first.content_range)
        _fetch_ranges(job, ranges, first, check, policy, latency if may_split and total > policy.probe else None)
        check.verify(uri)
        return Fetched(job.etag, digest)
    finally:
        check.close()  # before the file: a check may still be reading it
        os.close(fd)


def _choose_check(job: _Download, fd: int, ranges: list[tuple[int, int]], total: int, etag_is_digest: bool,
                  want_crc: bool) -> tuple[RangeCheck, str]:
    """The check for this object and its name (see the module's docstring); (SizeOnly(), "") when
    the object carries no digest we can compute.

    A full-object CRC32 is asked for first when `want_crc` (a HEAD is cheap next to the bytes, and
    CRCs are computed per range in parallel where an ETag is hashed front to back), or when the
    ETag is of no use (`etag_is_digest` false: encrypted, a directory bucket, or a server of its own ways).
    """
    single = etag_is_digest and is_md5_etag(job.etag)
    multipart = etag_is_digest and is_multipart_etag(job.etag)
    asked = want_crc or not (single or multipart)
    if asked:
        crc = job.full_object_crc32()
        if crc is not None:
            return RangedCRC32(ranges, crc), "crc32"
    if multipart:
        parts = job.likely_parts(total)
        if parts is not None:
            return PartMD5s(fd, parts, job.etag, partial(job.exact_parts, len(parts))), "multipart-md5"
        crc = None if asked else job.full_object_crc32()
        if crc is not None:
            return RangedCRC32(ranges, crc), "crc32"
    return (OrderedMD5(fd, ranges, job.etag), "md5") if single else (SizeOnly(), "")


class _Probe:
    """The first stream's hook when the rest may be split: after `policy.probe` bytes, measure the
    rate, ask the policy, and if it splits, stop this stream at its new end and start the others."""

    def __init__(self, policy: RangePolicy, check: RangeCheck, span: _Span, latency: float,
                 start: Callable[[list[tuple[int, int]]], None]) -> None:
        self.policy, self.check, self.span, self.latency, self.start = policy, check, span, latency, start
        self.began = time.monotonic()
        self.decided = False

    def __call__(self, offset: int, block: memoryview) -> None:
        self.check.landed(0, offset, block)
        reached = self.span.offset
        if self.decided or reached < self.policy.probe:
            return
        self.decided = True
        rate = reached / max(time.monotonic() - self.began, 1e-6)
        rest = self.policy.split(self.span.end, reached, self.latency, rate)
        if rest:
            ranges = [(0, rest[0][1]), *rest[1:]]
            self.check.split(ranges)
            self.span.end = rest[0][1] + 1
            self.start(ranges)


def _fetch_ranges(job: _Download, ranges: list[tuple[int, int]], first: Answer, check: RangeCheck,
                  policy: RangePolicy, latency: float | None) -> None:
    """Range 0 streams on this thread, the rest on up to `streams - 1` helpers; first error wins.

    With a `latency`, range 0 is the whole object until the probe decides whether to split it.
    """
    def fetch(index: int, span: _Span) -> None:
        if span.end > span.offset:
            job.fetch(span.offset, span.end - 1, partial(check.landed, index), span=span)

    lead = _Span(*ranges[0])
    if len(ranges) == 1 and latency is None:
        if lead.end:
            job.fetch(0, ranges[0][1], partial(check.landed, 0), first, lead)
        else:
            first.body.close()  # an empty object
        return
    futures: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=max(1, policy.streams - 1), thread_name_prefix="range") as pool:
        def start(planned: list[tuple[int, int]]) -> None:
            futures.extend(pool.submit(fetch, index, _Span(*planned[index])) for index in range(1, len(planned)))

        start(ranges)
        landed = _Probe(policy, check, lead, latency, start) if latency is not None else partial(check.landed, 0)
        try:
            job.fetch(0, ranges[0][1], landed, first, lead)
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()
        except BaseException:
            job.stop.set()
            for future in futures:
                future.cancel()
            raise
