"""A download stream that breaks mid-body resumes from the last byte written, and the
per-range CRC32 check still holds (no bytes counted twice, none skipped)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

from urllib3.exceptions import ProtocolError

from kubetune_trainer.storage.s3_http import Answer
from kubetune_trainer.storage.s3_ranges import _Download
from kubetune_trainer.storage.transfer_checks import RangedCRC32

DATA = bytes(range(256)) * 20_000  # 5 MB: several buffer-sized blocks


class _Body:
    """Serves `data`; raises once `break_after` bytes have been read (a dropped connection)."""

    def __init__(self, data: bytes, break_after: int | None) -> None:
        self.data, self.pos, self.break_after = data, 0, break_after

    def readinto(self, view: memoryview) -> int:
        if self.break_after is not None and self.pos >= self.break_after:
            raise ProtocolError("Connection broken: IncompleteRead")
        count = min(len(view), len(self.data) - self.pos)
        if self.break_after is not None:
            count = min(count, self.break_after - self.pos) or count
        view[:count] = self.data[self.pos:self.pos + count]
        self.pos += count
        return count

    def release_conn(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Getter:
    def __init__(self, break_after: int) -> None:
        self.requests: list[str] = []
        self.break_after: int | None = break_after

    def get(self, bucket: str, key: str, headers: dict[str, Any]) -> Answer:
        first, last = (int(x) for x in headers["Range"].removeprefix("bytes=").split("-"))
        self.requests.append(headers["Range"])
        body = _Body(DATA[first:last + 1], self.break_after)
        self.break_after = None  # only the first stream breaks
        return Answer(206, "etag", f"bytes {first}-{last}/{len(DATA)}", last + 1 - first, body)


def test_a_broken_stream_resumes_where_it_stopped(tmp_path: Path) -> None:
    getter = _Getter(break_after=(1 << 20) + 5)
    check = RangedCRC32([(0, len(DATA) - 1)], zlib.crc32(DATA))
    fd = os.open(tmp_path / "object", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, len(DATA))
        download = _Download(getter, "bucket", "key", fd, "s3://bucket/key")
        download.fetch(0, len(DATA) - 1, lambda offset, block: check.landed(0, offset, block))
    finally:
        os.close(fd)
    check.verify("s3://bucket/key")
    assert (tmp_path / "object").read_bytes() == DATA
    assert getter.requests == [f"bytes=0-{len(DATA) - 1}", f"bytes={(1 << 20) + 5}-{len(DATA) - 1}"]
