"""HTTP servers on loopback that play rank 0's `/progress`, well or as a hostile image might:
slowly, with a redirect, too much, or not at all. Each counts the requests it got."""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Rank0(ThreadingHTTPServer):
    """A loopback server whose every GET is answered by `answer(handler)`; it counts requests."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], answer: Callable[[BaseHTTPRequestHandler], None]) -> None:
        super().__init__(address, _Handler)
        self.answer = answer
        self.requests: list[str] = []
        self.hung_up = threading.Event()
        self.stopping = threading.Event()

    @property
    def ip(self) -> str:
        return self.server_address[0]

    @property
    def port(self) -> int:
        return self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server: Rank0

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        try:
            self.server.answer(self)
        except (BrokenPipeError, ConnectionResetError):
            self.server.hung_up.set()

    def log_message(self, format: str, *args: object) -> None:
        return


def reply(body: bytes, status: int = 200, headers: dict[str, str] | None = None,
          length: bool = True) -> Callable[[BaseHTTPRequestHandler], None]:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        if length:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return answer


def drip(seconds: float) -> Callable[[BaseHTTPRequestHandler], None]:
    """One byte every `seconds` from the very first, never finishing (a per-read timeout never fires)."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        server: Rank0 = handler.server  # type: ignore[assignment]
        for byte in itertools.chain(b"HTTP/1.0 200 OK\r\nX-Drip: ", itertools.repeat(ord("a"))):
            if server.stopping.wait(seconds):
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
    return answer


def endless_body(handler: BaseHTTPRequestHandler) -> None:
    """200 with no Content-Length and a body that never ends, sent as fast as it goes."""
    handler.send_response(200)
    handler.end_headers()
    server: Rank0 = handler.server  # type: ignore[assignment]
    while not server.stopping.is_set():
        handler.wfile.write(b" " * 65536)


def silent(handler: BaseHTTPRequestHandler) -> None:
    handler.server.stopping.wait(30)  # type: ignore[attr-defined]


@contextlib.contextmanager
def rank0_servers() -> Iterator[Callable[..., Rank0]]:
    """`serve(answer, port=0)`: a Rank0 on 127.0.0.1, or with `port`, on a loopback address of its own
    (127.64-250.x.y: not one `podrunner` hands out), so that many pods share the operator's one port."""
    servers: list[Rank0] = []

    def start(answer: Callable[[BaseHTTPRequestHandler], None], port: int = 0) -> Rank0:
        for attempt in range(20):
            ip = "127.0.0.1" if not port else ".".join(["127", *(str(random.randint(64, 250)) for _ in range(3))])
            try:
                server = Rank0((ip, port), answer)
                break
            except OSError:
                if attempt == 19:
                    raise
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stopping.set()
            server.shutdown()
            server.server_close()
