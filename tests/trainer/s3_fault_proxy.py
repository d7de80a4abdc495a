"""A fault-injecting HTTP proxy on loopback, in front of the loopback S3 server, for staging tests.

Clients talk to `S3FaultProxy.endpoint` exactly as to S3; each request is forwarded to the
server and its answer passed back, except where a fault is injected:

- `error500`: an S3 `InternalError` (500) instead of the answer;
- `slowdown503`: an S3 `SlowDown` (503) instead of the answer;
- `delay`: the answer, after `delay_s` seconds without a byte (a slow first byte);
- `reset`: the headers and part of an object's body, then a TCP reset;
- `truncate`: the headers and part of an object's body, then a clean close (FIN);
- `flip`: the whole answer, right length and headers, one bit of one body byte flipped.

The three body faults apply to object GETs that answer with a body; the others to any request.
Each kind fires at its own rate, at most one fault per request. Whether a request gets a fault
is decided from the seed, the request (method, path, query, Range) and how many times that same
request came before, never from the order threads arrive in: a seeded run injects the same
faults at the same requests. `script()` queues faults for the next GETs of one key, for tests
that need one fault exactly there. Every request is logged (`seen`), so a test can tell, say,
that no model object was fetched.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

STATUS_FAULTS = {"error500": (500, "InternalError", "We encountered an internal error. Please try again."),
                 "slowdown503": (503, "SlowDown", "Please reduce your request rate.")}
BODY_FAULTS = ("reset", "truncate", "flip")
KINDS = ("error500", "slowdown503", "delay", *BODY_FAULTS)
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass(frozen=True)
class Seen:
    """One request through the proxy: what was asked, what came back, which fault (if any)."""

    method: str
    bucket: str
    key: str
    query: str
    range: str
    status: int
    fault: str


@dataclass
class S3FaultProxy:
    """Start with `start()` (or `with`), point clients at `endpoint`, read `seen`, stop with `stop()`."""

    upstream: str
    rates: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    delay_s: float = 0.3
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        self._lock = threading.Lock()
        self._asked: Counter[tuple[str, ...]] = Counter()
        self._scripted: dict[str, list[str]] = {}
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> S3FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy._handle(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- what tests ask --------------------------------------------------------------------
    def script(self, fault: str, key: str, times: int = 1) -> None:
        """Inject `fault` into the next `times` GETs of object `key` (whatever the rates say)."""
        if fault not in KINDS:
            raise ValueError(f"unknown fault {fault!r}; known: {KINDS}")
        with self._lock:
            self._scripted.setdefault(key, []).extend([fault] * times)

    def object_gets(self, key_prefix: str = "") -> list[Seen]:
        """The object GETs (not listings) whose key starts with `key_prefix`."""
        with self._lock:
            return [s for s in self.seen if s.method == "GET" and s.key and s.key.startswith(key_prefix)]

    def faults(self) -> Counter[str]:
        """How many of each fault were injected."""
        with self._lock:
            return Counter(s.fault for s in self.seen if s.fault)

    # -- the proxy -------------------------------------------------------------------------
    def _decide(self, method: str, key: str, query: str, range_: str) -> tuple[str, random.Random]:
        """The fault for this request ("" for none): scripted first, then each kind at its rate; and
        a generator seeded by this request, for where in the body a fault strikes."""
        request = (method, key, query, range_)
        with self._lock:
            self._asked[request] += 1
            nth = self._asked[request]
            scripted = self._scripted.get(key) if method == "GET" else None
            fault = scripted.pop(0) if scripted else ""
        seeded = f"{self.seed}|{'|'.join(request)}|{nth}"
        for kind in KINDS:
            rate = self.rates.get(kind, 0.0)
            if fault or (kind in BODY_FAULTS and not (method == "GET" and key)):
                continue
            if rate and random.Random(f"{seeded}|{kind}").random() < rate:
                fault = kind
        return fault, random.Random(f"{seeded}|where")

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        split = urlsplit(handler.path)
        bucket, _, key = unquote(split.path).lstrip("/").partition("/")
        range_ = handler.headers.get("Range", "")
        body = _read_request_body(handler)
        fault, where = self._decide(handler.command, key, _unsigned(split.query), range_)
        if fault in STATUS_FAULTS:
            status = _send_error(handler, *STATUS_FAULTS[fault])
        else:
            status, headers, answer = self._forward(handler, body)
            if fault == "delay":
                time.sleep(self.delay_s)
            if fault in BODY_FAULTS and not (answer and status < 300):
                fault = ""  # nothing to break: an error answer or an empty body
            _send_answer(handler, status, headers, answer, fault, where)
        with self._lock:
            self.seen.append(Seen(handler.command, bucket, key, split.query, range_, status, fault))

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send the request on to the server on this thread's kept-alive connection; its whole answer."""
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or handler.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in (1, 2):
            connection = self._connection(fresh=attempt == 2)
            try:
                connection.request(handler.command, handler.path, body=body or None, headers=headers)
                response = connection.getresponse()
                answer = response.read()
                return response.status, response.getheaders(), answer
            except (http.client.HTTPException, OSError):
                connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _connection(self, fresh: bool) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None or fresh:
            upstream = urlsplit(self.upstream)
            connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=120)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection


def _unsigned(query: str) -> str:
    """The query without a presigned URL's signature, date and credential, which change every time."""
    signed = ("x-amz-", "signature=", "expires=", "awsaccesskeyid=")
    return "&".join(sorted(p for p in query.split("&") if p and not p.lower().startswith(signed)))


def _read_request_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request's body, whether sent with a Content-Length or chunked."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if not size:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _send_error(handler: BaseHTTPRequestHandler, status: int, code: str, message: str) -> int:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>fault-proxy</RequestId></Error>").encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/xml")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)
    return status


def _send_answer(handler: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], body: bytes,
                 fault: str, rng: random.Random) -> None:
    """Pass the server's answer on, broken as `fault` says."""
    handler.send_response_only(status)
    for name, value in headers:
        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
            handler.send_header(name, value)
    length = next((v for k, v in headers if k.lower() == "content-length"), str(len(body)))
    handler.send_header("Content-Length", length if handler.command == "HEAD" else str(len(body)))
    handler.end_headers()
    if handler.command == "HEAD":
        return
    if fault == "flip":
        broken = bytearray(body)
        broken[rng.randrange(len(broken))] ^= 1 << rng.randrange(8)
        body = bytes(broken)
    elif fault in ("reset", "truncate"):
        handler.wfile.write(body[:rng.randrange(len(body))])
        handler.wfile.flush()
        handler.close_connection = True
        if fault == "reset":  # linger 0: close sends RST, not FIN
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()
        else:
            handler.connection.shutdown(socket.SHUT_WR)
        return
    handler.wfile.write(body)
