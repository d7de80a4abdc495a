"""The checks behind ranged downloads: ranges planned, CRCs joined, MD5 advanced over blocks landing in
any order, and cut at part boundaries for a multipart ETag."""

from __future__ import annotations

import hashlib
import os
import random
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kubetune_trainer.exitcodes import EXIT_STORAGE_UNAVAILABLE, TrainerError
from kubetune_trainer.storage.s3_http import Answer
from kubetune_trainer.storage.s3_ranges import MiB, RangePolicy, answer_end, plan_ranges, total_size
from kubetune_trainer.storage.transfer_checks import (
    CorruptTransfer,
    OrderedMD5,
    PartMD5s,
    RangedCRC32,
    crc32_combine,
    file_etag,
    multipart_etag,
    uniform_parts,
)


@pytest.mark.parametrize(("total", "chunk", "expected"), [
    (0, 4, []),
    (3, 4, [(0, 2)]),
    (4, 4, [(0, 3)]),
    (9, 4, [(0, 3), (4, 7), (8, 8)]),
])
def test_ranges_cover_every_byte_once(total: int, chunk: int, expected: list[tuple[int, int]]) -> None:
    assert plan_ranges(total, chunk) == expected


@pytest.mark.parametrize(("latency", "rate", "expected"), [
    (0.03, 90 * MiB, [(16 * MiB, 76 * MiB - 1), (76 * MiB, 136 * MiB - 1), (136 * MiB, 196 * MiB - 1),
                      (196 * MiB, 256 * MiB - 1)]),  # S3-like: 30 ms, 90 MiB/s per stream: four ranges
    (0.03, 800 * MiB, [(16 * MiB, 136 * MiB - 1), (136 * MiB, 256 * MiB - 1)]),  # ranges of >= 96 MiB: two
    (0.22, 900 * MiB, []),  # moto: 0.22 s before a 256 MiB object's first byte; one stream is best
    (0.0, 1e12, [(16 * MiB, 76 * MiB - 1), (76 * MiB, 136 * MiB - 1), (136 * MiB, 196 * MiB - 1),
                 (196 * MiB, 256 * MiB - 1)]),  # no latency: as many streams as allowed
])
def test_the_rest_is_split_only_into_ranges_that_outlast_the_latency(latency: float, rate: float,
                                                                     expected: list[tuple[int, int]]) -> None:
    assert RangePolicy(streams=4).split(256 * MiB, 16 * MiB, latency, rate) == expected


def test_a_short_rest_is_never_split() -> None:
    assert RangePolicy(streams=4, min_range=8 * MiB).split(30 * MiB, 16 * MiB, 0.0, 1e12) == []


@pytest.mark.parametrize(("content_range", "length", "end"), [
    ("bytes 0-99/1234", 100, 100),
    ("bytes 200-1233/1234", 1034, 1234),
    ("", 77, 77),
])
def test_answer_end_is_one_past_the_last_byte_sent(content_range: str, length: int, end: int) -> None:
    assert answer_end(Answer(206, "etag", content_range, length, body=None)) == end


@pytest.mark.parametrize(("content_range", "length", "size"), [
    ("bytes 0-99/1234", 100, 1234),
    ("", 77, 77),  # a server that answered the whole object
])
def test_total_size_comes_from_content_range(content_range: str, length: int, size: int) -> None:
    assert total_size(Answer(206, "etag", content_range, length, body=None)) == size


@pytest.mark.parametrize("length_b", [0, 1, 3, 4096, 1 << 20])
def test_crc32_combine_equals_the_crc_of_the_concatenation(length_b: int) -> None:
    a, b = os.urandom(1000), os.urandom(length_b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def _land_in_blocks(check, payload: bytes, ranges: list[tuple[int, int]], block: int, fd: int | None) -> None:
    """Write and report every range's blocks, ranges in parallel and in shuffled order."""
    def one_range(index: int) -> None:
        first, last = ranges[index]
        for offset in range(first, last + 1, block):
            data = memoryview(payload)[offset:min(offset + block, last + 1)]
            if fd is not None:
                os.pwrite(fd, data, offset)
            check.landed(index, offset, data)

    order = list(range(len(ranges)))
    random.Random(7).shuffle(order)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(one_range, order))


def test_ordered_md5_matches_whatever_order_ranges_land_in(tmp_path: Path) -> None:
    payload = os.urandom(3 * (1 << 20) + 12345)
    ranges = plan_ranges(len(payload), 300_000)
    with (tmp_path / "f").open("w+b") as handle:
        check = OrderedMD5(handle.fileno(), ranges, hashlib.md5(payload).hexdigest())
        _land_in_blocks(check, payload, ranges, 65536, handle.fileno())
        check.verify("s3://b/k")
        wrong = OrderedMD5(handle.fileno(), ranges, hashlib.md5(b"other").hexdigest())
        _land_in_blocks(wrong, payload, ranges, 65536, handle.fileno())
        with pytest.raises(TrainerError, match="s3://b/k: MD5 does not match"):
            wrong.verify("s3://b/k")


def test_ranged_crc32_accepts_the_object_and_names_the_uri_otherwise() -> None:
    payload = os.urandom(1 << 20)
    ranges = plan_ranges(len(payload), 100_000)
    good = RangedCRC32(ranges, zlib.crc32(payload))
    _land_in_blocks(good, payload, ranges, 30_000, None)
    good.verify("s3://b/k")
    corrupt = bytearray(payload)
    corrupt[500_000] ^= 1
    bad = RangedCRC32(ranges, zlib.crc32(payload))
    _land_in_blocks(bad, bytes(corrupt), ranges, 30_000, None)
    with pytest.raises(TrainerError, match="s3://b/k: CRC32 does not match"):
        bad.verify("s3://b/k")


def test_ranged_crc32_refuses_a_range_that_stopped_short() -> None:
    payload = os.urandom(1000)
    ranges = plan_ranges(len(payload), 400)
    check = RangedCRC32(ranges, zlib.crc32(payload))
    _land_in_blocks(check, payload[:900], [(0, 399), (400, 799), (800, 899)], 100, None)
    with pytest.raises(TrainerError, match="bytes 800-999 were not all written"):
        check.verify("s3://b/k")


@pytest.mark.parametrize("kind", ["md5", "crc32"])
def test_a_check_split_after_the_first_stream_began_covers_every_byte(tmp_path: Path, kind: str) -> None:
    payload = os.urandom(2 * (1 << 20) + 777)
    with (tmp_path / "f").open("w+b") as handle:
        fd = handle.fileno()
        whole = [(0, len(payload) - 1)]
        check = (OrderedMD5(fd, whole, hashlib.md5(payload).hexdigest()) if kind == "md5"
                 else RangedCRC32(whole, zlib.crc32(payload)))
        _land_in_blocks(check, payload, [(0, 300_000 - 1)], 65536, fd)  # the first stream, before the split
        ranges = [(0, 900_000 - 1), *plan_ranges(len(payload), 500_000, 900_000)]
        check.split(ranges)
        rest = [(300_000, 900_000 - 1), *ranges[1:]]
        _land_in_blocks(check, payload, rest, 65536, fd)  # range 0 goes on, the others start
        check.verify("s3://b/k")
        with pytest.raises(RuntimeError, match="cannot split"):
            check.split([(0, 100), (101, len(payload) - 1)])  # range 0 already has bytes past 100



@pytest.mark.parametrize(("total", "first", "count", "parts"), [
    (40, 8, 5, [8, 8, 8, 8, 8]),
    (37, 8, 5, [8, 8, 8, 8, 5]),
    (8, 8, 1, [8]),
    (33, 8, 5, [8, 8, 8, 8, 1]),
    (32, 8, 5, None),  # the last part would be empty: not cut this way
    (41, 8, 5, None),  # the last part would be longer than the others
])
def test_uniform_parts_are_the_cut_every_common_uploader_makes(total: int, first: int, count: int,
                                                               parts: list[int] | None) -> None:
    assert uniform_parts(total, first, count) == parts


def _s3_etag(payload: bytes, parts: list[int]) -> str:
    """The ETag S3 computes for `payload` uploaded in `parts` (written out here, independently)."""
    offsets = [sum(parts[:i]) for i in range(len(parts))]
    digests = b"".join(hashlib.md5(payload[o:o + n]).digest() for o, n in zip(offsets, parts, strict=True))
    return f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"


@pytest.mark.parametrize("range_size", [100_000, 262_144, 1 << 20])
def test_a_multipart_etag_is_checked_whatever_order_ranges_land_in(tmp_path: Path, range_size: int) -> None:
    payload = os.urandom(5 * 262_144 + 999)
    parts = uniform_parts(len(payload), 262_144, 6)
    etag = _s3_etag(payload, parts)
    ranges = plan_ranges(len(payload), range_size)  # range ends fall inside parts, before or after their ends
    with (tmp_path / "f").open("w+b") as handle:
        check = PartMD5s(handle.fileno(), parts, etag)
        _land_in_blocks(check, payload, ranges, 65536, handle.fileno())
        check.verify("s3://b/k")
        check.close()
        assert file_etag(handle.fileno(), parts) == etag == multipart_etag(
            [hashlib.md5(payload[i:i + 262_144]).digest() for i in range(0, len(payload), 262_144)])


def test_a_flipped_byte_in_a_multipart_object_is_corrupt_and_retryable(tmp_path: Path) -> None:
    payload = os.urandom(3 * 100_000)
    parts = [100_000] * 3
    corrupt = bytearray(payload)
    corrupt[150_000] ^= 0x10
    ranges = plan_ranges(len(payload), 70_000)
    asked: list[str] = []
    with (tmp_path / "f").open("w+b") as handle:
        check = PartMD5s(handle.fileno(), parts, _s3_etag(payload, parts),
                         exact_parts=lambda: asked.append("sizes") or parts)
        _land_in_blocks(check, bytes(corrupt), ranges, 8192, handle.fileno())
        with pytest.raises(CorruptTransfer, match="s3://b/k: the parts' MD5s do not match") as raised:
            check.verify("s3://b/k")
        check.close()
    assert raised.value.exit_code == EXIT_STORAGE_UNAVAILABLE and asked == ["sizes"]


def test_parts_cut_unevenly_are_found_before_the_bytes_are_called_corrupt(tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    real = [100_000, 60_000, 140_000]  # an uploader of its own ways: first and last alone do not tell
    guess = uniform_parts(len(payload), 100_000, 3)
    ranges = plan_ranges(len(payload), 64_000)
    with (tmp_path / "f").open("w+b") as handle:
        check = PartMD5s(handle.fileno(), guess, _s3_etag(payload, real), exact_parts=lambda: real)
        _land_in_blocks(check, payload, ranges, 8192, handle.fileno())
        check.verify("s3://b/k")
        check.close()


def test_a_part_that_never_fully_landed_is_named(tmp_path: Path) -> None:
    payload = os.urandom(300)
    with (tmp_path / "f").open("w+b") as handle:
        check = PartMD5s(handle.fileno(), [100, 100, 100], _s3_etag(payload, [100, 100, 100]))
        _land_in_blocks(check, payload[:250], [(0, 249)], 64, handle.fileno())
        with pytest.raises(CorruptTransfer, match=r"parts \[3\] were not all written"):
            check.verify("s3://b/k")
        check.close()
