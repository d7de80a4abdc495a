"""An S3-compatible server on loopback (moto's standalone server) for the demo and the tests.

It speaks real HTTP on 127.0.0.1 at a free port, so the code under test uses boto3 exactly
as it would against MinIO or AWS; nothing is patched. Contents live in memory.
`LoopbackS3Process` runs the same server in a child process, for benchmarks whose clients
must not share the server's interpreter lock.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

DEMO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetune-demo", "AWS_SECRET_ACCESS_KEY": "kubetune-demo-secret"}


class LoopbackS3:
    """Start with `start()`, read `endpoint`, stop with `stop()`; also a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
        self.endpoint = ""

    def start(self) -> LoopbackS3:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> LoopbackS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            config=Config(max_pool_connections=32),
                            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
                            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"))

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> int:
        """Upload every file under `folder` to s3://bucket/prefix/...; return the count."""
        client, count = self.client(), 0
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix.strip('/')}/{path.relative_to(folder).as_posix()}")
            count += 1
        return count


class LoopbackS3Process(LoopbackS3):
    """The same server as `LoopbackS3`, run by `python -m moto.server` in a child process."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port or _free_port(host)
        self.endpoint = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LoopbackS3Process:
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                self.endpoint = f"http://{self.host}:{self.port}"
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not start on {self.host}:{self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
