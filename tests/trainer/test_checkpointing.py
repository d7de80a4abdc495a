"""Checkpoint retention policy, the complete/incomplete rules and integrity checks, on the local store."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.spec import OutputSpec
from kubetune_trainer.checkpoint import MANIFEST, CheckpointDamaged, Checkpointer, Manifest, checkpoints_to_delete
from kubetune_trainer.storage.local import LocalStore


@pytest.mark.parametrize(
    ("steps", "keep", "deleted"),
    [
        ([], 3, []),
        ([10], 1, []),
        ([10, 20, 30], 3, []),
        ([10, 20, 30, 40], 3, [10]),
        ([40, 10, 30, 20], 2, [10, 20]),
        ([5, 5, 6], 1, [5]),
    ],
)
def test_checkpoints_to_delete_keeps_the_newest(steps: list[int], keep: int, deleted: list[int]) -> None:
    assert checkpoints_to_delete(steps, keep) == deleted


def _checkpointer(tmp_path: Path, keep: int = 2) -> Checkpointer:
    output = OutputSpec(uri=str(tmp_path / "out"), checkpoint_every=2, keep_checkpoints=keep)
    return Checkpointer(LocalStore(), output, tmp_path / "scratch")


def _payload(tmp_path: Path, step: int) -> dict[str, Path]:
    path = tmp_path / f"weights-{step}.bin"
    path.write_bytes(bytes([step]) * 10)
    return {"weights.bin": path}


def test_save_prunes_and_lists_complete_checkpoints(tmp_path: Path) -> None:
    ckpt = _checkpointer(tmp_path, keep=2)
    for step in (2, 4, 6):
        ckpt.save(step, _payload(tmp_path, step))
    assert [ref.step for ref in ckpt.complete()] == [4, 6]
    assert not (tmp_path / "out" / "checkpoints" / "step-2").exists()
    assert ckpt.complete()[-1].uri.endswith("/checkpoints/step-6/")


def test_a_folder_without_manifest_is_ignored_and_cleaned(tmp_path: Path) -> None:
    ckpt = _checkpointer(tmp_path)
    ckpt.save(2, _payload(tmp_path, 2))
    partial = tmp_path / "out" / "checkpoints" / "step-4"
    partial.mkdir(parents=True)
    (partial / "weights.bin").write_bytes(b"half")
    assert [ref.step for ref in ckpt.complete()] == [2]
    assert ckpt.clean_incomplete() == [4]
    assert not partial.exists()
    assert (tmp_path / "out" / "checkpoints" / "step-2" / MANIFEST).is_file()


def test_load_returns_the_saved_files(tmp_path: Path) -> None:
    ckpt = _checkpointer(tmp_path)
    ref, seconds = ckpt.save(8, _payload(tmp_path, 8))
    files = ckpt.load(ref, tmp_path / "restored")
    assert files["weights.bin"].read_bytes() == bytes([8]) * 10
    assert seconds >= 0


@pytest.mark.parametrize(
    ("steps", "keep", "damaged", "deleted"),
    [
        ([2, 4], 2, [6], []),  # a damaged newest one does not push out the older good one
        ([2, 4], 1, [6], [2]),
        ([4, 8], 2, [6], []),  # between the kept ones: left for inspection
        ([6, 8, 10], 2, [4], [4, 6]),  # older than the oldest kept: pruned with it
        ([], 2, [2, 4], []),  # nothing good: nothing goes
        ([2, 4, 6], 3, [6], []),  # a step both listed and damaged counts as damaged
    ],
)
def test_damaged_checkpoints_never_count_toward_keep(steps: list[int], keep: int, damaged: list[int],
                                                     deleted: list[int]) -> None:
    assert checkpoints_to_delete(steps, keep, damaged) == deleted


def test_the_manifest_lists_each_files_size_and_sha256(tmp_path: Path) -> None:
    import hashlib
    import json

    ckpt = _checkpointer(tmp_path)
    ckpt.save(2, _payload(tmp_path, 2))
    manifest = json.loads((tmp_path / "out" / "checkpoints" / "step-2" / MANIFEST).read_text())
    assert manifest["files"] == {"weights.bin": {"size": 10, "sha256": hashlib.sha256(bytes([2]) * 10).hexdigest()}}
    assert "owner" not in manifest  # no claim: a bare checkpointer records no owner


def _damage(folder: Path, how: str) -> None:
    target = folder / "weights.bin"
    if how == "missing":
        target.unlink()
    elif how == "same-size garbage":
        target.write_bytes(b"\xff" * target.stat().st_size)
    elif how == "truncated":
        target.write_bytes(target.read_bytes()[:3])
    elif how == "binary manifest":
        (folder / MANIFEST).write_bytes(b"\xff\xfe\x00garbage\x80")
    elif how == "nested manifest":
        (folder / MANIFEST).write_text("[" * 200_000 + "]" * 200_000)
    else:
        (folder / MANIFEST).write_text('{"step": 6, "files": {"weights.b')


@pytest.mark.parametrize(("how", "why"), [
    ("missing", "weights.bin is listed in its manifest.json but missing"),
    ("same-size garbage", "weights.bin does not match the sha256 in its manifest.json"),
    ("truncated", "weights.bin is 3 bytes, its manifest.json says 10"),
    ("unreadable manifest", "its manifest.json is unreadable"),
    ("binary manifest", "its manifest.json is unreadable (not UTF-8 text)"),
    ("nested manifest", "its manifest.json is unreadable (RecursionError)"),
])
def test_a_damaged_checkpoint_is_refused_with_why(tmp_path: Path, how: str, why: str) -> None:
    ckpt = _checkpointer(tmp_path)
    for step in (4, 6):
        ckpt.save(step, _payload(tmp_path, step))
    newest = ckpt.complete()[-1]
    _damage(tmp_path / "out" / "checkpoints" / "step-6", how)
    if how.endswith("manifest"):  # found while listing: never offered as complete
        assert [ref.step for ref in ckpt.complete()] == [4] and why in ckpt.damaged[6]
    else:
        with pytest.raises(CheckpointDamaged, match=why):
            ckpt.load(newest, tmp_path / "restored")
    files = ckpt.load(ckpt.complete()[0], tmp_path / "older")
    assert files["weights.bin"].read_bytes() == bytes([4]) * 10


def test_a_damaged_checkpoint_is_left_until_saved_again_and_never_costs_the_last_good_one(tmp_path: Path) -> None:
    ckpt = _checkpointer(tmp_path, keep=2)
    for step in (4, 6, 8):
        ckpt.save(step, _payload(tmp_path, step))
    _damage(tmp_path / "out" / "checkpoints" / "step-8", "same-size garbage")
    ckpt = _checkpointer(tmp_path, keep=2)  # the next run
    with pytest.raises(CheckpointDamaged):
        ckpt.load(ckpt.complete()[-1], tmp_path / "r")
    ckpt.damaged[8] = "garbage"  # what the trainer records when it skips one
    ckpt.prune()
    assert [ref.step for ref in ckpt.complete()] == [6]  # not complete, and not counted: 6 stays
    assert (tmp_path / "out" / "checkpoints" / "step-8" / "weights.bin").is_file()  # left for inspection
    ckpt.save(8, _payload(tmp_path, 8))  # training reaches step 8 again: the folder is replaced
    assert [ref.step for ref in ckpt.complete()] == [6, 8] and 8 not in ckpt.damaged
    assert ckpt.load(ckpt.complete()[-1], tmp_path / "r2")["weights.bin"].read_bytes() == bytes([8]) * 10


def test_a_manifest_without_digests_still_loads_and_is_size_checked(tmp_path: Path) -> None:
    import json

    folder = tmp_path / "out" / "checkpoints" / "step-2"
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"0123456789")
    (folder / MANIFEST).write_text(json.dumps({"step": 2, "createdAt": "x", "files": {"weights.bin": 10}}))
    ckpt = _checkpointer(tmp_path)
    assert ckpt.load(ckpt.complete()[0], tmp_path / "r")["weights.bin"].read_bytes() == b"0123456789"
    (folder / "weights.bin").write_bytes(b"01234")
    with pytest.raises(CheckpointDamaged, match="5 bytes"):
        ckpt.load(ckpt.complete()[0], tmp_path / "r2")


@pytest.mark.parametrize("files", [{"../escape": 1}, {}, {"manifest.json": 1}, {"a": True}, "10", {"a": 1e999}])
def test_a_manifest_naming_unsafe_or_no_files_is_damaged(files: object) -> None:
    import json

    with pytest.raises(CheckpointDamaged):
        Manifest.parse(json.dumps({"step": 2, "files": files}))


@pytest.mark.parametrize("how", ["binary manifest", "nested manifest"])
def test_loading_a_checkpoint_whose_manifest_became_unreadable_is_damage(tmp_path: Path, how: str) -> None:
    ckpt = _checkpointer(tmp_path)
    ckpt.save(6, _payload(tmp_path, 6))
    ref = ckpt.complete()[-1]
    _damage(tmp_path / "out" / "checkpoints" / "step-6", how)  # between listing and loading
    with pytest.raises(CheckpointDamaged, match=r"its manifest\.json is unreadable"):
        ckpt.load(ref, tmp_path / "restored")


def test_load_verified_names_the_files_whose_sha256_matched(tmp_path: Path) -> None:
    import json

    ckpt = _checkpointer(tmp_path)
    ref, _ = ckpt.save(2, {**_payload(tmp_path, 2), "old.bin": _payload(tmp_path, 3)["weights.bin"]})
    manifest_path = tmp_path / "out" / "checkpoints" / "step-2" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["old.bin"] = manifest["files"]["old.bin"]["size"]  # as written before digests
    manifest_path.write_text(json.dumps(manifest))
    files, verified = ckpt.load_verified(ref, tmp_path / "r")
    assert set(files) == {"weights.bin", "old.bin"} and verified == {"weights.bin"}


def test_a_local_delete_never_removes_a_pvc_claims_root(tmp_path: Path) -> None:
    claim = tmp_path / "pvc" / "claim"
    claim.mkdir(parents=True)
    store = LocalStore(tmp_path / "pvc")
    probe = tmp_path / "probe"
    probe.write_text("x")
    store.upload(probe, "pvc://claim/checkpoints/.write-probe")
    store.delete("pvc://claim/checkpoints/.write-probe")
    assert claim.is_dir() and not any(claim.iterdir())  # the mount point stays (rmdir there is EBUSY)
    store.upload(probe, "pvc://claim/out/a/b")
    store.delete("pvc://claim/out/a/b")
    assert claim.is_dir() and not (claim / "out").exists()  # folders below it still go


def test_create_never_replaces_what_is_there(tmp_path: Path) -> None:
    store = LocalStore()
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text("first")
    second.write_text("second")
    target = str(tmp_path / "out" / "record.json")
    assert store.create(first, target) is True
    assert store.create(second, target) is False
    assert (tmp_path / "out" / "record.json").read_text() == "first"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["record.json"]  # no partial left
