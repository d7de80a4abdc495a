"""Kueue's manager beside a test control plane: its CRDs, its webhooks on loopback, one GPU queue.

The manager is built from ``kueue/go.mod`` by :mod:`clusterbuild` (``make cluster-build``) and
run with the cluster's admin kubeconfig, as the other controllers are. Outside a cluster three
things differ from Kueue's own install, each measured in ``docs/neighbours.md``:

- Its webhooks are served on 127.0.0.1 with a certificate signed by the cluster's CA and
  registered by URL; Kueue's internal certificate rotation is off. Only the webhooks of the
  Kueue objects and of batch/v1 Jobs are registered, the Job ones only for namespaces labelled
  ``kueue.x-k8s.io/managed=true``, so that a stopped Kueue blocks nothing else.
- With its own certificates off, the manager reads its metrics certificate from the fixed path
  ``/etc/kueue/metrics/certs``. It runs in a private mount namespace whose ``/etc`` is an
  overlay holding that pair, so nothing is written to the machine's ``/etc``.
- The on-demand visibility server (a fixed port on every address) is off.

`GpuQueue` is what the tests queue FineTuneJobs on: a ResourceFlavor for the fake GPU nodes, a
ClusterQueue with a GPU quota that preempts lower priorities, and a LocalQueue in one namespace.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import clusterbuild
from clusterprocess import free_port, start_server, stop_server
from kubernetes import client

MANAGED_LABEL = "kueue.x-k8s.io/managed"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
API = ("kueue.x-k8s.io", "v1beta2")
READY_SECONDS = 60.0
WEBHOOKS = {  # name: (path, resources, operations), from Kueue's config/components/webhook/manifests.yaml
    "mutating": [
        ("mclusterqueue", "/mutate-kueue-x-k8s-io-v1beta2-clusterqueue", "kueue.x-k8s.io", ["clusterqueues"],
         ["CREATE"]),
        ("mresourceflavor", "/mutate-kueue-x-k8s-io-v1beta2-resourceflavor", "kueue.x-k8s.io",
         ["resourceflavors"], ["CREATE"]),
        ("mworkload", "/mutate-kueue-x-k8s-io-v1beta2-workload", "kueue.x-k8s.io", ["workloads"], ["CREATE"]),
        ("mjob", "/mutate-batch-v1-job", "batch", ["jobs"], ["CREATE"]),
    ],
    "validating": [
        ("vclusterqueue", "/validate-kueue-x-k8s-io-v1beta2-clusterqueue", "kueue.x-k8s.io", ["clusterqueues"],
         ["CREATE", "UPDATE"]),
        ("vcohort", "/validate-kueue-x-k8s-io-v1beta2-cohort", "kueue.x-k8s.io", ["cohorts"], ["CREATE", "UPDATE"]),
        ("vresourceflavor", "/validate-kueue-x-k8s-io-v1beta2-resourceflavor", "kueue.x-k8s.io",
         ["resourceflavors"], ["CREATE", "UPDATE"]),
        ("vworkload", "/validate-kueue-x-k8s-io-v1beta2-workload", "kueue.x-k8s.io",
         ["workloads", "workloads/status"], ["CREATE", "UPDATE"]),
        ("vjob", "/validate-batch-v1-job", "batch", ["jobs"], ["CREATE", "UPDATE"]),
    ],
}


def kueue_module_dir() -> Path:
    """Where the Go module cache holds Kueue's sources (its CRDs are files there, not embedded)."""
    out = subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", clusterbuild.KUEUE.module],
                         cwd=clusterbuild.KUEUE.target.module_dir, env=clusterbuild.go_env(),
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


class KueueExited(RuntimeError):
    """The manager died or never became ready; its log tail is the message."""


class Kueue:
    """Start with `start()`, stop with `stop()` (which removes its webhook registrations)."""

    def __init__(self, plane: Any) -> None:
        self.plane = plane
        self.home: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> Kueue:
        binary = clusterbuild.ensure_server(clusterbuild.KUEUE)
        self.home = Path(tempfile.mkdtemp(prefix="kubetune-kueue-"))
        self.ports = {name: free_port() for name in ("webhook", "health", "metrics")}
        certs = self.home / "certs"
        certs.mkdir()
        pki = self.plane.pki  # the API server's serving pair: signed by the cluster CA, valid for 127.0.0.1
        shutil.copy(pki.serving_cert, certs / "tls.crt")
        shutil.copy(pki.serving_key, certs / "tls.key")
        self._apply_crds()
        (self.home / "config.yaml").write_text(json.dumps({
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": "kueue-system",
            "manageJobsWithoutQueueName": False, "internalCertManagement": {"enable": False},
            "webhook": {"host": "127.0.0.1", "port": self.ports["webhook"], "certDir": str(certs)},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports['health']}"},
            "metrics": {"bindAddress": f"127.0.0.1:{self.ports['metrics']}"},
            "leaderElection": {"leaderElect": False}, "integrations": {"frameworks": ["batch/job"]}}))
        overlay = self.home / "etc"
        for part in ("upper", "work"):
            (overlay / part).mkdir(parents=True)
        metrics_certs = "/etc/kueue/metrics/certs"
        script = (f"mount -t overlay overlay -o lowerdir=/etc,upperdir={overlay}/upper,workdir={overlay}/work /etc"
                  f" && mkdir -p {metrics_certs} && cp {certs}/tls.crt {certs}/tls.key {metrics_certs}/"
                  f" && exec {binary} --config={self.home / 'config.yaml'}"
                  " --feature-gates=VisibilityOnDemand=false --zap-log-level=info")
        env = {**os.environ, "KUBECONFIG": str(self.plane.kubeconfig)}
        self.process = start_server(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                    self.home / "kueue.log", env=env)
        try:
            self._wait_ready()
            self._register_webhooks()
        except BaseException:
            self.stop()
            raise
        return self

    def _apply_crds(self) -> None:
        bases = kueue_module_dir() / "config" / "components" / "crd" / "bases"
        files = sorted(bases.glob("*.yaml"))
        if not files:
            raise KueueExited(f"no CRDs under {bases}")
        command = [*self.plane.kubectl_command(), "apply", "--server-side", "--force-conflicts",
                   *(f"--filename={f}" for f in files)]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        subprocess.run([*self.plane.kubectl_command(), "wait", "--for=condition=Established", "--timeout=60s",
                        *(f"crd/{f.name.split('_', 1)[1].removesuffix('.yaml')}.kueue.x-k8s.io" for f in files)],
                       check=True, capture_output=True, text=True, timeout=90)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise KueueExited(f"kueue exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['health']}/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise KueueExited(f"kueue not ready within {READY_SECONDS:.0f}s:\n{self.log_tail()}")

    def _register_webhooks(self) -> None:
        ca = base64.b64encode(self.plane.pki.ca_cert.read_bytes()).decode()
        admission = client.AdmissionregistrationV1Api(self.admin)
        for kind, hooks in WEBHOOKS.items():
            body = {"metadata": {"name": f"kubetune-test-kueue-{kind}"}, "webhooks": [
                {"name": f"{name}.kb.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                 "failurePolicy": "Fail", "timeoutSeconds": 10,
                 "clientConfig": {"url": f"https://127.0.0.1:{self.ports['webhook']}{path}", "caBundle": ca},
                 "rules": [{"apiGroups": [group], "apiVersions": ["*"], "resources": resources,
                            "operations": operations}],
                 **({"namespaceSelector": {"matchLabels": {MANAGED_LABEL: "true"}}} if group == "batch" else {})}
                for name, path, group, resources, operations in hooks]}
            create = (admission.create_mutating_webhook_configuration if kind == "mutating"
                      else admission.create_validating_webhook_configuration)
            create(body)

    @property
    def admin(self) -> client.ApiClient:
        if not hasattr(self, "_admin"):
            self._admin = self.plane.admin_client()
        return self._admin

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.home / "kueue.log").read_text(errors="replace")  # type: ignore[operator]
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            admission = client.AdmissionregistrationV1Api(self.admin)
            for kind in WEBHOOKS:
                delete = (admission.delete_mutating_webhook_configuration if kind == "mutating"
                          else admission.delete_validating_webhook_configuration)
                with contextlib.suppress(client.ApiException):
                    delete(f"kubetune-test-kueue-{kind}")
        if self.process is not None:
            stop_server(self.process)
            self.process = None
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None
        if hasattr(self, "_admin"):
            self._admin.close()
            del self._admin

    def __enter__(self) -> Kueue:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class GpuQueue:
    """A LocalQueue `name` in `namespace` on a ClusterQueue with `gpus` GPUs of the fake GPU nodes."""

    namespace: str
    name: str
    cluster_queue: str
    gpus: int

    @classmethod
    def create(cls, api: client.ApiClient, namespace: str, gpus: int = 8,
               strategy: str = "BestEffortFIFO") -> GpuQueue:
        """`strategy`: the ClusterQueue's queueingStrategy (Kueue's default, or StrictFIFO)."""
        objects = client.CustomObjectsApi(api)
        group, version = API
        flavor, cluster_queue = f"gpu-{namespace}", f"cq-{namespace}"
        objects.create_cluster_custom_object(group, version, "resourceflavors", {
            "apiVersion": f"{group}/{version}", "kind": "ResourceFlavor", "metadata": {"name": flavor},
            "spec": {"nodeLabels": {"nvidia.com/gpu.present": "true"},
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}})
        objects.create_cluster_custom_object(group, version, "clusterqueues", {
            "apiVersion": f"{group}/{version}", "kind": "ClusterQueue", "metadata": {"name": cluster_queue},
            "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                     "queueingStrategy": strategy,
                     "preemption": {"withinClusterQueue": "LowerPriority"},
                     "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"], "flavors": [
                         {"name": flavor, "resources": [{"name": "cpu", "nominalQuota": "256"},
                                                        {"name": "memory", "nominalQuota": "2Ti"},
                                                        {"name": "nvidia.com/gpu", "nominalQuota": gpus}]}]}]}})
        objects.create_namespaced_custom_object(group, version, namespace, "localqueues", {
            "apiVersion": f"{group}/{version}", "kind": "LocalQueue",
            "metadata": {"name": "gpus", "namespace": namespace}, "spec": {"clusterQueue": cluster_queue}})
        client.CoreV1Api(api).patch_namespace(namespace, {"metadata": {"labels": {MANAGED_LABEL: "true"}}})
        return cls(namespace, "gpus", cluster_queue, gpus)

    def priority_class(self, api: client.ApiClient, name: str, value: int) -> str:
        """A WorkloadPriorityClass (cluster-wide, so named after the namespace); its name."""
        group, version = API
        full = f"{name}-{self.namespace}"
        client.CustomObjectsApi(api).create_cluster_custom_object(group, version, "workloadpriorityclasses", {
            "apiVersion": f"{group}/{version}", "kind": "WorkloadPriorityClass", "metadata": {"name": full},
            "value": value})
        return full

    def workloads(self, api: client.ApiClient) -> list[dict[str, Any]]:
        group, version = API
        return client.CustomObjectsApi(api).list_namespaced_custom_object(
            group, version, self.namespace, "workloads")["items"]
