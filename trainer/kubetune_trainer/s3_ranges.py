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

from kubetune_trainer.exitcodes import StorageUnavailable, TrainerError
from kubetune_trainer.storage import is_md5_etag
from kubetune_trainer.transfer_checks import BUFFER, OrderedMD5, RangeCheck, RangedCRC32, SizeOnly

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


class _Download:
    """One object's transfer: the open file, its ranges, the digest and a stop flag."""

    def __init__(self, client: Any, bucket: str, key: str, fd: int, uri: str) -> None:
        self.client, self.bucket, self.key, self.fd, self.uri = client, bucket, key, fd, uri
        self.etag = ""
        self.stop = threading.Event()

    def first(self, chunk: int) -> dict[str, Any]:
        """The answer to a GET of the first `chunk` bytes (or of the whole object, when it is empty)."""
        from botocore.exceptions import ClientError

        try:
            return self.get(0, chunk - 1)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidRange":
                raise
            return self.client.get_object(Bucket=self.bucket, Key=self.key)  # an empty object has no byte 0

    def full_object_crc32(self) -> int | None:
        """S3's stored CRC32 of the whole object, when it keeps one (a composite one does not count)."""
        head = self.client.head_object(Bucket=self.bucket, Key=self.key, ChecksumMode="ENABLED",
                                       IfMatch=f'"{self.etag}"')
        value, kind = head.get("ChecksumCRC32") or "", head.get("ChecksumType")
        full_object = kind == "FULL_OBJECT" or (kind is None and is_md5_etag(self.etag))
        if not value or "-" in value or not full_object:
            return None
        return int.from_bytes(base64.b64decode(value), "big")

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


def ranged_get(client: Any, bucket: str, key: str, path: Path, chunk: int, streams: int, uri: str) -> str:
    """Download s3://bucket/key to `path`; return its ETag. The bytes are checked where they can be."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        job = _Download(client, bucket, key, fd, uri)
        first = job.first(chunk)
        job.etag = first.get("ETag", "").strip('"')
        total = total_size(first)
        os.ftruncate(fd, total)
        ranges = plan_ranges(total, chunk) if first.get("ContentRange") else [(0, total - 1)]
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


def _fetch_ranges(job: _Download, ranges: list[tuple[int, int]], first: dict[str, Any],
                  check: RangeCheck, streams: int) -> None:
    """Range 0 streams on this thread, the rest on up to `streams - 1` helpers; first error wins."""
    def fetch(index: int, response: dict[str, Any] | None = None) -> None:
        start, last = ranges[index]
        landed = partial(check.landed, index)
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
