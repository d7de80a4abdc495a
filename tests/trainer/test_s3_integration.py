"""Staging and training against real S3-compatible servers on loopback: moto's, and SeaweedFS's S3 gateway.

Nothing is patched: boto3 speaks HTTP to 127.0.0.1. Downloads are counted through the
stager's own `on_download` seam and ranged GETs through botocore's public event hooks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from trainer_support import free_port, job_document, local_job

from kubetune.api.spec import StorageSpec
from kubetune.cli import main
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_CONFIG, ConfigError, StorageUnavailable
from kubetune_trainer.job import run_job
from kubetune_trainer.storage.s3 import MiB, S3Store, TransferSettings
from kubetune_trainer.storage.s3_ranges import RangePolicy, plan_ranges
from kubetune_trainer.storage.staging import Stager, local_relative

pytestmark = pytest.mark.integration


def _storage(server: Any, **kwargs: Any) -> StorageSpec:
    return StorageSpec(endpoint=server.endpoint, addressing_style="path", **kwargs)


def _put_many(server: Any, bucket: str, keys: list[str]) -> None:
    client = server.client()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket, Key=key, Body=key.encode()), keys))


def test_stages_more_than_a_thousand_nested_unicode_keys(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    keys = [f"data/part {i // 100}/sub-{i % 7}/image ü {i}.txt" for i in range(1050)]
    _put_many(s3_server, s3_bucket, [*keys, "elsewhere/not-this.txt", "data-sibling/nor-this.txt"])
    seen: list[str] = []
    stager = Stager(S3Store(_storage(s3_server, max_concurrency=16)), concurrency=16,
                    on_download=lambda obj: seen.append(obj.relative))
    report = stager.stage_prefix(f"s3://{s3_bucket}/data", tmp_path / "dest")
    assert (report.files, report.downloaded, len(seen)) == (1050, 1050, 1050)
    sample = tmp_path / "dest" / "part 10" / "sub-0" / "image ü 1043.txt"
    assert sample.read_text() == "data/part 10/sub-0/image ü 1043.txt"
    assert not (tmp_path / "dest" / "not-this.txt").exists()


def test_large_object_is_fetched_in_ranges_and_verified(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    payload = hashlib.sha256(b"seed").digest() * (20 * MiB // 32)
    s3_server.client().put_object(Bucket=s3_bucket, Key="big/blob.bin", Body=payload)
    store = S3Store(_storage(s3_server), TransferSettings(multipart_threshold=MiB, chunk_size=MiB))
    calls = _count_calls(store)
    Stager(store, concurrency=2).stage_prefix(f"s3://{s3_bucket}/big/", tmp_path / "dest")
    assert (tmp_path / "dest" / "blob.bin").read_bytes() == payload
    assert sorted(calls["GetObject"]) == sorted(f"bytes={i * MiB}-{(i + 1) * MiB - 1}" for i in range(20))
    assert len(calls["HeadObject"]) == 1  # the stored CRC32, checked per range


class _SplitInThree(RangePolicy):
    """A policy that always splits the rest in three, whatever the server's latency (our own seam)."""

    def split(self, total: int, reached: int, latency: float, rate: float) -> list[tuple[int, int]]:
        return plan_ranges(total, -(-(total - reached) // 3), reached)


def test_a_large_object_is_first_one_stream_then_split_as_the_policy_says(s3_server: Any, s3_bucket: str,
                                                                          tmp_path: Path) -> None:
    payload = os.urandom(10 * MiB + 17)
    s3_server.client().put_object(Bucket=s3_bucket, Key="split/blob.bin", Body=payload)
    store = S3Store(_storage(s3_server))
    store.ranges = _SplitInThree(streams=3, probe=2 * MiB)
    calls = _count_calls(store)
    sent: list[dict[str, str]] = []
    store.getter.on_send = sent.append
    Stager(store).stage_prefix(f"s3://{s3_bucket}/split/", tmp_path / "dest")
    assert (tmp_path / "dest" / "blob.bin").read_bytes() == payload
    assert [h["Range"] for h in sent[:1]] == ["bytes=0-"] and len(sent) == 3 and len(calls["HeadObject"]) == 1
    later = sorted(tuple(int(x) for x in h["Range"].removeprefix("bytes=").split("-")) for h in sent[1:])
    assert later[0][0] > 2 * MiB and later[0][1] + 1 == later[1][0] and later[1][1] == len(payload) - 1
    assert all(h["If-Match"] == f'"{hashlib.md5(payload).hexdigest()}"' for h in sent[1:])


def test_by_default_a_large_object_starts_as_one_open_ended_get_and_is_checked(
        s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    payload = os.urandom(40 * MiB)
    s3_server.client().put_object(Bucket=s3_bucket, Key="whole/blob.bin", Body=payload)
    store = S3Store(_storage(s3_server))
    calls = _count_calls(store)
    Stager(store).stage_prefix(f"s3://{s3_bucket}/whole/", tmp_path / "dest")
    assert (tmp_path / "dest" / "blob.bin").read_bytes() == payload
    assert calls["GetObject"][0] == "bytes=0-" and len(calls["HeadObject"]) == 1


def _count_calls(store: S3Store) -> dict[str, list[str]]:
    """Requests the store sends: GETs through its getter's own hook, HEADs through botocore's event hooks."""
    calls: dict[str, list[str]] = {"GetObject": [], "HeadObject": []}
    store.getter.on_send = lambda headers: calls["GetObject"].append(headers.get("Range", ""))
    store.client.meta.events.register("before-call.s3.HeadObject", lambda **_: calls["HeadObject"].append(""))
    return calls


def test_a_small_object_costs_one_get_and_no_head(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    _put_many(s3_server, s3_bucket, [f"few/{i}.txt" for i in range(12)])
    s3_server.client().put_object(Bucket=s3_bucket, Key="few/empty.txt", Body=b"")
    store = S3Store(_storage(s3_server))
    calls = _count_calls(store)
    report = Stager(store, concurrency=4).stage_prefix(f"s3://{s3_bucket}/few/", tmp_path / "dest")
    assert report.downloaded == 13 and calls["HeadObject"] == []
    assert len(calls["GetObject"]) == 14  # the empty object answers its ranged GET with 416, then one plain GET
    assert (tmp_path / "dest" / "7.txt").read_text() == "few/7.txt"
    assert (tmp_path / "dest" / "empty.txt").read_bytes() == b""


def test_a_multipart_upload_is_fetched_in_ranges(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    payload = os.urandom(13 * MiB + 321)
    (tmp_path / "blob").write_bytes(payload)
    s3_server.client().upload_file(str(tmp_path / "blob"), s3_bucket, "mp/blob.bin",
                                   Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    store = S3Store(_storage(s3_server), TransferSettings(chunk_size=2 * MiB, per_file_concurrency=3))
    calls = _count_calls(store)
    report = Stager(store).stage_prefix(f"s3://{s3_bucket}/mp/", tmp_path / "dest")
    assert (tmp_path / "dest" / "blob.bin").read_bytes() == payload
    # one HEAD finds no full-object CRC32 (a multipart object's is composite); one of part 1 tells the part
    # size, and the bytes are checked against the multipart ETag
    assert len(calls["GetObject"]) == 7 and len(calls["HeadObject"]) == 2 and report.unverified == 0


def test_an_object_replaced_mid_download_is_not_staged(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="swap/blob.bin", Body=os.urandom(6 * MiB))
    store = S3Store(_storage(s3_server), TransferSettings(chunk_size=MiB, per_file_concurrency=2))
    replaced: list[str] = []

    def replace_before_a_later_range(headers: dict[str, str]) -> None:
        if headers.get("Range", "").startswith("bytes=0-") or replaced:
            return
        replaced.append("once")
        client.put_object(Bucket=s3_bucket, Key="swap/blob.bin", Body=os.urandom(6 * MiB))

    store.getter.on_send = replace_before_a_later_range
    with pytest.raises(StorageUnavailable, match=f"s3://{s3_bucket}/swap/blob.bin was replaced"):
        Stager(store).stage_prefix(f"s3://{s3_bucket}/swap/", tmp_path / "dest")
    assert replaced and [p.name for p in (tmp_path / "dest").rglob("*")] == []


def test_a_traversal_key_is_refused(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    if s3_server.kind == "seaweedfs":  # a server on a file system refuses to store such a key at all
        with pytest.raises(ClientError, match="InvalidRequest"):
            s3_server.client().put_object(Bucket=s3_bucket, Key="data/../../escape.txt", Body=b"x")
        return
    _put_many(s3_server, s3_bucket, ["data/ok.txt", "data/../../escape.txt"])
    store = S3Store(_storage(s3_server))
    assert any(".." in obj.relative for obj in store.list(f"s3://{s3_bucket}/data/"))
    with pytest.raises(ConfigError, match="escape the target folder"):
        Stager(store).stage_prefix(f"s3://{s3_bucket}/data/", tmp_path / "dest" / "inner")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "dest" / "escape.txt").exists()


def test_a_key_with_a_250_byte_name_is_staged_under_its_local_name(s3_server: Any, s3_bucket: str,
                                                                    tmp_path: Path) -> None:
    """Once `File name too long` from the temporary file's name; now cut with a hash, extension kept."""
    key = "data/images/" + "n" * 246 + ".png"
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=b"png bytes")
    report = Stager(S3Store(_storage(s3_server))).stage_prefix(f"s3://{s3_bucket}/data/", tmp_path / "dest")
    staged = tmp_path / "dest" / local_relative(key.removeprefix("data/"))
    assert report.downloaded == 1 and staged.read_bytes() == b"png bytes" and staged.suffix == ".png"
    assert len(staged.name.encode()) < 250


def test_a_key_that_is_both_a_file_and_a_folder_exits_78_naming_both(
        s3_server: Any, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _put_many(s3_server, s3_bucket, ["model/model_index.json", "data/a", "data/a/b.png"])
    doc = job_document(f"s3://{s3_bucket}/model/", f"s3://{s3_bucket}/data/", f"s3://{s3_bucket}/out/",
                       storage={"endpoint": s3_server.endpoint, "addressingStyle": "path"})
    (tmp_path / "job.json").write_text(json.dumps(doc))
    code = main(["run", str(tmp_path / "job.json"), "--no-progress", "--scratch", str(tmp_path / "s")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == EXIT_CONFIG, line
    assert f"s3://{s3_bucket}/data/a is a file but s3://{s3_bucket}/data/a/b.png needs a folder" in line


class Interrupted(RuntimeError):
    pass


def test_interrupted_staging_resumes_without_refetching(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    keys = [f"set/{i:03d}.txt" for i in range(40)]
    _put_many(s3_server, s3_bucket, keys)
    store = S3Store(_storage(s3_server))
    done: list[str] = []

    def interrupt_after_ten(obj: Any) -> None:
        done.append(obj.relative)
        if len(done) == 10:
            raise Interrupted("pod killed")

    with pytest.raises(Interrupted):
        Stager(store, concurrency=1, on_download=interrupt_after_ten).stage_prefix(f"s3://{s3_bucket}/set",
                                                                                   tmp_path / "d")
    (tmp_path / "d" / "020.txt").write_text("a partial file left by a crash")
    again: list[str] = []
    report = Stager(store, concurrency=4, on_download=lambda o: again.append(o.relative)).stage_prefix(
        f"s3://{s3_bucket}/set", tmp_path / "d")
    assert 10 <= len(done) < 40, "the first pass must stop early"
    assert set(again).isdisjoint(done), "files completed before the interruption were fetched again"
    assert set(again) | set(done) == {k[4:] for k in keys} and report.downloaded == len(again)
    assert (tmp_path / "d" / "020.txt").read_text() == "set/020.txt"
    assert not list((tmp_path / "d").glob(".*.part-*"))


def _upload_inputs(server: Any, bucket: str, model: Path, data: Path | None) -> None:
    server.upload_folder(model, bucket, "model")
    if data is not None:
        server.upload_folder(data, bucket, "data")


def test_missing_dataset_prefix_fails_with_one_line(s3_server: Any, s3_bucket: str, tiny_sd: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _upload_inputs(s3_server, s3_bucket, tiny_sd, None)
    doc = job_document(f"s3://{s3_bucket}/model/", f"s3://{s3_bucket}/data/", f"s3://{s3_bucket}/out/",
                       storage={"endpoint": s3_server.endpoint, "addressingStyle": "path"})
    (tmp_path / "job.json").write_text(json.dumps(doc))
    code = main(["run", str(tmp_path / "job.json"), "--no-progress", "--scratch", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG and "Traceback" not in err
    assert f"no objects under s3://{s3_bucket}/data/" in err.strip().splitlines()[-1]


def test_missing_output_bucket_fails_before_training(s3_server: Any, s3_bucket: str, tiny_sd: Path,
                                                     squares: Path, tmp_path: Path) -> None:
    _upload_inputs(s3_server, s3_bucket, tiny_sd, squares)
    steps: list[int] = []
    job = local_job(f"s3://{s3_bucket}/model/", f"s3://{s3_bucket}/data/", "s3://no-such-bucket/out/",
                    storage={"endpoint": s3_server.endpoint, "addressingStyle": "path"})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0),
                     hooks=[lambda trainer: steps.append(trainer.step)])
    assert result.exit_code == EXIT_CONFIG and steps == []
    assert "S3 bucket 'no-such-bucket' does not exist" in result.message


def test_wrong_credentials_fail_with_one_line(auth_s3_server: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    doc = job_document("s3://models/sd/", "s3://data/set/", "s3://out/x/",
                       storage={"endpoint": auth_s3_server, "addressingStyle": "path"})
    (tmp_path / "job.json").write_text(json.dumps(doc))
    code = main(["run", str(tmp_path / "job.json"), "--no-progress", "--scratch", str(tmp_path / "s")])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert code == EXIT_CONFIG and "Traceback" not in err
    assert "S3 refused access to s3://models" in line and "credentials" in line
    assert "kubetune-test-secret" not in err


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read()


def test_s3_run_serves_progress_with_existing_checkpoints_and_valid_metrics(
    s3_server: Any, s3_bucket: str, tiny_sd: Path, squares: Path, tmp_path: Path
) -> None:
    _upload_inputs(s3_server, s3_bucket, tiny_sd, squares)
    job = local_job(f"s3://{s3_bucket}/model/", f"s3://{s3_bucket}/data/", f"s3://{s3_bucket}/out/",
                    storage={"endpoint": s3_server.endpoint, "addressingStyle": "path"},
                    output={"checkpointEvery": 1, "keepCheckpoints": 2}, training={"maxSteps": 3})
    port, seen = free_port(), {}

    def poll(trainer: Any) -> None:
        if trainer.step == 3:
            seen["progress"] = json.loads(_get(port, "/progress"))
            seen["metrics"] = _get(port, "/metrics")

    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", port=port, host="127.0.0.1", log_every=0),
                     hooks=[poll])
    assert result.exit_code == 0, result.message
    progress = seen["progress"]
    assert progress["step"] == 3 and progress["phase"] == "Training"
    assert [c["step"] for c in progress["checkpoints"]] == [1, 2]
    client = s3_server.client()
    for ref in progress["checkpoints"]:
        key = ref["uri"].removeprefix(f"s3://{s3_bucket}/") + "manifest.json"
        client.head_object(Bucket=s3_bucket, Key=key)
    for uri in result.progress["outputs"]["lora"].values():
        client.head_object(Bucket=s3_bucket, Key=uri.removeprefix(f"s3://{s3_bucket}/"))
    assert b'kubetune_trainer_step{name="test-lora",namespace="tests"} 3.0' in seen["metrics"]
    if shutil.which("promtool"):
        done = subprocess.run(["promtool", "check", "metrics"], input=seen["metrics"], capture_output=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
