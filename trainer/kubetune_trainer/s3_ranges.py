"""Download one S3 object as parallel ranged GETs into a preallocated file, checked as it lands.

No HEAD request: the first GET asks for the first range and its Content-Range tells the
total, so a small object costs exactly one request. The other ranges are fetched by a few
threads and written with pwrite at their offsets; later ranges carry If-Match on the first
answer's ETag so a replaced object fails instead of mixing versions. Where the ETag is a
plain MD5, the digest advances over each contiguous prefix while later ranges still stream.
A range whose body breaks off is asked for again from where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Any

from kubetune_trainer.exitcodes import StorageUnavailable, TrainerError
from kubetune_trainer.storage import is_md5_etag

BUFFER = 1 << 20
STREAM_ATTEMPTS = 3
Landed = Callable[[int, memoryview], None]  # told of each block written: its offset and bytes


def plan_ranges(total: int, chunk: int) -> list[tuple[int, int]]:
    """Inclusive (first, last) byte ranges of at most `chunk` bytes covering `total` bytes."""
    return [(start, min(start + chunk, total) - 1) for start in range(0, total, chunk)]


def total_size(response: dict[str, Any]) -> int:
    """The whole object's size from a (possibly ranged) GetObject answer."""
    content_range = response.get("ContentRange")
    if content_range:  # "bytes 0-99/1234"
        return int(content_range.rpartition("/")[2])
    return int(response["ContentLength"])


class OrderedDigest:
    """MD5 of a file written as ranges in parallel, advanced over the contiguous prefix.

    Each range reports every block it writes. A block that extends the hashed prefix is hashed
    straight from memory; blocks ahead of it are read back from the file once the prefix
    reaches them. One thread hashes at a time; the others leave their blocks to it, and it
    looks again before it stops, so nothing is missed.
    """

    def __init__(self, fd: int, ranges: list[tuple[int, int]]) -> None:
        self.fd, self.ranges = fd, ranges
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.filled = [first for first, _ in ranges]  # each range's next unwritten offset
        self.frontier, self.current = 0, 0  # bytes hashed; the range they end in
        self.total = ranges[-1][1] + 1 if ranges else 0
        self.state, self.hashing = threading.Lock(), threading.Lock()

    def landed(self, index: int, offset: int, block: memoryview) -> None:
        """`block` was just written at `offset`, inside range `index`."""
        with self.state:
            self.filled[index] = offset + len(block)
        while self.hashing.acquire(blocking=False):
            try:
                if self.frontier == offset:
                    self.md5.update(block)
                    self.frontier += len(block)
                self._catch_up()
            finally:
                self.hashing.release()
            if not self._hashable():
                return

    def _hashable(self) -> bool:
        """Whether written bytes wait at the frontier (checked after releasing the hashing lock)."""
        with self.state:
            return self.current < len(self.ranges) and self.frontier < self.filled[self.current]

    def _catch_up(self) -> None:
        while self.current < len(self.ranges):
            with self.state:
                filled, last = self.filled[self.current], self.ranges[self.current][1]
            if self.frontier >= filled:
                if filled <= last:
                    return
                self.current += 1
                continue
            size = min(BUFFER, filled - self.frontier)
            self.md5.update(os.pread(self.fd, size, self.frontier))
            self.frontier += size

    def hexdigest(self) -> str:
        self._catch_up()  # moves past empty ranges
        if self.frontier != self.total:
            raise RuntimeError(f"digest asked for at byte {self.frontier} of {self.total}")
        return self.md5.hexdigest()


class _Download:
    """One object's transfer: the open file, its ranges, the digest and a stop flag."""

    def __init__(self, client: Any, bucket: str, key: str, fd: int, uri: str) -> None:
        self.client, self.bucket, self.key, self.fd, self.uri = client, bucket, key, fd, uri
        self.etag = ""
        self.stop = threading.Event()

    def get(self, first: int, last: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key,
                                  "Range": f"bytes={first}-{'' if last is None else last}"}
        if self.etag:
            params["IfMatch"] = f'"{self.etag}"'
        return self.client.get_object(**params)

    def write_body(self, body: Any, offset: int, end: int, landed: Landed) -> int:
        """Copy `body` to the file from `offset`; return the offset reached (at most `end`)."""
        buffer = bytearray(BUFFER)
        view = memoryview(buffer)
        with body:
            while offset < end and not self.stop.is_set():
                count = body.readinto(view[:min(BUFFER, end - offset)])
                if not count:
                    break
                written = 0
                while written < count:
                    written += os.pwrite(self.fd, view[written:count], offset + written)
                landed(offset, view[:count])
                offset += count
        return offset

    def fetch(self, first: int, last: int, landed: Landed, response: dict[str, Any] | None = None) -> None:
        """Bring bytes first..last (inclusive) into the file, re-asking after a broken stream."""
        from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        offset, end = first, last + 1
        for attempt in range(STREAM_ATTEMPTS):
            try:
                response = response or self.get(offset, last)
                offset = self.write_body(response["Body"], offset, end, landed)
            except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError) as exc:
                if attempt + 1 == STREAM_ATTEMPTS:
                    raise StorageUnavailable(f"{self.uri}: download broke off {STREAM_ATTEMPTS} times: "
                                             f"{type(exc).__name__}") from exc
            response = None
            if offset >= end or self.stop.is_set():
                break
        if offset != end and not self.stop.is_set():
            raise TrainerError(f"{self.uri}: bytes {first}-{last} arrived short ({offset - first} bytes)")


def _ignore(offset: int, block: memoryview) -> None:
    pass


def ranged_get(client: Any, bucket: str, key: str, path: Path, chunk: int, streams: int, uri: str) -> str:
    """Download s3://bucket/key to `path`; return its ETag, whose MD5 was checked where it is one."""
    from botocore.exceptions import ClientError

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        job = _Download(client, bucket, key, fd, uri)
        try:
            first = job.get(0, chunk - 1)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidRange":
                raise
            first = client.get_object(Bucket=bucket, Key=key)  # an empty object has no byte 0
        job.etag = first.get("ETag", "").strip('"')
        total = total_size(first)
        os.ftruncate(fd, total)
        ranges = plan_ranges(total, chunk) if first.get("ContentRange") else [(0, total - 1)]
        digest = OrderedDigest(fd, ranges) if is_md5_etag(job.etag) else None
        _fetch_ranges(job, ranges, first, digest, streams)
        if digest is not None and digest.hexdigest() != job.etag.lower():
            raise TrainerError(f"{uri}: MD5 does not match the ETag; the download is corrupt")
        return job.etag
    finally:
        os.close(fd)


def _fetch_ranges(job: _Download, ranges: list[tuple[int, int]], first: dict[str, Any],
                  digest: OrderedDigest | None, streams: int) -> None:
    """Range 0 streams on this thread, the rest on up to `streams - 1` helpers; first error wins."""
    def fetch(index: int, response: dict[str, Any] | None = None) -> None:
        start, last = ranges[index]
        landed = partial(digest.landed, index) if digest is not None else _ignore
        if last >= start:
            job.fetch(start, last, landed, response)
        elif response is not None:
            response["Body"].close()

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
