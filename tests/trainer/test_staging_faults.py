"""Staging through a faulty network: every staged object is checked end to end, multipart ones
included, and a transfer that breaks or arrives corrupt is fetched again, never staged as good.

The S3 servers are moto's and SeaweedFS's on loopback; between each and the stager sits `S3FaultProxy`,
which answers 500 and 503 SlowDown, resets or truncates bodies, delays first bytes and flips bits, each at a
seeded rate. Nothing is patched. The smoke subset runs against both servers; the thousand objects (and the training
run of `test_training_faults`) against the servers of `FULL_FAULT_SERVERS`, SeaweedFS by default.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from s3_fault_proxy import KINDS, S3FaultProxy

from kubetune.api.spec import StorageSpec
from kubetune_trainer.storage.s3 import MiB, S3Store
from kubetune_trainer.storage.staging import Stager

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(s3_server: Any) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.endpoint, seed=13) as running:
        yield running


def _store(endpoint: str) -> S3Store:
    return S3Store(StorageSpec(endpoint=endpoint, addressing_style="path", max_concurrency=16))


def _upload_multipart(server: Any, bucket: str, key: str, payload: bytes, folder: Path) -> str:
    """Upload as boto3 and the AWS CLI do by default above 8 MiB: 8 MiB parts; the ETag's form is <md5>-<parts>."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "upload").write_bytes(payload)
    client = server.client()
    client.upload_file(str(folder / "upload"), bucket, key)
    return client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_flipped_byte_in_a_multipart_object_fails_that_transfer_and_it_is_fetched_again(
        s3_server: Any, s3_bucket: str, proxy: S3FaultProxy, tmp_path: Path) -> None:
    payload = os.urandom(40 * MiB)
    etag = _upload_multipart(s3_server, s3_bucket, "model/unet.bin", payload, tmp_path / "src")
    assert etag.endswith("-5")
    proxy.script("flip", "model/unet.bin")
    report = Stager(_store(proxy.endpoint)).stage_prefix(f"s3://{s3_bucket}/model/", tmp_path / "dest")
    assert _sha256(tmp_path / "dest" / "unet.bin") == hashlib.sha256(payload).hexdigest()
    gets = proxy.object_gets("model/unet.bin")
    assert gets[0].fault == "flip" and [g.fault for g in gets[1:]] == [""] * (len(gets) - 1)
    assert (report.retried, report.unverified) == (1, 0)


def test_a_multipart_object_is_checked_against_its_etag_without_the_proxy(
        s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    payload = os.urandom(13 * MiB + 5)
    _upload_multipart(s3_server, s3_bucket, "mp/blob.bin", payload, tmp_path / "src")
    fetched = _store(s3_server.endpoint).download(f"s3://{s3_bucket}/mp/blob.bin", tmp_path / "blob")
    assert fetched.digest == "multipart-md5" and (tmp_path / "blob").read_bytes() == payload


def test_objects_without_a_digest_are_counted_and_named(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    """SSE-KMS: the ETag is no MD5; uploaded without a checksum, nothing is left to check but the size."""
    import boto3
    from botocore.config import Config

    bare = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                        config=Config(request_checksum_calculation="when_required"))
    kms = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "kubetune-test"}  # SeaweedFS wants a key named
    bare.put_object(Bucket=s3_bucket, Key="kms/bare.bin", Body=b"a" * 1000, **kms)
    s3_server.client().put_object(Bucket=s3_bucket, Key="kms/crc.bin", Body=b"b" * 1000,
                                  **kms)  # boto3 sends (and S3 keeps) a CRC32
    s3_server.client().put_object(Bucket=s3_bucket, Key="kms/plain.bin", Body=b"c" * 1000)
    report = Stager(_store(s3_server.endpoint)).stage_prefix(f"s3://{s3_bucket}/kms/", tmp_path / "dest")
    assert (report.downloaded, report.unverified) == (3, 1)
    assert report.unverified_keys == (f"s3://{s3_bucket}/kms/bare.bin",)


@pytest.mark.parametrize("kind", KINDS)
def test_each_fault_kind_is_survived(s3_server: Any, s3_bucket: str, tmp_path: Path, kind: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")  # the trainer's default; the test session's is 2
    sources = _seed(s3_server, s3_bucket, "set", count=40, multipart=1, folder=tmp_path / "src")
    with S3FaultProxy(s3_server.endpoint, rates={kind: 0.1}, seed=7, delay_s=0.05) as faulty:
        report = Stager(_store(faulty.endpoint)).stage_prefix(f"s3://{s3_bucket}/set/", tmp_path / "dest")
        injected = faulty.faults()
    assert injected[kind] > 0 and report.downloaded == 41 and report.unverified == 0
    _assert_identical(tmp_path / "dest", sources)


@pytest.mark.slow
def test_a_thousand_objects_stage_byte_identical_at_five_percent_of_every_fault(
        full_fault_server: Any, full_fault_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    server, bucket = full_fault_server, full_fault_bucket
    sources = _seed(server, bucket, "many", count=996, multipart=4, folder=tmp_path / "src")
    with S3FaultProxy(server.endpoint, rates=dict.fromkeys(KINDS, 0.05), seed=2026, delay_s=0.2) as faulty:
        started = time.monotonic()
        report = Stager(_store(faulty.endpoint)).stage_prefix(f"s3://{bucket}/many/", tmp_path / "dest")
        seconds = time.monotonic() - started
        injected = faulty.faults()
    print(f"\n1,000 objects through 5% of each fault: {seconds:.1f}s, {report.retried} transfers fetched again, "
          f"faults injected {dict(injected)}")
    assert all(injected[kind] > 0 for kind in KINDS), injected
    assert report.downloaded == 1000 and report.unverified == 0 and report.retried > 0
    _assert_identical(tmp_path / "dest", sources)


def _seed(server: Any, bucket: str, prefix: str, count: int, multipart: int, folder: Path) -> dict[str, str]:
    """`count` small single-part objects of 1-16 KiB and `multipart` of 11 MiB in three parts; their sha256s."""
    client = server.client()
    small = {f"{i // 100:02d}/object-{i:04d}.bin": os.urandom(1024 + (i * 977) % (15 * 1024)) for i in range(count)}
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=bucket, Key=f"{prefix}/{item[0]}", Body=item[1]),
                      small.items()))
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in small.items()}
    for index in range(multipart):
        payload = os.urandom(11 * MiB)
        from boto3.s3.transfer import TransferConfig

        (folder / "mp").mkdir(parents=True, exist_ok=True)
        (folder / "mp" / "upload").write_bytes(payload)
        client.upload_file(str(folder / "mp" / "upload"), bucket, f"{prefix}/large/model-{index}.bin",
                           Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
        sums[f"large/model-{index}.bin"] = hashlib.sha256(payload).hexdigest()
    return sums


def _assert_identical(dest: Path, sources: dict[str, str]) -> None:
    staged = {p.relative_to(dest).as_posix(): _sha256(p) for p in dest.rglob("*")
              if p.is_file() and ".kubetune-staged" not in p.parts}
    assert staged == sources
