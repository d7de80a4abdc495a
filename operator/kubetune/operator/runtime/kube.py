"""A thin JSON client for the Kubernetes API, on top of the official client's connection setup.

It reads and writes plain API-server JSON (the camelCase dicts the pure functions are tested with), not generated
model classes, so nothing is renamed or dropped between what `render_*` builds and what the API server receives.
"""

from __future__ import annotations

import contextlib
import copy
import json
import urllib.parse
from typing import Any

import urllib3
from kubernetes import client, config

from kubetune.api.resource import GROUP, PLURAL, VERSION

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
TIMEOUT = urllib3.Timeout(total=30.0)  # a whole request
RETRIES = urllib3.Retry(total=3, redirect=0, status=0, raise_on_status=False)
"""As the official client's pool had: a dropped idle connection is retried (a read error only for
idempotent methods), so one blip does not cost a pass its 10 s retry delay or an event."""
POOL_CONNECTIONS = 128
"""Kept-alive connections for 64 passes and their creates at once: at 32, a burst had urllib3 log
"Connection pool is full, discarding connection" and open new TLS connections."""
API_PREFIXES = dict.fromkeys(("Pod", "ConfigMap", "Service", "Secret", "Event"), "/api/v1") | {
    "FineTuneJob": f"/apis/{GROUP}/{VERSION}", "Job": "/apis/batch/v1", "Lease": "/apis/coordination.k8s.io/v1"}


def collection_path(kind: str, namespace: str | None) -> str:
    """Where a kind's objects are listed and created: in one namespace, or (None) cluster-wide."""
    prefix, plural = API_PREFIXES[kind], PLURAL if kind == "FineTuneJob" else f"{kind.lower()}s"
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"


def object_path(kind: str, namespace: str, name: str) -> str:
    return f"{collection_path(kind, namespace)}/{name}"


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status, self.reason, self.message = status, reason, message
        self.not_found, self.forbidden, self.conflict = status == 404, status == 403, status == 409
        """`conflict`: already exists (on create) or a stale resourceVersion (on update)."""


def load_configuration(kubeconfig: str | None = None) -> client.Configuration:
    """In-cluster credentials when running in a pod, else the kubeconfig (or `kubeconfig`)."""
    configuration = client.Configuration()
    if kubeconfig is None:
        with contextlib.suppress(config.ConfigException):  # not in a pod
            config.load_incluster_config(client_configuration=configuration)
            return configuration
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return configuration


class KubeApi:
    """GET/POST/PATCH/PUT/DELETE on API paths, with JSON in and out. The official client sets up the connection
    (TLS, client certificates, proxies, token refresh); requests go straight to its urllib3 pool, skipping the generated
    layer's per-request walk of the body, which at scale cost more CPU than the HTTP itself."""

    def __init__(self, configuration: client.Configuration) -> None:
        configuration = copy.deepcopy(configuration)
        configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 0, POOL_CONNECTIONS)
        self._client, self._configuration = client.ApiClient(configuration), configuration
        self._pool = self._client.rest_client.pool_manager

    def request(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None) -> Any:
        """The decoded response body; raises `ApiError` on any non-2xx status. A PATCH is a JSON merge patch."""
        url = self._configuration.host + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": JSON, "User-Agent": "kubetune-operator",
                   **({"Content-Type": MERGE_PATCH if method == "PATCH" else JSON} if payload else {})}
        for auth in self._configuration.auth_settings().values():  # a rotated token is read again
            if auth["in"] == "header" and auth["value"]:
                headers[auth["key"]] = auth["value"]
        try:
            response = self._pool.request(method, url, body=payload, headers=headers, timeout=TIMEOUT, retries=RETRIES)
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(0, "Unreachable", str(exc)) from exc
        if response.status >= 400:
            try:
                message = json.loads(response.data or b"{}").get("message", "")
            except (ValueError, AttributeError):
                message = (response.data or b"")[:200].decode("utf-8", "replace")
            raise ApiError(response.status, response.reason or "", message)
        return json.loads(response.data) if response.data else None

    def get(self, path: str, **query: str) -> Any:
        return self.request("GET", path, query=query or None)

    def get_or_none(self, path: str) -> Any:
        try:
            return self.get(path)
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def close(self) -> None:
        self._client.close()

