"""Fixtures for the trainer tests: tiny models, synthetic datasets, job documents, loopback S3.

The S3 server is moto's standalone server on 127.0.0.1 (real HTTP); tests never patch
boto3. Models are random-weight diffusers folders built once per session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from trainer_support import free_port, job_document

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetune-test", "AWS_SECRET_ACCESS_KEY": "kubetune-test-secret",
                    "AWS_MAX_ATTEMPTS": "2"}


@pytest.fixture(scope="session", autouse=True)
def _offline_and_fake_credentials() -> Iterator[None]:
    """No test may reach a real account or hub: fake keys and offline hub for the whole session."""
    saved = {k: os.environ.get(k) for k in [*TEST_CREDENTIALS, "AWS_SESSION_TOKEN", "HF_HUB_OFFLINE"]}
    os.environ.update(TEST_CREDENTIALS)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one process-wide state that refuses a second `mixed_precision`; a trainer pod runs
    one job per process, this session many, so a test about float32 may follow ones at the default bf16."""
    state = sys.modules.get("accelerate.state")  # nothing to reset before the first run imports it
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
    yield


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_demo.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"), family="sd")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_demo.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), family="sdxl")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_demo.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd3"), family="sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_demo.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux"), family="flux")


@pytest.fixture(scope="session")
def squares(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six captioned synthetic images in the imagefolder layout."""
    from kubetune_demo.tiny import build_image_dataset

    return build_image_dataset(tmp_path_factory.mktemp("squares"), count=6, size=72)


@pytest.fixture
def make_job() -> Callable[..., Any]:
    """Build a validated FineTuneJob (local mode) from `job_document` arguments."""
    from kubetune.api.validation import validate_document

    def build(*args: Any, **kwargs: Any) -> Any:
        result = validate_document(job_document(*args, **kwargs), mode="local")
        assert result.job is not None, result.problems
        return result.job

    return build


@pytest.fixture
def runtime(tmp_path: Path) -> Any:
    from kubetune_trainer.config import RuntimeConfig

    return RuntimeConfig(scratch=tmp_path / "scratch", status_file=tmp_path / "status.json", log_every=0)


S3_SERVERS = ("moto", "seaweedfs")
"""The S3 suite runs against both: moto's server (a mock, in this interpreter) and SeaweedFS's S3 gateway
(a production server, built from its Go module; `s3_servers`)."""
FULL_FAULT_SERVERS = tuple(os.environ.get("KUBETUNE_FULL_FAULT_SERVERS", "seaweedfs").split(","))
"""The servers the whole fault suite runs against (a thousand objects, a training run); the others get its
smoke subset. `KUBETUNE_FULL_FAULT_SERVERS=moto,seaweedfs` runs it against both."""


@pytest.fixture(scope="session")
def s3_servers() -> Iterator[Callable[[str], Any]]:
    """Each kind of S3 server on loopback, started on first use and kept for the whole session."""
    import contextlib
    import logging

    from s3_servers import SeaweedS3

    from kubetune_demo.loopback_s3 import LoopbackS3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    started: dict[str, Any] = {}
    with contextlib.ExitStack() as running:
        def server(kind: str) -> Any:
            if kind not in started:
                started[kind] = running.enter_context(LoopbackS3() if kind == "moto" else SeaweedS3(TEST_CREDENTIALS))
                started[kind].kind = kind
            return started[kind]

        yield server


@pytest.fixture(scope="session", params=S3_SERVERS)
def s3_server(request: pytest.FixtureRequest, s3_servers: Callable[[str], Any]) -> Any:
    """A real S3-compatible HTTP server on loopback, once per kind of server."""
    return s3_servers(request.param)


@pytest.fixture(scope="session", params=FULL_FAULT_SERVERS)
def full_fault_server(request: pytest.FixtureRequest, s3_servers: Callable[[str], Any]) -> Any:
    """A server the whole fault suite runs against (`FULL_FAULT_SERVERS`)."""
    return s3_servers(request.param)


@pytest.fixture
def s3_bucket(s3_server: Any) -> str:
    """A fresh, empty bucket on the loopback server."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def full_fault_bucket(full_fault_server: Any) -> str:
    """A fresh, empty bucket on a server the whole fault suite runs against."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    full_fault_server.create_bucket(name)
    return name


@pytest.fixture
def auth_s3_server() -> Iterator[str]:
    """A moto server that checks credentials (no IAM users exist, so every key is rejected)."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)
