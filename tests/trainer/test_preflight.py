"""The preflight: a job whose model, data or output URI cannot work fails in seconds, naming the field,
the URI and the fix, before any model byte is fetched.

The S3 jobs run against moto's server on loopback through `S3FaultProxy` (with no faults), whose
request log tells which objects were fetched. The local cases need no server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from s3_fault_proxy import S3FaultProxy
from trainer_support import free_port, local_job

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import EXIT_CONFIG, EXIT_STORAGE_UNAVAILABLE, ConfigError
from kubetune_trainer.job import run_job
from kubetune_trainer.preflight import PROBE_PREFIX, checks, preflight, preflight_inputs, preflight_output

DEADLINE_S = 10


def _storage(endpoint: str) -> dict[str, str]:
    return {"endpoint": endpoint, "addressingStyle": "path"}


@pytest.fixture
def uploaded(s3_server: Any, s3_bucket: str, tiny_sd: Path, squares: Path) -> str:
    s3_server.upload_folder(tiny_sd, s3_bucket, "model")
    s3_server.upload_folder(squares, s3_bucket, "data")
    return s3_bucket


@pytest.mark.integration
@pytest.mark.parametrize(("which", "field"), [("data", "data.uri"), ("output", "output.uri")])
def test_a_wrong_bucket_fails_in_seconds_before_any_model_object_is_fetched(
        s3_server: Any, uploaded: str, tmp_path: Path, which: str, field: str) -> None:
    uris = {"data": f"s3://{uploaded}/data/", "output": f"s3://{uploaded}/out/"}
    uris[which] = f"s3://no-such-{which}-bucket/{which}/"
    with S3FaultProxy(s3_server.endpoint) as proxy:
        job = local_job(f"s3://{uploaded}/model/", uris["data"], uris["output"], storage=_storage(proxy.endpoint))
        started = time.monotonic()
        result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
        seconds = time.monotonic() - started
        fetched = proxy.object_gets("model/")
    assert result.exit_code == EXIT_CONFIG and seconds < DEADLINE_S, (result.message, seconds)
    assert result.message.startswith(f"{field} {uris[which]}: S3 bucket 'no-such-{which}-bucket' does not exist")
    assert "create it or fix the URI" in result.message
    assert fetched == [], [g.key for g in fetched]


@pytest.mark.integration
def test_a_model_prefix_without_model_index_fails_naming_the_field(s3_server: Any, uploaded: str,
                                                                     tmp_path: Path) -> None:
    job = local_job(f"s3://{uploaded}/model/unet/", f"s3://{uploaded}/data/", f"s3://{uploaded}/out/",
                    storage=_storage(s3_server.endpoint))
    with pytest.raises(ConfigError, match=rf"^model\.uri s3://{uploaded}/model/unet/: no model_index\.json under"):
        preflight(job, RuntimeConfig(scratch=tmp_path / "s"))


@pytest.mark.integration
def test_an_empty_data_prefix_fails_and_the_output_probe_is_removed(s3_server: Any, uploaded: str,
                                                                     tmp_path: Path) -> None:
    runtime = RuntimeConfig(scratch=tmp_path / "s")
    good = local_job(f"s3://{uploaded}/model/", f"s3://{uploaded}/data/", f"s3://{uploaded}/out/",
                     storage=_storage(s3_server.endpoint))
    preflight(good, runtime)
    client = s3_server.client()
    assert "Contents" not in client.list_objects_v2(Bucket=uploaded, Prefix="out/")  # the probe is gone
    empty = local_job(f"s3://{uploaded}/model/", f"s3://{uploaded}/nothing/", f"s3://{uploaded}/out/",
                      storage=_storage(s3_server.endpoint))
    with pytest.raises(ConfigError, match=rf"^data\.uri s3://{uploaded}/nothing/: nothing to stage: no objects"):
        preflight(empty, runtime)


@pytest.mark.integration
def test_an_unreachable_endpoint_is_retryable(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    job = local_job("s3://models/sd/", "s3://data/set/", "s3://out/x/",
                    storage=_storage(f"http://127.0.0.1:{free_port()}"))
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0))
    assert result.exit_code == EXIT_STORAGE_UNAVAILABLE and "cannot reach S3 endpoint" in result.message


def test_a_local_model_folder_without_model_index_fails(tmp_path: Path, squares: Path) -> None:
    (tmp_path / "model").mkdir()
    job = local_job(str(tmp_path / "model"), str(squares), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"^model\.uri .*/model: no model_index\.json under") as raised:
        preflight(job, RuntimeConfig(scratch=tmp_path / "s"))
    assert raised.value.exit_code == EXIT_CONFIG


def test_a_pvc_data_folder_that_is_empty_fails(tmp_path: Path, tiny_sd: Path) -> None:
    (tmp_path / "pvc" / "claim" / "data").mkdir(parents=True)
    job = local_job(str(tiny_sd), "pvc://claim/data", str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"^data\.uri pvc://claim/data: nothing to stage"):
        preflight(job, RuntimeConfig(scratch=tmp_path / "s", pvc_root=tmp_path / "pvc"))


def test_local_uris_that_work_pass_and_leave_no_probe(tmp_path: Path, tiny_sd: Path, squares: Path) -> None:
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"))
    preflight(job, RuntimeConfig(scratch=tmp_path / "s"))
    assert not list(tmp_path.rglob(f"{PROBE_PREFIX}*"))


def test_hf_models_are_left_to_staging_and_class_data_is_checked(tmp_path: Path) -> None:
    job = local_job("hf://org/model", str(tmp_path / "data"), str(tmp_path / "out"),
                    method={"type": "dreambooth-lora", "dreambooth": {
                        "instancePrompt": "a sks dog", "classPrompt": "a dog", "priorPreservation": True,
                        "classDataUri": str(tmp_path / "class")}})
    assert [field for field, _, _ in checks(job)] == ["data.uri", "method.dreambooth.classDataUri", "output.uri"]
    assert json.dumps([uri for _, uri, _ in checks(job)]).count("hf://") == 0


def test_the_local_probe_leaves_an_empty_output_folder_and_its_parents_in_place(tmp_path: Path, tiny_sd: Path,
                                                                                 squares: Path) -> None:
    (tmp_path / "pvc" / "claim").mkdir(parents=True)
    job = local_job(str(tiny_sd), str(squares), "pvc://claim/out")
    preflight(job, RuntimeConfig(scratch=tmp_path / "s", pvc_root=tmp_path / "pvc"))
    assert (tmp_path / "pvc" / "claim" / "out").is_dir() and not any((tmp_path / "pvc" / "claim" / "out").iterdir())


def test_the_input_checks_write_nothing_and_the_output_probe_runs_on_its_own(tmp_path: Path, tiny_sd: Path,
                                                                             squares: Path) -> None:
    """The trainer runs the ownership survey between the two, so it never probes another job's prefix."""
    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"))
    preflight_inputs(job, RuntimeConfig(scratch=tmp_path / "s"))
    assert not (tmp_path / "out").exists()
    preflight_output(job, RuntimeConfig(scratch=tmp_path / "s"))
    assert (tmp_path / "out").is_dir() and not any((tmp_path / "out").iterdir())
