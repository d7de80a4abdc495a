"""The operator's liveness on the real control plane: `/healthz` fails while its reconcile passes
hang, and answers 200 again once they end.

What hangs them is the API server itself: a validating webhook (served here, on loopback)
holds every status write of the test namespace's FineTuneJobs until the test lets it go,
as an API server in trouble would hold the operator's requests.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fakegpu
import pytest
from cluster_support import TIMEOUT, RunningOperator, create, ftj, wait_phase
from kubernetes import client

pytestmark = pytest.mark.integration

STUCK_SECONDS = 3.0
WEBHOOK = "kubetune-test-hold-status"


class HoldingWebhook(ThreadingHTTPServer):
    """Admits every request, but only once `release` is set (or after 25 s, within the API server's 30)."""

    daemon_threads = True

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Admit)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.release = threading.Event()
        self.held = threading.Event()


class _Admit(BaseHTTPRequestHandler):
    server: HoldingWebhook

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.held.set()
        self.server.release.wait(25)
        body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                           "response": {"uid": review["request"]["uid"], "allowed": True}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "webhook.crt", folder / "webhook.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def holding_webhook(kube_admin: client.ApiClient, namespace: str, tmp_path: Path) -> Iterator[HoldingWebhook]:
    """A webhook on FineTuneJob status writes in the test namespace that holds each until released."""
    cert, key = _self_signed(tmp_path)
    server = HoldingWebhook(cert, key)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    admission = client.AdmissionregistrationV1Api(kube_admin)
    name = f"{WEBHOOK}-{namespace}"
    admission.create_validating_webhook_configuration({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "hold.status.kubetune.test",
            "clientConfig": {"url": f"https://127.0.0.1:{server.server_address[1]}/hold",
                             "caBundle": base64.b64encode(cert.read_bytes()).decode()},
            "rules": [{"apiGroups": ["kubetune.io"], "apiVersions": ["*"], "operations": ["UPDATE"],
                       "resources": ["finetunejobs/status"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "failurePolicy": "Ignore", "sideEffects": "None", "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 30,
        }],
    })
    try:
        yield server
    finally:
        server.release.set()
        admission.delete_validating_webhook_configuration(name)
        server.shutdown()
        server.server_close()


def healthz(operator: RunningOperator) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{operator.port}/healthz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_hung_reconcile_passes_fail_liveness_until_they_end(kube_admin, namespace, start_operator,
                                                            holding_webhook) -> None:
    operator = start_operator(stuck_pass_seconds=STUCK_SECONDS)
    fakegpu.wait_for(lambda: operator.get("/readyz")[0] == 200, timeout=TIMEOUT, what="the operator to lead")
    assert healthz(operator) == (200, "ok\n")
    create(kube_admin, ftj(namespace))
    assert holding_webhook.held.wait(TIMEOUT), "the operator's status write reached the webhook"
    code, body = fakegpu.wait_for(lambda: (r := healthz(operator))[0] != 200 and r, timeout=20,
                                  what="/healthz to fail while the pass hangs")
    assert code == 503 and f"the reconcile pass of {namespace}/corgi has run for" in body, body
    assert operator.get("/readyz")[0] == 200, "still the leader: only liveness fails"

    holding_webhook.release.set()
    fakegpu.wait_for(lambda: healthz(operator)[0] == 200, timeout=TIMEOUT, what="/healthz to recover")
    wait_phase(kube_admin, namespace, "Staging")
