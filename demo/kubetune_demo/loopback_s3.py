"""An S3-compatible server on loopback (moto's standalone server) for the demo and the tests.

It speaks real HTTP on 127.0.0.1 at a free port, so the code under test uses boto3 exactly
as it would against MinIO or AWS; nothing is patched. Contents live in memory.
`LoopbackS3Process` runs the same server in a child process, for benchmarks whose clients
must not share the server's interpreter lock.

Unlike `moto_server`, it keeps connections open between requests (HTTP/1.1 keep-alive), as
S3 does: werkzeug's development server closes every connection because Python's
http.server does not drain an unread request body, so this one drains it itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

DEMO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetune-demo", "AWS_SECRET_ACCESS_KEY": "kubetune-demo-secret"}
IDLE_TIMEOUT_S = 60  # a kept-alive connection with no request for this long is closed


class _NothingMore:
    """Stands in for the connection's input while moto's app answers: werkzeug's handler then
    reads whatever the client sent after the request, assuming the connection will close, and
    on a kept-alive connection that would eat the next request."""

    def read(self, size: int = -1) -> bytes:
        return b""


def _keep_alive_handler() -> type:
    """moto's request handler, answering in HTTP/1.1 without closing the connection after each answer."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.wsgi import LimitedStream

    class KeepAliveHandler(MotoRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = IDLE_TIMEOUT_S
        body: Any = None

        def make_environ(self) -> dict[str, Any]:
            environ = super().make_environ()
            if not environ.get("wsgi.input_terminated"):  # a chunked body cannot be drained here: close
                self.body = LimitedStream(self.rfile, int(environ.get("CONTENT_LENGTH") or 0))
                environ["wsgi.input"] = self.body
                self.connection_input, self.rfile = self.rfile, _NothingMore()
            return environ

        def send_header(self, keyword: str, value: str) -> None:
            if keyword.lower() == "connection" and value.lower() == "close" and self.body is not None:
                return  # werkzeug's blanket "close"; a client's own "Connection: close" is still honoured
            super().send_header(keyword, value)

        def run_wsgi(self) -> None:
            self.body = None
            try:
                super().run_wsgi()
            except BaseException:
                self.close_connection = True
                raise
            finally:
                if self.body is not None:
                    self.rfile = self.connection_input
            if self.body is None:
                self.close_connection = True
            else:
                self.body.exhaust()  # what the app left unread must not be taken for the next request

    return KeepAliveHandler


def make_server(host: str, port: int) -> Any:
    """A threaded werkzeug server running moto's app with keep-alive connections."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server as werkzeug_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    return werkzeug_server(host, port, DomainDispatcherApplication(create_backend_app), threaded=True,
                           request_handler=_keep_alive_handler())


class LoopbackS3:
    """Start with `start()`, read `endpoint`, stop with `stop()`; also a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.endpoint = ""

    def start(self) -> LoopbackS3:
        self.server = make_server(self.host, self.port)
        self.thread = threading.Thread(target=self.server.serve_forever, name="loopback-s3", daemon=True)
        self.thread.start()
        host, port = self.server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.thread is not None:
            self.thread.join()
            self.thread = None

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
    """The same server as `LoopbackS3`, run by `python -m kubetune_demo.loopback_s3` in a child process."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port or _free_port(host)
        self.endpoint = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LoopbackS3Process:
        command = [sys.executable, "-m", "kubetune_demo.loopback_s3", "--host", self.host, "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moto's S3 server on loopback, with keep-alive connections")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    make_server(args.host, args.port).serve_forever()


if __name__ == "__main__":
    main()
