"""A production S3 server on loopback for the tests and benchmarks: SeaweedFS's `weed mini`.

`weed mini` runs a master, a volume server, a filer and the S3 gateway in one process. Every
port it would open is given (ten free ports on 127.0.0.1), so two test sessions never clash
and nothing listens beyond loopback; telemetry is off; one identity with the test keys is the
only one the gateway accepts; SSE-KMS works (a local key service, keys made on demand); and,
as on S3, a write to a missing bucket fails instead of creating it. The binary is built from ``seaweedfs/go.mod`` by
:mod:`clusterbuild` (``make cluster-build``, before pytest starts).

`SeaweedS3` has the interface of the demo's moto server (`endpoint`, `client()`,
`create_bucket`, `upload_folder`), so one suite runs against either.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import clusterbuild
from clusterprocess import free_port, start_server, stop_server

from kubetune_demo.loopback_s3 import LoopbackS3

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetune-test", "AWS_SECRET_ACCESS_KEY": "kubetune-test-secret"}
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")
READY_SECONDS = 60.0
STOP_SECONDS = 15.0


class ServerExited(RuntimeError):
    """The server died before it answered; its log tail is the message."""


class SeaweedS3(LoopbackS3):
    """Start with `start()`, read `endpoint`, stop with `stop()`; also a context manager."""

    name = "seaweedfs"

    def __init__(self, credentials: dict[str, str] | None = None) -> None:
        super().__init__()
        self.credentials = credentials or CREDENTIALS
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.home: Path | None = None

    def command(self, binary: Path, home: Path) -> list[str]:
        ports = [f"-{flag}={port}" for flag, port in self.ports.items()]
        return [str(binary), "mini", f"-dir={home / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *ports,
                "-admin.port.legacy=0", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-webdav=false", "-master.telemetry=false", f"-s3.config={home / 's3.json'}",
                "-s3.autoCreateBucket=false",  # as S3: a write to a missing bucket is NoSuchBucket, not a new bucket
                f"-filer.localSocket={home / 'filer.sock'}", f"-s3.localSocket={home / 's3.sock'}"]

    def start(self) -> SeaweedS3:
        binary = clusterbuild.ensure_server(clusterbuild.SEAWEEDFS)
        self.home = Path(tempfile.mkdtemp(prefix="kubetune-seaweedfs-"))
        (self.home / "data").mkdir()
        identity = {"name": "kubetune", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    "credentials": [{"accessKey": self.credentials["AWS_ACCESS_KEY_ID"],
                                     "secretKey": self.credentials["AWS_SECRET_ACCESS_KEY"]}]}
        kms = {"default_provider": "local", "providers": {"local": {"type": "local", "enableOnDemandCreate": True}}}
        (self.home / "s3.json").write_text(json.dumps({"identities": [identity], "kms": kms}))  # kms: for SSE-KMS
        self.ports = {flag: free_port() for flag in PORT_FLAGS}
        self.process = start_server(self.command(binary, self.home), self.home / "weed.log", cwd=self.home)
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """The gateway answers once the filer and a volume are up: an anonymous request gets 403."""
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerExited(f"weed mini exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # an S3 error answer: it is serving
            except OSError:
                time.sleep(0.2)
        raise ServerExited(f"weed mini did not answer on {self.endpoint} within {READY_SECONDS:.0f}s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.home / "weed.log").read_text(errors="replace").splitlines()[-lines:])  # type: ignore[operator]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is not None:
            stop_server(self.process, STOP_SECONDS)
            self.process = None
        for port in self.ports.values():  # its parts' gRPC sockets are fixed paths under /tmp, named by port
            for socket_file in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                socket_file.unlink(missing_ok=True)
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None

    def __enter__(self) -> SeaweedS3:
        return self.start()
