"""The latent cache's copy under the output URI: only complete, verified shards are ever read,
an incomplete copy is used for what it really holds, and the missing images are encoded.

The store is the trainer's own local backend (a `pvc://` output under a temporary PVC root);
the S3 restart lives in `test_latent_mirror_s3.py`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from trainer_probe import running_trainers
from trainer_support import local_job

from kubetune_trainer.caches.latents import DiskLatentCache
from kubetune_trainer.caches.mirror import SWITCH_ENV, CacheMirror, NoMirror, build_mirror
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job
from kubetune_trainer.parts import StepRecord
from kubetune_trainer.storage.local import LocalStore


def _filled(folder: Path, count: int, scratch: Path | None = None) -> DiskLatentCache:
    """A cache holding `count` distinct entries, all waiting to be published."""
    import torch

    cache = DiskLatentCache(folder, scratch)
    for index in range(count):
        name = cache.entry_name(f"image-{index}.png|100|8x8|0,0|0")
        cache.store(name, torch.full((8, 2, 2), float(index)))
        cache.unpublished.append(name)
    return cache


def _mirror(cache: DiskLatentCache, remote: Path, tmp: Path, shard_bytes: int = 1 << 20) -> CacheMirror:
    return CacheMirror(LocalStore(), str(remote), cache, tmp, rank=0, shard_bytes=shard_bytes)


def test_published_entries_come_back_equal_in_a_fresh_cache(tmp_path: Path) -> None:
    import torch

    source = _filled(tmp_path / "a", 5)
    assert _mirror(source, tmp_path / "remote", tmp_path / "tmp", shard_bytes=1).publish() == 5
    assert len(list((tmp_path / "remote").glob("*.json"))) == 5  # one entry per shard at this size
    assert source.unpublished == []
    fresh = DiskLatentCache(tmp_path / "b")
    report = _mirror(fresh, tmp_path / "remote", tmp_path / "tmp").fetch()
    assert (report.shards, report.entries, report.ignored) == (5, 5, [])
    assert fresh.names() == source.names()
    for name in source.names():
        torch.testing.assert_close(fresh.load(name), source.load(name))
    again = _mirror(fresh, tmp_path / "remote", tmp_path / "tmp").fetch()
    assert (again.shards, again.entries) == (0, 0)  # nothing missing: no shard downloaded


def _corrupt(remote: Path, how: str) -> None:
    manifest = sorted(remote.glob("*.json"))[0]
    shard = remote / json.loads(manifest.read_text())["shard"]
    if how == "manifest missing":
        manifest.unlink()
    elif how == "shard missing":
        shard.unlink()
    elif how == "shard bytes changed":
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "manifest truncated":
        manifest.write_text(manifest.read_text()[:20])
    elif how == "unsafe entry name":
        manifest.write_text(manifest.read_text().replace('"entries": ["', '"entries": ["../../x", "'))


@pytest.mark.parametrize("how", ["manifest missing", "shard missing", "shard bytes changed", "manifest truncated",
                                 "unsafe entry name"])
def test_an_incomplete_shard_is_ignored_and_the_rest_is_used(tmp_path: Path, how: str) -> None:
    source = _filled(tmp_path / "a", 3)
    _mirror(source, tmp_path / "remote", tmp_path / "tmp", shard_bytes=1).publish()
    _corrupt(tmp_path / "remote", how)
    fresh = DiskLatentCache(tmp_path / "b")
    report = _mirror(fresh, tmp_path / "remote", tmp_path / "tmp").fetch()
    assert (report.shards, report.entries) == (2, 2)
    assert len(report.ignored) == (0 if how == "manifest missing" else 1)
    assert len(fresh.names()) == 2 and fresh.names() < source.names()
    assert not list((tmp_path / "b").glob("*.tmp")) and not list((tmp_path / "tmp").iterdir())


def test_an_unreadable_copy_is_a_miss_not_an_error(tmp_path: Path) -> None:
    class Unreachable(LocalStore):
        def list(self, prefix_uri: str) -> list:
            raise OSError("endpoint unreachable")

    cache = DiskLatentCache(tmp_path / "c")
    report = CacheMirror(Unreachable(), str(tmp_path / "remote"), cache, tmp_path / "tmp", rank=0).fetch()
    assert report.entries == 0 and "endpoint unreachable" in report.ignored[0]


def test_a_failed_publish_keeps_the_entries_for_the_next_one(tmp_path: Path) -> None:
    class Refusing(LocalStore):
        fail = True

        def upload(self, path: Path, uri: str) -> None:
            if self.fail:
                raise OSError("slow down")
            super().upload(path, uri)

    notes: list[str] = []
    store = Refusing()
    cache = _filled(tmp_path / "a", 2)
    mirror = CacheMirror(store, str(tmp_path / "remote"), cache, tmp_path / "tmp", rank=0, notice=notes.append)
    assert mirror.publish() == 0 and len(cache.unpublished) == 2 and "slow down" in notes[0]
    store.fail = False
    assert mirror.publish() == 2 and cache.unpublished == []


def test_entry_names_do_not_depend_on_the_scratch_mount(tmp_path: Path) -> None:
    key = "{}/data/cat.png|2048|64x64|0,0|1"
    one = DiskLatentCache(tmp_path / "one" / "latents" / "k", tmp_path / "one")
    two = DiskLatentCache(tmp_path / "two" / "latents" / "k", tmp_path / "two")
    assert one.entry_name(key.format(tmp_path / "one")) == two.entry_name(key.format(tmp_path / "two"))
    assert one.entry_name("/mnt/pvc/claim/cat.png|2048|64x64|0,0|1") != one.entry_name(key.format(tmp_path / "one"))


@pytest.mark.parametrize(("uri", "switch", "mirrored"), [
    ("s3://bucket/out/", None, True), ("pvc://claim/out", None, True), ("/tmp/out", None, False),
    ("file:///tmp/out", None, False), ("s3://bucket/out/", "0", False), ("s3://bucket/out/", "1", True),
])
def test_the_copy_is_kept_where_the_output_outlives_the_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             uri: str, switch: str | None, mirrored: bool) -> None:
    if switch is not None:
        monkeypatch.setenv(SWITCH_ENV, switch)
    else:
        monkeypatch.delenv(SWITCH_ENV, raising=False)
    mirror = build_mirror(DiskLatentCache(tmp_path / "c"), LocalStore(), uri, tmp_path, 0, print)
    assert isinstance(mirror, CacheMirror if mirrored else NoMirror)


def _train(model: Path, data: Path, pvc: Path, output: str, scratch: Path) -> tuple[int, Path]:
    """Three steps of two images (one epoch, a publish per step); return images encoded and the adapter."""
    objectives = []

    def observe(record: StepRecord) -> None:
        objectives.append(built[-1].p.objective)

    job = local_job(str(model), str(data), output, data={"centerCrop": True, "randomFlip": False},
                    training={"maxSteps": 3}, output={"checkpointEvery": 1, "keepCheckpoints": 1})
    with running_trainers() as built:
        result = run_job(job, RuntimeConfig(scratch=scratch, log_every=0, pvc_root=pvc), hooks=[observe])
    assert result.exit_code == 0, result.message
    return objectives[-1].encoded_images, LocalStore(pvc).path_of(result.progress["outputs"]["lora"]["diffusers"])


def test_a_run_encodes_only_what_an_incomplete_copy_lacks(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    pvc = tmp_path / "pvc"
    encoded, first = _train(tiny_sd, squares, pvc, "pvc://claim/a", tmp_path / "scratch-a")
    assert encoded == 6
    (remote,) = (pvc / "claim" / "a" / "cache" / "latents").iterdir()
    assert len(list(remote.glob("*.json"))) == 3  # one shard per checkpoint step, two images each
    copy = pvc / "claim" / "b" / "cache" / "latents" / remote.name
    shutil.copytree(remote, copy)
    _corrupt(copy, "manifest missing")
    _corrupt(copy, "shard missing")  # the first remaining manifest now lists an absent shard

    encoded, second = _train(tiny_sd, squares, pvc, "pvc://claim/b", tmp_path / "scratch-b")
    assert encoded == 4  # two shards unusable, one used: only its two images were not encoded
    for key, value in load_file(first).items():
        torch.testing.assert_close(load_file(second)[key], value, rtol=1e-4, atol=1e-5)
    refilled = DiskLatentCache(tmp_path / "fresh")
    assert _mirror(refilled, copy, tmp_path / "tmp").fetch().entries == 6  # the re-encoded ones were published


def test_the_cache_key_does_not_depend_on_where_the_model_was_staged(tiny_sd: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    from kubetune_trainer.caches.latents import cache_folder

    shutil.copytree(tiny_sd / "vae", tmp_path / "elsewhere" / "vae")
    here, there = (AutoencoderKL.from_pretrained(str(folder / "vae")) for folder in (tiny_sd, tmp_path / "elsewhere"))
    assert cache_folder(tmp_path, here, "s3://b/data/", 64) == cache_folder(tmp_path, there, "s3://b/data/", 64)
    assert cache_folder(tmp_path, here, "s3://b/data/", 64) != cache_folder(tmp_path, here, "s3://b/data/", 128)
