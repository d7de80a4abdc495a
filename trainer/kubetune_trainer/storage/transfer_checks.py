"""Checks that a file fetched as parallel ranges is the object it came from, computed as bytes land.

A check sees every block as it is written (`landed`) and says at the end whether the file
matches (`verify`). A download that starts as one stream and hands the rest of the object to
other streams tells the check the new ranges first (`split`). `RangedCRC32` checks S3's
stored full-object CRC32: each range keeps its own CRC, so the work is spread over the range
threads, and the CRCs are joined at the end. `OrderedMD5` checks a single-part object's ETag,
the MD5 of its bytes, which has to be hashed front to back. `PartMD5s` checks a multipart
object's (`<hex>-<N>`), the MD5 of its N parts' MD5s: each part is hashed on its own, in
parallel, once its bytes have landed.

A mismatch raises `CorruptTransfer`, a `StorageUnavailable`: the object itself is fine, the
bytes that arrived were not; fetching it again is the remedy.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from bisect import bisect_right
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import accumulate
from typing import Protocol

from kubetune_trainer.storage.interface import CorruptTransfer

BUFFER = 1 << 20
HASHERS = max(1, min(4, (os.cpu_count() or 1) - 1))  # threads hashing one multipart object's parts
_REFLECTED_CRC32 = 0xEDB88320


def uniform_parts(total: int, first: int, count: int) -> list[int] | None:
    """Part sizes of a `total`-byte object uploaded in `count` parts of `first` bytes but the last
    (how boto3, the AWS CLI, s5cmd, rclone and mc cut files); None when no such cut gives `total`."""
    last = total - first * (count - 1)
    if count < 1 or first < 1 or not 0 < last <= first:
        return None
    return [first] * (count - 1) + [last]


def multipart_etag(digests: list[bytes]) -> str:
    """The ETag S3 gives an object uploaded in parts with these MD5 digests."""
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def file_etag(fd: int, parts: list[int]) -> str:
    """The multipart ETag of the file open as `fd`, cut into `parts` (sizes in bytes)."""
    digests, offset = [], 0
    for size in parts:
        md5, end = hashlib.md5(usedforsecurity=False), offset + size
        while offset < end:
            block = os.pread(fd, min(BUFFER, end - offset), offset)
            if not block:
                raise CorruptTransfer(f"file ends at byte {offset}, before part end {end}")
            md5.update(block)
            offset += len(block)
        digests.append(md5.digest())
    return multipart_etag(digests)


class RangeCheck(Protocol):
    def landed(self, index: int, offset: int, block: memoryview) -> None:
        """`block` was just written at `offset`, inside range `index`."""

    def verify(self, uri: str) -> None:
        """Raise a CorruptTransfer naming `uri` unless the file is the object."""

    def split(self, ranges: list[tuple[int, int]]) -> None:
        """Range 0, the only one landing so far, now ends at `ranges[0]`; the others follow it."""

    def close(self) -> None:
        """Stop any work of the check's own that reads the file; called before the file is closed."""


class SizeOnly:
    """For objects with nothing to check the bytes against (an encrypted object's ETag, no full-object
    checksum); the stager counts them and names them in its report."""

    def landed(self, index: int, offset: int, block: memoryview) -> None:
        pass

    def split(self, ranges: list[tuple[int, int]]) -> None:
        pass

    def verify(self, uri: str) -> None:
        pass

    def close(self) -> None:
        pass


def _apply(operator: list[int], vector: int) -> int:
    """A linear map over GF(2), given by the images of each bit, applied to a 32-bit vector."""
    out = 0
    for column in operator:
        if not vector:
            break
        if vector & 1:
            out ^= column
        vector >>= 1
    return out


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """zlib.crc32(a + b) from zlib.crc32(a), zlib.crc32(b) and len(b).

    Feeding the register zero bits is linear, so crc(a) is carried past len(b) bytes by the
    map "shift in one zero bit" raised to 8*len(b) (by squaring), then b's CRC is added.
    """
    operator = [_REFLECTED_CRC32] + [1 << bit for bit in range(31)]  # shift in one zero bit
    bits = 8 * length_b
    while bits:
        if bits & 1:
            crc_a = _apply(operator, crc_a)
        bits >>= 1
        if bits:
            operator = [_apply(operator, column) for column in operator]
    return crc_a ^ crc_b


class RangedCRC32:
    """S3's full-object CRC32, computed per range in each range's thread and joined in order."""

    def __init__(self, ranges: list[tuple[int, int]], expected: int) -> None:
        self.ranges, self.expected = ranges, expected
        self.crcs = [0] * len(ranges)
        self.filled = [first for first, _ in ranges]

    def landed(self, index: int, offset: int, block: memoryview) -> None:
        if offset != self.filled[index]:
            raise RuntimeError(f"range {index} block at {offset}, expected {self.filled[index]}")
        self.crcs[index] = zlib.crc32(block, self.crcs[index])
        self.filled[index] = offset + len(block)

    def split(self, ranges: list[tuple[int, int]]) -> None:
        if ranges[0][0] != self.ranges[0][0] or self.filled[0] > ranges[0][1] + 1:
            raise RuntimeError(f"cannot split at byte {ranges[0][1] + 1}: range 0 has landed up to {self.filled[0]}")
        self.ranges = ranges
        self.crcs += [0] * (len(ranges) - len(self.crcs))
        self.filled += [first for first, _ in ranges[len(self.filled):]]

    def verify(self, uri: str) -> None:
        crc = 0
        for (first, last), part, filled in zip(self.ranges, self.crcs, self.filled, strict=True):
            if filled != last + 1:
                raise CorruptTransfer(f"{uri}: bytes {first}-{last} were not all written")
            crc = crc32_combine(crc, part, last + 1 - first)
        if crc != self.expected:
            raise CorruptTransfer(f"{uri}: CRC32 does not match the stored checksum; the download is corrupt")

    def close(self) -> None:
        pass


class OrderedMD5:
    """A single-part object's ETag check: the MD5 of the file, advanced over the contiguous prefix.

    Each range reports every block it writes. A block that extends the hashed prefix is hashed
    straight from memory; blocks ahead of it are read back from the file once the prefix
    reaches them. One thread hashes at a time; the others leave their blocks to it, and it
    looks again before it stops, so nothing is missed.
    """

    def __init__(self, fd: int, ranges: list[tuple[int, int]], etag: str) -> None:
        self.fd, self.ranges, self.etag = fd, ranges, etag.strip('"').lower()
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

    def split(self, ranges: list[tuple[int, int]]) -> None:
        with self.state:
            if ranges[-1][1] + 1 != self.total or self.filled[0] > ranges[0][1] + 1:
                raise RuntimeError(f"cannot split {self.ranges} into {ranges}")
            self.ranges = ranges
            self.filled += [first for first, _ in ranges[len(self.filled):]]

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
            raise CorruptTransfer(f"digest asked for at byte {self.frontier} of {self.total}")
        return self.md5.hexdigest()

    def verify(self, uri: str) -> None:
        if self.hexdigest() != self.etag:
            raise CorruptTransfer(f"{uri}: MD5 does not match the ETag; the download is corrupt")

    def close(self) -> None:
        pass


class PartMD5s:
    """A multipart object's ETag check: the MD5 of each part, joined as S3 joins them.

    Parts are independent, so each is hashed on its own as soon as all its bytes have landed,
    read back from the file (the page cache) by a few hashing threads while the ranges stream
    on: the check keeps up with the transfer wherever there are cores to spare, instead of
    putting one MD5 stream in its way.

    `parts` are only the likely cut (`uniform_parts`); if the ETag then differs, `exact_parts`
    is asked for the sizes S3 recorded and, where they differ, the file is hashed again with
    them before the bytes are called corrupt.
    """

    def __init__(self, fd: int, parts: list[int], etag: str, exact_parts: Callable[[], list[int]] | None = None,
                 hashers: int = HASHERS) -> None:
        self.fd, self.parts, self.etag, self.exact_parts = fd, parts, etag.strip('"').lower(), exact_parts
        self.ends = list(accumulate(parts))
        self.missing = list(parts)  # bytes of each part yet to land
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=hashers, thread_name_prefix="part-md5")
        self.digests: dict[int, Future[bytes]] = {}
        for number, size in enumerate(parts):
            if not size:
                self.digests[number] = self.pool.submit(self._part, number)

    def landed(self, index: int, offset: int, block: memoryview) -> None:
        end, complete = offset + len(block), []
        number = bisect_right(self.ends, offset)
        with self.lock:
            while number < len(self.parts) and (start := self.ends[number] - self.parts[number]) < end:
                self.missing[number] -= min(end, self.ends[number]) - max(offset, start)
                if self.missing[number] == 0:
                    complete.append(number)
                number += 1
        for number in complete:
            self.digests[number] = self.pool.submit(self._part, number)

    def split(self, ranges: list[tuple[int, int]]) -> None:
        pass  # parts, not ranges, are what is hashed

    def _part(self, number: int) -> bytes:
        md5, offset, end = hashlib.md5(usedforsecurity=False), self.ends[number] - self.parts[number], self.ends[number]
        while offset < end:
            block = os.pread(self.fd, min(BUFFER, end - offset), offset)
            if not block:
                raise CorruptTransfer(f"file ends at byte {offset}, before part {number + 1} ends at {end}")
            md5.update(block)
            offset += len(block)
        return md5.digest()

    def verify(self, uri: str) -> None:
        short = [number + 1 for number, missing in enumerate(self.missing) if missing]
        if short:
            raise CorruptTransfer(f"{uri}: parts {short[:5]} were not all written")
        if multipart_etag([self.digests[number].result() for number in range(len(self.parts))]) == self.etag:
            return
        exact = self.exact_parts() if self.exact_parts else self.parts
        if exact == self.parts or file_etag(self.fd, exact) != self.etag:
            raise CorruptTransfer(f"{uri}: the parts' MD5s do not match the multipart ETag {self.etag}; "
                                  "the download is corrupt")

    def close(self) -> None:
        """Wait for the hashing threads, which read the file: call before closing it."""
        self.pool.shutdown(wait=True, cancel_futures=True)
