"""Staging through the project's own storage seam: traversal refusal, local names and their
collisions, markers, re-runs, retries of corrupt transfers, pvc and hf."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kubetune.api.spec import StorageSpec
from kubetune_trainer.exitcodes import EXIT_CONFIG, EXIT_STORAGE_UNAVAILABLE, ConfigError, StorageUnavailable
from kubetune_trainer.storage.interface import Fetched, ObjectInfo, ObjectReplaced
from kubetune_trainer.storage.local import LocalStore, write_in_folder
from kubetune_trainer.storage.schemes import stage
from kubetune_trainer.storage.staging import (
    MARKER_DIR,
    MAX_SEGMENT_BYTES,
    OBJECT_ATTEMPTS,
    Stager,
    local_plan,
    local_relative,
)
from kubetune_trainer.storage.transfer_checks import CorruptTransfer


class ListingStore(LocalStore):
    """A local store that also lists one extra key exactly as given (as S3 might)."""

    def __init__(self, extra: str) -> None:
        super().__init__()
        self.extra = extra

    def list(self, prefix_uri: str, limit: int | None = None) -> list[ObjectInfo]:
        return [*super().list(prefix_uri), ObjectInfo(prefix_uri + self.extra, self.extra, 1)]


@pytest.mark.parametrize("key", ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "a//b.txt"])
def test_keys_escaping_the_target_are_refused(tmp_path: Path, key: str) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "ok.txt").write_text("ok")
    with pytest.raises(ConfigError, match="escape the target folder"):
        Stager(ListingStore(key)).stage_prefix(str(source), tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists()


def test_rerun_skips_verified_files_and_refetches_changed_ones(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub dir").mkdir(parents=True)
    for name in ("a.txt", "sub dir/b.txt", "sub dir/ü.txt"):
        (source / name).write_text(name)
    fetched: list[str] = []
    stager = Stager(LocalStore(), concurrency=2, on_download=lambda obj: fetched.append(obj.relative))
    report = stager.stage_prefix(str(source), tmp_path / "dest")
    assert (report.files, report.downloaded) == (3, 3)
    assert (tmp_path / "dest" / "sub dir" / "ü.txt").read_text() == "sub dir/ü.txt"
    fetched.clear()
    (source / "a.txt").write_text("changed, longer")
    report = stager.stage_prefix(str(source), tmp_path / "dest")
    assert fetched == ["a.txt"]
    marker = json.loads((tmp_path / "dest" / MARKER_DIR / "a.txt.json").read_text())
    assert marker["size"] == len("changed, longer")


def test_empty_prefix_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no objects under"):
        Stager(LocalStore()).stage_prefix(str(tmp_path / "nothing"), tmp_path / "dest")


def test_pvc_uris_resolve_under_the_mount_root(tmp_path: Path) -> None:
    (tmp_path / "claim-a" / "models" / "sd").mkdir(parents=True)
    report = stage("pvc://claim-a/models/sd", tmp_path / "unused", StorageSpec(), pvc_root=tmp_path)
    assert report.path == tmp_path / "claim-a" / "models" / "sd"
    with pytest.raises(ConfigError, match="does not exist"):
        stage("pvc://claim-a/missing", tmp_path / "unused", StorageSpec(), pvc_root=tmp_path)


def test_hf_uri_reads_a_prefilled_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny--sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = stage("hf://tiny/sd", tmp_path / "unused", StorageSpec())
    assert (report.path / "model_index.json").is_file()
    with pytest.raises(ConfigError, match="hf://tiny/absent"):
        stage("hf://tiny/absent", tmp_path / "unused", StorageSpec())


class FailingStore(LocalStore):
    """Writes part of one object, then fails, as a broken range would."""

    def download(self, uri: str, path: Path) -> str:
        if uri.endswith("bad.bin"):
            path.write_bytes(b"half")
            raise OSError(f"{uri}: connection reset")
        return super().download(uri, path)


def test_a_failed_download_leaves_no_staged_file_and_no_marker(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "bad.bin").write_bytes(b"x" * 100)
    with pytest.raises(OSError, match=r"bad\.bin: connection reset"):
        Stager(FailingStore(), concurrency=1).stage_prefix(str(source), tmp_path / "dest")
    assert not (tmp_path / "dest" / "bad.bin").exists()
    assert [p.name for p in (tmp_path / "dest").rglob("*")] == []


class ReplacingStore(LocalStore):
    """Reports that the bytes it fetched were checked against a newer ETag than the one listed."""

    def download(self, uri: str, path: Path) -> Fetched:
        super().download(uri, path)
        return Fetched("0" * 32, "md5")


def test_an_object_replaced_after_listing_is_not_staged(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(b"abc")

    class Listing(ReplacingStore):
        def list(self, prefix_uri: str, limit: int | None = None) -> list[ObjectInfo]:
            return [ObjectInfo(prefix_uri.rstrip("/") + "/a.bin", "a.bin", 3, "f" * 32)]

    with pytest.raises(ObjectReplaced, match=r"a\.bin was replaced after it was listed") as raised:
        Stager(Listing()).stage_prefix(str(source), tmp_path / "dest")
    assert not (tmp_path / "dest" / "a.bin").exists() and raised.value.exit_code == EXIT_STORAGE_UNAVAILABLE


LONG = "x" * 246 + ".png"  # 250 bytes: with the temporary file's prefix and suffix, over NAME_MAX


@pytest.mark.parametrize(("key", "local"), [
    ("a/b.txt", "a/b.txt"),
    ("./x", "x"),
    ("a/./b", "a/b"),
    ("ü/ñ.txt", "ü/ñ.txt"),
    ("y" * MAX_SEGMENT_BYTES, "y" * MAX_SEGMENT_BYTES),
])
def test_keys_map_to_the_same_local_names_except_dots(key: str, local: str) -> None:
    assert local_relative(key) == local


def test_an_over_long_segment_is_cut_with_a_hash_keeping_its_extension() -> None:
    local = local_relative(f"images/{LONG}")
    folder, name = local.split("/")
    digest = hashlib.sha256(LONG.encode()).hexdigest()[:12]
    assert folder == "images" and name == f"{'x' * (MAX_SEGMENT_BYTES - 4 - 13)}~{digest}.png"
    assert len(name.encode()) == MAX_SEGMENT_BYTES
    assert local_relative(f"images/{LONG}") == local  # deterministic
    assert local_relative("x" * 245 + "y.png") != local_relative(LONG)  # the hash tells apart names with one head
    many_bytes = "é" * 150 + ".jpg"  # 304 bytes: the cut never splits a character
    assert local_relative(many_bytes).encode().decode() == local_relative(many_bytes)
    assert len(local_relative(many_bytes).encode()) <= MAX_SEGMENT_BYTES


def test_mapping_a_path_equals_joining_its_mapped_segments() -> None:
    """The data loader maps metadata.jsonl file_name values relative to a subfolder; it must agree."""
    key = f"sub/{LONG}/{LONG}"
    assert local_relative(key) == "/".join(local_relative(part) for part in key.split("/"))


@pytest.mark.parametrize("key", ["../escape.txt", "a//b", "/abs", ".", f"{MARKER_DIR}/x.json", "a/\0b"])
def test_unstageable_keys_are_config_errors_naming_the_key(key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        local_relative(key)
    assert raised.value.exit_code == EXIT_CONFIG and repr(key) in str(raised.value)


def _objects(*keys: str) -> list[ObjectInfo]:
    return [ObjectInfo(f"s3://b/data/{key}", key, 1) for key in keys]


@pytest.mark.parametrize(("keys", "named"), [
    (["./x", "x"], ["s3://b/data/./x", "s3://b/data/x"]),
    (["a", "a/b"], ["s3://b/data/a", "s3://b/data/a/b"]),
    (["a/b/c", "a/b"], ["s3://b/data/a/b", "s3://b/data/a/b/c"]),
    ([LONG, "y/z", local_relative(LONG)], [f"s3://b/data/{LONG}", f"s3://b/data/{local_relative(LONG)}"]),
])
def test_keys_that_collide_locally_are_refused_naming_both(keys: list[str], named: list[str]) -> None:
    with pytest.raises(ConfigError) as raised:
        local_plan(_objects(*keys), "s3://b/data/")
    assert raised.value.exit_code == EXIT_CONFIG
    assert all(uri in str(raised.value) for uri in named), str(raised.value)


def test_a_file_and_a_folder_of_one_name_fail_before_anything_is_fetched(tmp_path: Path) -> None:
    class Listing(LocalStore):
        def list(self, prefix_uri: str, limit: int | None = None) -> list[ObjectInfo]:
            return [ObjectInfo(prefix_uri + "a", "a", 1), ObjectInfo(prefix_uri + "a/b", "a/b", 1)]

        def download(self, uri: str, path: Path) -> Fetched:
            raise AssertionError("nothing may be fetched")

    with pytest.raises(ConfigError, match=r"is a file but .* needs a folder of the same name") as raised:
        Stager(Listing()).stage_prefix(str(tmp_path / "src") + "/", tmp_path / "dest")
    assert raised.value.exit_code == EXIT_CONFIG and f"{tmp_path}/src/a/b" in str(raised.value)


def test_an_over_long_name_is_staged_under_its_local_name(tmp_path: Path) -> None:
    class Listing(LocalStore):
        def list(self, prefix_uri: str, limit: int | None = None) -> list[ObjectInfo]:
            return [ObjectInfo(f"{prefix_uri}short.txt", LONG, 5)]

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "short.txt").write_text("hello")
    report = Stager(Listing()).stage_prefix(str(tmp_path / "src") + "/", tmp_path / "dest")
    assert report.downloaded == 1
    assert (tmp_path / "dest" / local_relative(LONG)).read_text() == "hello"
    assert report.unverified == 1 and report.unverified_keys == (f"{tmp_path}/src/short.txt",)


class CorruptingStore(LocalStore):
    """Delivers each object with a flipped byte its first `bad` times (a checked transfer that failed)."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad, self.calls = bad, {}

    def download(self, uri: str, path: Path) -> Fetched:
        super().download(uri, path)
        self.calls[uri] = self.calls.get(uri, 0) + 1
        if self.calls[uri] <= self.bad:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(data)
            raise CorruptTransfer(f"{uri}: the parts' MD5s do not match the multipart ETag")
        return Fetched("", "multipart-md5")


def test_a_corrupt_transfer_is_fetched_again_and_never_staged_as_good(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "model.bin").write_bytes(bytes(range(256)) * 64)
    store = CorruptingStore(bad=OBJECT_ATTEMPTS - 1)
    report = Stager(store).stage_prefix(str(source), tmp_path / "dest")
    assert (tmp_path / "dest" / "model.bin").read_bytes() == (source / "model.bin").read_bytes()
    assert (report.retried, report.unverified) == (OBJECT_ATTEMPTS - 1, 0)
    assert store.calls[f"{source}/model.bin"] == OBJECT_ATTEMPTS
    assert not list((tmp_path / "dest").glob(".*.part-*"))


def test_an_object_corrupt_every_time_fails_retryably_and_is_not_staged(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "model.bin").write_bytes(b"x" * 1000)
    failed = rf"model\.bin: {OBJECT_ATTEMPTS} transfers failed; last: .*multipart ETag"
    with pytest.raises(StorageUnavailable, match=failed) as raised:
        Stager(CorruptingStore(bad=99)).stage_prefix(str(source), tmp_path / "dest")
    assert raised.value.exit_code == EXIT_STORAGE_UNAVAILABLE
    assert [p.name for p in (tmp_path / "dest").rglob("*")] == []


def test_the_retry_budget_of_a_pass_stops_a_path_that_corrupts_everything(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for index in range(40):
        (source / f"{index}.bin").write_bytes(b"x" * 10)
    store = CorruptingStore(bad=1)  # each object would pass on its second transfer
    with pytest.raises(StorageUnavailable, match="retry budget of this pass"):
        Stager(store, concurrency=1).stage_prefix(str(source), tmp_path / "dest")
    calls = sum(store.calls.values())  # the budget's objects twice, one more that found it spent, one begun meanwhile
    assert 2 * Stager.retry_budget(40) + 1 <= calls <= 2 * Stager.retry_budget(40) + 2 < 2 * 40


def test_the_log_counts_and_names_objects_staged_without_a_digest(tmp_path: Path) -> None:
    import io

    from kubetune_trainer.reporting import LogLines
    from kubetune_trainer.storage.staging import StagingReport

    out = io.StringIO()
    LogLines(stream=out).staged("data", StagingReport(tmp_path, files=3, downloaded=3, unverified=2,
                                                      unverified_keys=("s3://b/d/x.bin", "s3://b/d/y.bin")))
    last = out.getvalue().strip().splitlines()[-1]
    assert "data: 2 objects carry no digest" in last and "s3://b/d/x.bin, s3://b/d/y.bin" in last
    out = io.StringIO()
    LogLines(stream=out).staged("data", StagingReport(tmp_path, files=3, downloaded=3))
    assert "digest" not in out.getvalue()


def test_a_write_whose_folder_another_rank_pruned_is_tried_again(tmp_path: Path) -> None:
    """One rank's probe delete prunes the output root while it is still empty; another rank, between its
    mkdir and its first write there, writes again into a new folder instead of failing the run."""
    target = tmp_path / "out" / ".kubetune-preflight-x"
    tries: list[int] = []

    def write() -> None:
        tries.append(1)
        if len(tries) == 1:
            target.parent.rmdir()  # the other rank's prune, between our mkdir and our write
        target.write_text("probe")

    write_in_folder(target, write)
    assert target.read_text() == "probe" and len(tries) == 2


def test_a_missing_source_is_not_taken_for_a_pruned_folder(tmp_path: Path) -> None:
    store = LocalStore()
    with pytest.raises(FileNotFoundError):
        store.upload(tmp_path / "absent", str(tmp_path / "out" / "file"))
    assert not list((tmp_path / "out").iterdir()), "no partial file left behind"


def test_a_file_deleted_between_the_walk_and_its_size_is_not_listed(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 surveys the output while rank 0's preflight probe comes and goes: a file the walk saw but that is
    gone when its size is read is simply not there (CI once failed the survey with FileNotFoundError)."""
    (tmp_path / "kept").write_text("k")
    probe = tmp_path / ".kubetune-preflight-x"
    probe.write_text("p")
    real_is_file = Path.is_file

    def is_file_then_gone(path: Path) -> bool:
        answer = real_is_file(path)
        if path == probe and answer:
            path.unlink()  # the other rank's unlink, right after our walk saw the file
        return answer

    monkeypatch.setattr(Path, "is_file", is_file_then_gone)
    assert [obj.relative for obj in LocalStore().list(str(tmp_path))] == ["kept"]


class _CorruptFirst:
    """A store whose first `bad` transfers of any object arrive corrupt."""

    def __init__(self, bad: int) -> None:
        self.bad, self.calls = bad, 0

    def download(self, uri: str, path: Path) -> object:
        from kubetune_trainer.storage.interface import Fetched

        self.calls += 1
        if self.calls <= self.bad:
            raise CorruptTransfer(f"{uri}: MD5 does not match the ETag; the download is corrupt")
        path.write_bytes(b"ok")
        return Fetched(digest="md5")


def test_a_single_object_that_arrives_corrupt_is_fetched_again_a_few_times_then_fails(tmp_path: Path) -> None:
    from kubetune_trainer.storage.interface import CORRUPT_ATTEMPTS, download_whole

    healed = _CorruptFirst(bad=CORRUPT_ATTEMPTS - 1)
    assert download_whole(healed, "s3://b/owner.json", tmp_path / "a").digest == "md5"  # type: ignore[arg-type]
    assert healed.calls == CORRUPT_ATTEMPTS and (tmp_path / "a").read_bytes() == b"ok"
    broken = _CorruptFirst(bad=CORRUPT_ATTEMPTS)
    with pytest.raises(CorruptTransfer, match=r"owner\.json: MD5"):
        download_whole(broken, "s3://b/owner.json", tmp_path / "b")  # type: ignore[arg-type]
    assert broken.calls == CORRUPT_ATTEMPTS and not (tmp_path / "b").exists()
