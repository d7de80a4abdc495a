"""The operator's HTTP endpoint: `/metrics` for Prometheus, `/healthz` and `/readyz` for the kubelet.

Served from a thread of its own, so a standby replica waiting for the Lease is alive
(healthz) but not ready (readyz) and is not restarted for waiting. `/healthz` fails (503,
saying why) when the reconcile workers are stuck (`liveness.stuck_reason`), so the kubelet
restarts an operator that answers HTTP but no longer reconciles.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def _handler(registry: CollectorRegistry, ready: Callable[[], bool],
             stuck: Callable[[], str | None]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                reason = stuck()
                self._reply(503 if reason else 200, f"stuck: {reason}\n".encode() if reason else b"ok\n")
            elif path == "/readyz":
                is_ready = ready()
                self._reply(200 if is_ready else 503, b"ready\n" if is_ready else b"standby\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: stay quiet
            return

    return Handler


def serve_probes(registry: CollectorRegistry, port: int, ready: Callable[[], bool],
                 host: str = "0.0.0.0", stuck: Callable[[], str | None] = lambda: None) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; `shutdown()` then `server_close()` stop it.

    `stuck` says why the operator should be restarted (None: it is alive).
    """
    server = ThreadingHTTPServer((host, port), _handler(registry, ready, stuck))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="kubetune-probes", daemon=True).start()
    return server
