"""`kubetune run` and `kubetune train` on bad input: a non-zero exit code and one line naming the cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from trainer_support import free_port, job_document

from kubetune.cli import main
from kubetune_trainer.exitcodes import EXIT_CONFIG, EXIT_STORAGE_UNAVAILABLE


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _run(tmp_path: Path, doc: dict, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, dict]:
    status = tmp_path / "status.json"
    code = main(["run", str(_write(tmp_path, doc)), "--status-file", str(status), "--no-progress",
                 "--scratch", str(tmp_path / "scratch")])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1], json.loads(status.read_text())


def test_missing_dataset_folder(tmp_path: Path, tiny_sd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = job_document(str(tiny_sd), str(tmp_path / "no-such-data"), str(tmp_path / "out"))
    code, line, status = _run(tmp_path, doc, capsys)
    assert code == EXIT_CONFIG
    assert "no-such-data" in line and "does not exist" in line
    assert status["phase"] == "Failed" and status["reason"] == "InvalidConfiguration"


def test_empty_dataset(tmp_path: Path, tiny_sd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    doc = job_document(str(tiny_sd), str(tmp_path / "empty"), str(tmp_path / "out"))
    code, line, _ = _run(tmp_path, doc, capsys)
    assert code == EXIT_CONFIG
    assert "data.uri" in line and "nothing to stage: no objects under" in line  # the preflight, before any model byte


def test_unreadable_model_folder(tmp_path: Path, squares: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{ not json")
    doc = job_document(str(model), str(squares), str(tmp_path / "out"))
    code, line, _ = _run(tmp_path, doc, capsys)
    assert code == EXIT_CONFIG
    assert "no readable model_index.json" in line and str(model) in line


def test_model_folder_missing_a_component(tmp_path: Path, squares: Path, tiny_sd: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text((tiny_sd / "model_index.json").read_text())
    code, line, _ = _run(tmp_path, job_document(str(model), str(squares), str(tmp_path / "out")), capsys)
    assert code == EXIT_CONFIG
    assert "cannot load unet from model folder" in line


def test_unreachable_endpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:

    endpoint = f"http://127.0.0.1:{free_port()}"
    doc = job_document("s3://models/sd/", "s3://data/set/", "s3://out/x/",
                       storage={"endpoint": endpoint, "addressingStyle": "path"})
    code, line, _ = _run(tmp_path, doc, capsys)
    assert code == EXIT_STORAGE_UNAVAILABLE
    assert f"cannot reach S3 endpoint {endpoint}" in line
    assert "kubetune-test-secret" not in line


def test_invalid_spec_is_rejected_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = job_document("s3://models/sd/", "s3://data/set/", "s3://out/x/", training={"maxSteps": 0})
    code = main(["run", str(_write(tmp_path, doc))])
    assert code == EXIT_CONFIG
    assert "spec.training.maxSteps" in capsys.readouterr().err


def test_train_writes_the_termination_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = job_document("/local/path", "s3://data/set/", "s3://out/x/")
    termination = tmp_path / "termination-log"
    code = main(["train", "--config", str(_write(tmp_path, doc)), "--termination-log", str(termination),
                 "--scratch", str(tmp_path / "scratch"), "--port", "0"])
    assert code == EXIT_CONFIG
    message = json.loads(termination.read_text())
    assert message["phase"] == "Failed" and "spec.model.uri" in message["message"]
    assert len(termination.read_bytes()) <= 4096
