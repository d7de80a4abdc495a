"""The rank-0 HTTP endpoint: `/metrics` (Prometheus) and `/progress` (JSON) on one port.

The operator polls /progress to fill the FineTuneJob status; Prometheus scrapes /metrics.
Port 0 picks a free port; the chosen one is printed so a local user can find it.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kubetune_trainer.metrics import PrometheusMetrics
from kubetune_trainer.reporting import ProgressState

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StatusServer:
    """Serves a `ProgressState` and a `PrometheusMetrics` in a daemon thread."""

    def __init__(self, progress: ProgressState, metrics: PrometheusMetrics, port: int = 0,
                 host: str = "0.0.0.0") -> None:
        routes = {
            "/metrics": lambda: (METRICS_TYPE, metrics.exposition()),
            "/progress": lambda: ("application/json", json.dumps(progress.snapshot()).encode()),
            "/healthz": lambda: ("text/plain", b"ok"),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                content_type, body = route()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="status", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
