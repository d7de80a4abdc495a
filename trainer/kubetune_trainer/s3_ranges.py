"""Download one S3 object as parallel ranged GETs into a preallocated file, checked as it lands.

The first GET asks for the first range and its Content-Range tells the total, so an object
up to one range long costs exactly one request (its MD5 ETag hashed as it streams). A longer
one costs one HEAD for its stored checksum, then its other ranges are fetched by a few
threads and written with pwrite at their offsets; they carry If-Match on the first answer's
ETag, so a replaced object fails instead of mixing versions. The bytes are checked against
S3's full-object CRC32 where the object has one (per range, in parallel), else against a
single-part ETag's MD5 (`transfer_checks`). A range whose body breaks off is asked for again
from where it stopped.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Any

from kubetune_trainer.exitcodes import StorageUnavailable
from kubetune_trainer.s3_http import Answer, ObjectGetter
from kubetune_trainer.storage import is_md5_etag
from kubetune_trainer.transfer_checks import BUFFER, OrderedMD5, RangeCheck, RangedCRC32, SizeOnly

STREAM_ATTEMPTS = 3
Landed = Callable[[int, memoryview], None]  # told of each block written: its offset and bytes


def plan_ranges(total: int, chunk: int) -> list[tuple[int, int]]:
    """Inclusive (first, last) byte ranges of at most `chunk` bytes covering `total` bytes."""
    return [(start, min(start + chunk, total) - 1) for start in range(0, total, chunk)]


def total_size(answer: Answer) -> int:
    """The whole object's size from a (possibly ranged) GET's answer."""
    if answer.content_range:  # "bytes 0-99/1234"
        return int(answer.content_range.rpartition("/")[2])
    return answer.content_length


class _Download:
    """One object's transfer: where it comes from, the open file, its ETag and a stop flag."""

    def __init__(self, getter: ObjectGetter, bucket: str, key: str, fd: int, uri: str) -> None:
        self.getter, self.bucket, self.key, self.fd, self.uri = getter, bucket, key, fd, uri
        self.etag = ""
        self.stop = threading.Event()

    def first(self, chunk: int) -> Answer:
        """The answer to a GET of the first `chunk` bytes (or of the whole object, when it is empty)."""
        from botocore.exceptions import ClientError

        try:
            return self.get(0, chunk - 1)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidRange":
                raise
            return self.getter.get(self.bucket, self.key, {})  # an empty object has no byte 0

    def full_object_crc32(self) -> int | None:
        """S3's stored CRC32 of the whole object, when it keeps one (a composite one does not count)."""
        head = self.getter.client.head_object(Bucket=self.bucket, Key=self.key, ChecksumMode="ENABLED",
                                              IfMatch=f'"{self.etag}"')
        value, kind = head.get("ChecksumCRC32") or "", head.get("ChecksumType")
        full_object = kind == "FULL_OBJECT" or (kind is None and is_md5_etag(self.etag))
        if not value or "-" in value or not full_object:
            return None
        return int.from_bytes(base64.b64decode(value), "big")

    def get(self, first: int, last: int) -> Answer:
        headers = {"Range": f"bytes={first}-{last}"}
        if self.etag:
            headers["If-Match"] = f'"{self.etag}"'
        answer = self.getter.get(self.bucket, self.key, headers)
        if first and not answer.content_range.startswith(f"bytes {first}-"):
            answer.body.close()
            raise StorageUnavailable(f"{self.uri}: the server answered bytes {first}-{last} with "
                                     f"{answer.content_range or 'the whole object'}")
        return answer

    def write_body(self, body: Any, offset: int, end: int, landed: Landed) -> int:
        """Copy `body` to the file from `offset`; return the offset reached (at most `end`)."""
        view = memoryview(bytearray(min(BUFFER, end - offset)))  # small objects need small buffers
        try:
            while offset < end and not self.stop.is_set():
                count = body.readinto(view[:min(BUFFER, end - offset)])
                if not count:
                    break
                written = 0
                while written < count:
                    written += os.pwrite(self.fd, view[written:count], offset + written)
                landed(offset, view[:count])
                offset += count
        finally:
            if offset == end:
                body.release_conn()
            else:
                body.close()  # a connection with unread bytes cannot be reused
        return offset

    def fetch(self, first: int, last: int, landed: Landed, answer: Answer | None = None) -> None:
        """Bring bytes first..last (inclusive) into the file, re-asking from where a broken stream stopped."""
        from urllib3.exceptions import ProtocolError, ReadTimeoutError

        offset, end = first, last + 1
        reached = [offset]  # bytes written and checked so far, kept when a stream breaks mid-body

        def track(at: int, block: memoryview) -> None:
            landed(at, block)
            reached[0] = at + len(block)

        for attempt in range(1, STREAM_ATTEMPTS + 1):
            try:
                answer = answer or self.get(offset, last)
                offset = self.write_body(answer.body, offset, end, track)
            except (ProtocolError, ReadTimeoutError) as exc:
                offset = reached[0]
                if attempt == STREAM_ATTEMPTS:
                    raise StorageUnavailable(f"{self.uri}: download broke off {STREAM_ATTEMPTS} times: "
                                             f"{type(exc).__name__}") from exc
            answer = None
            if offset >= end or self.stop.is_set():
                return
        raise StorageUnavailable(f"{self.uri}: bytes {first}-{last} arrived short {STREAM_ATTEMPTS} times "
                                 f"({offset - first} bytes)")


def ranged_get(getter: ObjectGetter, bucket: str, key: str, path: Path, chunk: int, streams: int, uri: str) -> str:
    """Download s3://bucket/key to `path`; return its ETag. The bytes are checked where they can be."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        job = _Download(getter, bucket, key, fd, uri)
        first = job.first(chunk)
        job.etag = first.etag
        total = total_size(first)
        os.ftruncate(fd, total)
        ranges = plan_ranges(total, chunk) if first.content_range else [(0, total - 1)]
        check = _choose_check(job, fd, ranges)
        _fetch_ranges(job, ranges, first, check, streams)
        check.verify(uri)
        return job.etag
    finally:
        os.close(fd)


def _choose_check(job: _Download, fd: int, ranges: list[tuple[int, int]]) -> RangeCheck:
    """CRC32 per range where S3 keeps a full-object CRC32; else a single-part ETag's MD5; else sizes."""
    if len(ranges) > 1:
        crc = job.full_object_crc32()
        if crc is not None:
            return RangedCRC32(ranges, crc)
    return OrderedMD5(fd, ranges, job.etag) if is_md5_etag(job.etag) else SizeOnly()


def _fetch_ranges(job: _Download, ranges: list[tuple[int, int]], first: Answer,
                  check: RangeCheck, streams: int) -> None:
    """Range 0 streams on this thread, the rest on up to `streams - 1` helpers; first error wins."""
    def fetch(index: int, response: Answer | None = None) -> None:
        start, last = ranges[index]
        landed = partial(check.landed, index)
        if last >= start:
            job.fetch(start, last, landed, response)
        elif response is not None:
            response.body.close()

    if len(ranges) == 1:
        fetch(0, first)
        return
    with ThreadPoolExecutor(max_workers=max(1, min(streams - 1, len(ranges) - 1)),
                            thread_name_prefix="range") as pool:
        futures = [pool.submit(fetch, index) for index in range(1, len(ranges))]
        try:
            fetch(0, first)
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()
        except BaseException:
            job.stop.set()
            for future in futures:
                future.cancel()
            raise
