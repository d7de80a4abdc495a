"""What the end-to-end tests share: one S3 server on loopback (moto, in its own process) holding
the tiny SD 1.x model and a small image set, the S3 credentials Secret, and readers for what the
trainer wrote there."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from kubetune.api import uris

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "e2e-key", "AWS_SECRET_ACCESS_KEY": "e2e-secret-value"}
SECRET_NAME = "s3-credentials"
MODEL_URI = "s3://models/tiny-sd/"
DATA_URI = "s3://datasets/squares/"


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """moto's server with the tiny model under MODEL_URI and 8 images of 64² under DATA_URI."""
    from kubetune_demo.loopback_s3 import LoopbackS3Process
    from kubetune_demo.tiny import build_image_dataset, build_tiny_pipeline

    work = tmp_path_factory.mktemp("e2e-s3")
    server = LoopbackS3Process().start()
    try:
        for bucket in ("models", "datasets", "outputs"):
            server.create_bucket(bucket)
        server.upload_folder(build_tiny_pipeline(work / "model"), "models", "tiny-sd")
        server.upload_folder(build_image_dataset(work / "data", count=8, size=64), "datasets", "squares")
        yield server
    finally:
        server.stop()


def create_credentials(api: client.ApiClient, namespace: str) -> None:
    client.CoreV1Api(api).create_namespaced_secret(namespace, {
        "metadata": {"name": SECRET_NAME}, "stringData": CREDENTIALS})


def keys_under(s3: Any, uri: str) -> list[str]:
    """Object keys under an s3:// folder URI."""
    parsed = uris.parse_uri(uri)
    prefix = parsed.path.strip("/") + "/"
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=parsed.location, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def read_object(s3: Any, uri: str) -> bytes:
    parsed = uris.parse_uri(uri)
    return s3.client().get_object(Bucket=parsed.location, Key=parsed.path.strip("/"))["Body"].read()


def complete_checkpoints(s3: Any, output_uri: str) -> list[int]:
    """Steps of the complete checkpoints under an output URI (those whose manifest, written last, exists)."""
    steps = []
    for key in keys_under(s3, output_uri.rstrip("/") + "/checkpoints/"):
        folder, _, name = key.rpartition("/")
        if name == "manifest.json" and folder.rpartition("/")[2].startswith("step-"):
            steps.append(int(folder.rpartition("step-")[2]))
    return sorted(steps)
