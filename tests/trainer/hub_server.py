"""A small Hugging Face Hub on loopback, for the hf:// staging tests (reached through HF_ENDPOINT).

It serves the endpoints huggingface_hub's `model_info` and `snapshot_download` use: repository
info at a revision, the recursive file tree, and `resolve` for each file (HEAD and GET with the
commit, ETag and size headers). A repository may require a token, refused the way the Hub
refuses a gated repository (401, X-Error-Code: GatedRepo). Every request is recorded with its
Authorization header, so tests can see which files were fetched and that the token was sent.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class HubRepo:
    files: dict[str, bytes]
    token: str | None = None
    """The token a request must carry; None for a public repository."""
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    fail_with: int | None = None
    """A status (429, 503, ...) every request for this repository is answered with, as a busy Hub does."""


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


@dataclass
class LoopbackHub:
    repos: dict[str, HubRepo]
    requests: list[Request] = field(default_factory=list)

    def __enter__(self) -> LoopbackHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._serve(self, body=True)

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fetched(self) -> set[str]:
        """Files whose content was downloaded (GET on resolve)."""
        return {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests
                if r.method == "GET" and "/resolve/" in r.path}

    def _serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append(Request(handler.command, path, handler.headers.get("Authorization")))
        route = self._route(path)
        if route is None:
            return _reply(handler, 404, {"X-Error-Code": "EntryNotFound"}, b'{"error": "not found"}', body)
        repo, kind, rest = route
        if repo.fail_with is not None:
            return _reply(handler, repo.fail_with, {"Retry-After": "0"}, b'{"error": "try again later"}', body)
        if repo.token is not None and handler.headers.get("Authorization") != f"Bearer {repo.token}":
            message = "Access to this model is restricted: you must be authenticated to access it."
            return _reply(handler, 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": message},
                          json.dumps({"error": message}).encode(), body)
        if kind == "info":
            info = {"id": rest, "modelId": rest, "sha": repo.sha, "private": False, "gated": repo.token is not None,
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
            return _reply(handler, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
        if kind == "tree":
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(repo.files.items())]
            return _reply(handler, 200, {"Content-Type": "application/json"}, json.dumps(tree).encode(), body)
        if rest not in repo.files:
            return _reply(handler, 404, {"X-Error-Code": "EntryNotFound"}, b'{"error": "no such file"}', body)
        data = repo.files[rest]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}
        return _reply(handler, 200, headers, data, body)

    def _route(self, path: str) -> tuple[HubRepo, str, str] | None:
        """(repository, 'info' | 'tree' | 'file', repo id or file path) for a known repository."""
        for name, repo in self.repos.items():
            if path == f"/api/models/{name}" or path.startswith(f"/api/models/{name}/revision/"):
                return repo, "info", name
            if path.startswith(f"/api/models/{name}/tree/"):
                return repo, "tree", name
            if path.startswith(f"/{name}/resolve/"):
                return repo, "file", path[len(f"/{name}/resolve/"):].split("/", 1)[1]
        return None


def _reply(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
    handler.send_response(status)
    for key, value in {**headers, "Content-Length": str(len(data))}.items():
        handler.send_header(key, value)
    handler.end_headers()
    if body:
        handler.wfile.write(data)
