"""An output prefix belongs to one job: another job is refused before it stages or writes anything.

The claim's rules on the local store first (owner record, manifest owners, prefixes written
before owners were recorded), then whole runs: a different job refused with exit 78 and every
file untouched, the same job resuming. The same runs against a real S3 server on loopback are
in `test_ownership_s3.py`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from trainer_support import job_document

from kubetune.api.identity import JobIdentity
from kubetune.api.validation import validate_document
from kubetune_trainer.checkpoint import MANIFEST, Checkpointer
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_CONFIG, EXIT_FAILED, ConfigError
from kubetune_trainer.job import run_job
from kubetune_trainer.ownership import OWNER_RECORD, OutputClaim, survey_output, weight_fields
from kubetune_trainer.storage.local import LocalStore


def _job(output: str, name: str = "test-lora", model: str = "model", data: str = "data", **spec: Any) -> Any:
    doc = job_document(model, data, output, **spec)
    doc["metadata"]["name"] = name
    result = validate_document(doc, mode="local")
    assert result.job is not None, result.problems
    return result.job


def _claim(job: Any, tmp_path: Path) -> OutputClaim:
    return OutputClaim(LocalStore(), job.spec.output.uri, JobIdentity.of(job), weight_fields(job.spec),
                       tmp_path / "scratch")


def _check(job: Any, tmp_path: Path) -> str | None:
    claim = _claim(job, tmp_path)
    return claim.check(survey_output(claim.store, claim.uri, claim.scratch))


def _contents(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _owned_prefix(tmp_path: Path, job: Any, checkpoints: tuple[int, ...] = (2,)) -> Path:
    """A prefix as a run of `job` leaves it: owner record, checkpoints, final weights."""
    out = Path(job.spec.output.uri)
    claim = _claim(job, tmp_path)
    ckpt = Checkpointer(claim.store, job.spec.output, tmp_path / "scratch", claim)
    ckpt.check_writable()
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"weights")
    for step in checkpoints:
        ckpt.save(step, {"w.bin": payload})
    (out / "final").mkdir(parents=True, exist_ok=True)
    (out / "final" / "pytorch_lora_weights.safetensors").write_bytes(b"final")
    return out


def test_an_empty_prefix_is_claimed_on_the_first_write_only(tmp_path: Path) -> None:
    job = _job(str(tmp_path / "out"))
    assert _check(job, tmp_path) is None
    assert not (tmp_path / "out").exists()  # checking writes nothing
    _owned_prefix(tmp_path, job)
    record = json.loads((tmp_path / "out" / OWNER_RECORD).read_text())
    assert record["owner"] == {"namespace": "tests", "name": "test-lora", "specDigest": JobIdentity.of(job).spec_digest}
    manifest = json.loads((tmp_path / "out" / "checkpoints" / "step-2" / MANIFEST).read_text())
    assert manifest["owner"] == record["owner"]
    assert _check(job, tmp_path) is None  # the same job again: its own output


def test_another_job_is_refused_naming_the_owner_and_the_fix(tmp_path: Path) -> None:
    out = _owned_prefix(tmp_path, _job(str(tmp_path / "out")))
    before = _contents(out)
    with pytest.raises(ConfigError) as refused:
        _check(_job(str(out), name="other-lora"), tmp_path)
    message = str(refused.value)
    assert f"{out}/ holds the output of job tests/test-lora" in message
    assert "not of tests/other-lora" in message
    assert "new spec.output.uri" in message and f"delete everything under {out}/" in message
    assert _contents(out) == before


def test_the_same_name_with_other_weight_fields_is_refused_naming_the_fields(tmp_path: Path) -> None:
    out = _owned_prefix(tmp_path, _job(str(tmp_path / "out")))
    with pytest.raises(ConfigError, match=r"test-lora trained with different weight-shaping fields "
                                          r"\(training.learningRate 0.001 there, 0.0005 here\)"):
        _check(_job(str(out), training={"learningRate": 5e-4}), tmp_path)


def test_fields_that_do_not_shape_the_weights_may_change(tmp_path: Path) -> None:
    out = _owned_prefix(tmp_path, _job(str(tmp_path / "out")))
    assert _check(_job(str(out), training={"maxSteps": 40, "mixedPrecision": "fp16"}), tmp_path) is None


def test_a_prefix_holding_only_final_weights_is_claimed_by_its_record(tmp_path: Path) -> None:
    out = _owned_prefix(tmp_path, _job(str(tmp_path / "out")), checkpoints=())
    assert not (out / "checkpoints").exists()
    with pytest.raises(ConfigError, match="tests/test-lora"):
        _check(_job(str(out), name="other-lora"), tmp_path)


def test_checkpoints_of_another_job_are_refused_even_without_a_record(tmp_path: Path) -> None:
    out = _owned_prefix(tmp_path, _job(str(tmp_path / "out")))
    (out / OWNER_RECORD).unlink()
    with pytest.raises(ConfigError, match="tests/test-lora"):
        _check(_job(str(out), name="other-lora"), tmp_path)


def test_a_prefix_written_before_owners_were_recorded_is_adopted_with_a_notice(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for step in (2, 4):
        folder = out / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "w.bin").write_bytes(b"old")
        (folder / MANIFEST).write_text(json.dumps({"step": step, "createdAt": "x", "files": {"w.bin": 3}}))
    job = _job(str(out))
    notice = _check(job, tmp_path)
    assert notice is not None
    assert "checkpoints (steps 2, 4) written before kubetune recorded their owner" in notice
    assert "tests/test-lora adopts them" in notice
    claim = _claim(job, tmp_path)
    ckpt = Checkpointer(claim.store, job.spec.output, tmp_path / "scratch", claim)
    ckpt.check_writable()
    assert [ref.step for ref in ckpt.complete()] == [2, 4]  # resumable by the adopter
    assert json.loads((out / OWNER_RECORD).read_text())["owner"]["name"] == "test-lora"
    with pytest.raises(ConfigError, match="tests/test-lora"):  # and now it is the adopter's
        _check(_job(str(out), name="other-lora"), tmp_path)


def test_an_unreadable_owner_record_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / OWNER_RECORD).write_text("{not json")
    with pytest.raises(ConfigError, match=f"{OWNER_RECORD} is not a kubetune owner record"):
        _check(_job(str(tmp_path / "out")), tmp_path)


@pytest.mark.parametrize("content", [b"\xff\xfe{\x80 not utf-8", ("[" * 200_000).encode()],
                         ids=["not-utf8", "nested-past-the-parser"])
def test_an_owner_record_that_cannot_be_read_stops_the_job_naming_the_file_and_the_fix(tmp_path: Path,
                                                                                        content: bytes) -> None:
    out = _owned_prefix(tmp_path, _job(str(tmp_path / "out")))
    (out / OWNER_RECORD).write_bytes(content)
    before = _contents(out)
    job = _job(str(out))
    for attempt in (lambda: _check(job, tmp_path), _claim(job, tmp_path).confirm):
        with pytest.raises(ConfigError) as refused:  # 78: no proof of another owner, nor safe to overwrite
            attempt()
        assert f"{out}/{OWNER_RECORD} is not a kubetune owner record" in str(refused.value)
        assert f"delete {out}/{OWNER_RECORD} if {out}/ is this job's output" in str(refused.value)
    assert _contents(out) == before


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", ("[" * 200_000).encode()],
                         ids=["not-utf8", "nested-past-the-parser"])
def test_a_manifest_that_cannot_be_read_is_left_to_the_checkpointer(tmp_path: Path, content: bytes) -> None:
    job = _job(str(tmp_path / "out"))
    out = _owned_prefix(tmp_path, job, checkpoints=(4, 6))
    (out / "checkpoints" / "step-6" / MANIFEST).write_bytes(content)
    assert _check(job, tmp_path) is None  # the survey skips it: damage, not a crash
    claim = _claim(job, tmp_path)
    ckpt = Checkpointer(claim.store, job.spec.output, tmp_path / "scratch", claim)
    assert [ref.step for ref in ckpt.complete()] == [4] and "unreadable" in ckpt.damaged[6]


class _ReadTogether(LocalStore):
    """A local store whose first read of the owner record ends with the other job's: both find none."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__()
        self.barrier, self.waited = barrier, False

    def download(self, uri: str, path: Path) -> Any:
        if not uri.endswith(OWNER_RECORD) or self.waited:
            return super().download(uri, path)
        self.waited = True
        try:
            return super().download(uri, path)
        finally:  # the other job has read it too before this one goes on
            self.barrier.wait(timeout=30)


def race_to_confirm(claims: list[OutputClaim]) -> dict[str, str]:
    """Each claim's `confirm()` on its own thread: "ok" or the ConfigError's message, by job name."""
    outcome: dict[str, str] = {}

    def confirm(claim: OutputClaim) -> None:
        try:
            claim.confirm()
            outcome[claim.identity.name] = "ok"
        except ConfigError as exc:
            outcome[claim.identity.name] = str(exc)

    threads = [threading.Thread(target=confirm, args=(claim,)) for claim in claims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcome


def test_of_two_jobs_claiming_an_empty_prefix_together_exactly_one_proceeds(tmp_path: Path) -> None:
    barrier = threading.Barrier(2)
    jobs = [_job(str(tmp_path / "out"), name=name) for name in ("first-lora", "second-lora")]
    claims = [OutputClaim(_ReadTogether(barrier), job.spec.output.uri, JobIdentity.of(job), weight_fields(job.spec),
                          tmp_path / f"scratch-{job.metadata.name}") for job in jobs]
    outcome = race_to_confirm(claims)
    winner = json.loads((tmp_path / "out" / OWNER_RECORD).read_text())["owner"]["name"]
    loser = ({"first-lora", "second-lora"} - {winner}).pop()
    assert outcome[winner] == "ok"
    assert f"holds the output of job tests/{winner}" in outcome[loser]


class _RecordsProbeDeletes(LocalStore):
    """A local store noting, at each delete, whether the owner record was there."""

    def __init__(self, pvc_root: Path, record: Path) -> None:
        super().__init__(pvc_root)
        self.record, self.record_present_at_delete = record, []

    def delete(self, uri: str) -> None:
        self.record_present_at_delete.append(self.record.is_file())
        super().delete(uri)


def test_the_owner_record_is_written_before_the_write_probe_is_deleted(tmp_path: Path) -> None:
    (tmp_path / "pvc" / "claim").mkdir(parents=True)
    job = _job("pvc://claim/")
    store = _RecordsProbeDeletes(tmp_path / "pvc", tmp_path / "pvc" / "claim" / OWNER_RECORD)
    claim = OutputClaim(store, job.spec.output.uri, JobIdentity.of(job), weight_fields(job.spec), tmp_path / "s")
    Checkpointer(store, job.spec.output, tmp_path / "s", claim).check_writable()
    assert store.record_present_at_delete == [True]  # so the delete never empties (or removes) the claim's root
    assert sorted(p.name for p in (tmp_path / "pvc" / "claim").iterdir()) == [OWNER_RECORD]


def test_a_job_started_beside_this_one_is_found_before_either_overwrites_the_other(tmp_path: Path) -> None:
    mine, theirs = _job(str(tmp_path / "out")), _job(str(tmp_path / "out"), name="other-lora")
    assert _check(mine, tmp_path) is None and _check(theirs, tmp_path) is None  # both start on an empty prefix
    _owned_prefix(tmp_path, theirs)  # the other one writes first
    claim = _claim(mine, tmp_path)
    ckpt = Checkpointer(claim.store, mine.spec.output, tmp_path / "scratch", claim)
    before = _contents(tmp_path / "out")
    with pytest.raises(ConfigError, match="tests/other-lora"):
        ckpt.check_writable()
    payload = tmp_path / "p.bin"
    payload.write_bytes(b"mine")
    with pytest.raises(ConfigError, match="tests/other-lora"):
        ckpt.save(2, {"w.bin": payload})
    assert _contents(tmp_path / "out") == before
    assert ckpt.complete() == []  # their checkpoints are never offered to this job


def _record(steps: list[int]) -> Any:
    return lambda trainer: steps.append(trainer.step)


def _crash_after(step: int) -> Any:
    def hook(trainer: Any) -> None:
        if trainer.step == step:
            raise RuntimeError(f"killed after step {step}")

    return hook


def test_runs_another_job_refused_untouched_the_same_job_resumes(tiny_sd: Path, squares: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = _job(str(out), model=str(tiny_sd), data=str(squares), training={"maxSteps": 6})
    crashed = run_job(job, RuntimeConfig(scratch=tmp_path / "s1", log_every=0), hooks=[_crash_after(4)])
    assert crashed.exit_code == EXIT_FAILED and [c["step"] for c in crashed.progress["checkpoints"]] == [2, 4]
    before = _contents(out)
    for other in (_job(str(out), name="other-lora", model=str(tiny_sd), data=str(squares)),
                  _job(str(out), model=str(tiny_sd), data=str(squares), training={"learningRate": 5e-4})):
        trained: list[int] = []
        refused = run_job(other, RuntimeConfig(scratch=tmp_path / "s2", log_every=0), hooks=[_record(trained)])
        assert (refused.exit_code, refused.phase, trained) == (EXIT_CONFIG, "Failed", [])
        assert f"{out}/ holds the output of" in refused.message and "tests/test-lora" in refused.message
        assert _contents(out) == before
    steps: list[int] = []
    resumed = run_job(job, RuntimeConfig(scratch=tmp_path / "s3", log_every=0), hooks=[_record(steps)])
    assert resumed.exit_code == 0 and steps == [5, 6], resumed.message
