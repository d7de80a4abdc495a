"""Staging through the project's own storage seam: traversal refusal, markers, re-runs, pvc and hf."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api.spec import StorageSpec
from kubetune_trainer.exitcodes import ConfigError, TrainerError
from kubetune_trainer.staging import MARKER_DIR, Stager, stage
from kubetune_trainer.storage import LocalStore, ObjectInfo


class ListingStore(LocalStore):
    """A local store that also lists one extra key exactly as given (as S3 might)."""

    def __init__(self, extra: str) -> None:
        super().__init__()
        self.extra = extra

    def list(self, prefix_uri: str) -> list[ObjectInfo]:
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

    def download(self, uri: str, path: Path) -> str:
        super().download(uri, path)
        return "0" * 32


def test_an_object_replaced_after_listing_is_not_staged(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(b"abc")

    class Listing(ReplacingStore):
        def list(self, prefix_uri: str) -> list[ObjectInfo]:
            return [ObjectInfo(prefix_uri.rstrip("/") + "/a.bin", "a.bin", 3, "f" * 32)]

    with pytest.raises(TrainerError, match=r"a\.bin was replaced after it was listed"):
        Stager(Listing()).stage_prefix(str(source), tmp_path / "dest")
    assert not (tmp_path / "dest" / "a.bin").exists()
