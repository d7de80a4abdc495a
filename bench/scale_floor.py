"""The floor under `operator_scale.py`: the same burst of FineTuneJobs on a fresh control plane,
answered by the least an operator can do.

`FloorReactor` watches FineTuneJobs and, for each new one, creates the same three children
the operator renders (ConfigMap, Service, Job; at once, from 64 threads), with no
validation, status, events or caches: requests only, their bodies prepared in advance.
Its create -> Job latency is what this machine's control plane allows any operator, so
the operator's figure is read against it.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from typing import Any

import urllib3

from kubetune.api.validation import validate_document
from kubetune.operator.render import Attempt, render_configmap, render_job, render_service
from kubetune.operator.settings import OperatorSettings

NAME, UID = "floor-template-name", "floor-template-uid"
PATHS = {"ConfigMap": "/api/v1/namespaces/{ns}/configmaps", "Service": "/api/v1/namespaces/{ns}/services",
         "Job": "/apis/batch/v1/namespaces/{ns}/jobs"}


def children_template(document: dict[str, Any], settings: OperatorSettings) -> str:
    """The three children of `document` as JSON text, its name and uid left as placeholders."""
    doc = json.loads(json.dumps(document).replace(document["metadata"]["name"], NAME))
    doc["metadata"]["uid"] = UID
    job = validate_document(doc).job
    if job is None:
        raise ValueError(f"the bench's FineTuneJob does not validate: {validate_document(doc).problems}")
    return json.dumps([render_configmap(job), render_service(job, settings),
                       render_job(job, settings, Attempt(0, None))])


class FloorReactor:
    """Creates each new FineTuneJob's children, and nothing else."""

    def __init__(self, server: str, namespace: str, template: str, cert: tuple[str, str], ca: str,
                 threads: int = 64) -> None:
        self.server, self.namespace, self.template = server, namespace, template
        self.http = urllib3.PoolManager(maxsize=threads, cert_file=cert[0], key_file=cert[1], ca_certs=ca)
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, "floor-create")
        self.errors: list[str] = []
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._watch, daemon=True, name="floor-watch").start()

    def stop(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=True)

    def _watch(self) -> None:
        version = ""
        path = f"/apis/kubetune.io/v1alpha1/namespaces/{self.namespace}/finetunejobs"
        while not self._stop.is_set():
            url = f"{self.server}{path}?watch=1&timeoutSeconds=600&resourceVersion={version}"
            try:
                stream = self.http.request("GET", url, preload_content=False, timeout=urllib3.Timeout(read=660))
                pending = b""
                for chunk in stream.stream(65536):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in filter(None, lines):
                        event = json.loads(line)
                        if event["type"] == "ERROR":  # 410 Gone: watch again from now
                            version = ""
                            continue
                        meta = event["object"]["metadata"]
                        version = meta.get("resourceVersion", version)
                        if event["type"] == "ADDED":
                            self._react(meta["name"], meta["uid"])
            except (urllib3.exceptions.HTTPError, ValueError, KeyError):
                time.sleep(0.5)

    def _react(self, name: str, uid: str) -> None:
        for child in json.loads(self.template.replace(NAME, name).replace(UID, uid)):
            self.pool.submit(self._create, child)

    def _create(self, child: dict[str, Any]) -> None:
        url = self.server + PATHS[child["kind"]].format(ns=self.namespace)
        response = self.http.request("POST", url, body=json.dumps(child).encode(),
                                     headers={"Content-Type": "application/json"})
        if response.status >= 300:
            self.errors.append(f"{child['kind']} {child['metadata']['name']}: {response.status}")
