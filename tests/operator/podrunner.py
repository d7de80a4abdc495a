"""A kubelet stand-in for the end-to-end tests: it runs scheduled pods' containers on this host.

kwok plays the kubelet for the fake GPU nodes but runs nothing. `LocalPodRunner` takes pods
the control plane scheduled there and executes each one's container with its real command and
environment, resolved as the kubelet would (literal values, `fieldRef`, `secretKeyRef`,
`configMapKeyRef`, `envFrom`). Volumes become folders under a work directory: ConfigMap volumes
hold the ConfigMap's keys, emptyDir and ephemeral volumes are empty. Where a path inside the
container is a mount point, the same string in the command or the environment is pointed at
that folder; the container's `terminationMessagePath` is handed over the same way (as
`KUBETUNE_TERMINATION_LOG`).

Networking, so that several pods of one job run side by side on one host:

- Each pod gets its own loopback address (127.0.0.2, 127.0.0.3, ...) as its `status.podIP`,
  so the operator's `/progress` read reaches that pod.
- Cluster DNS is played by the runner: an environment value that is a pod's
  `<hostname>.<subdomain>` name (optionally followed by `.<namespace>[.svc[.cluster.local]]`),
  where the subdomain is a headless Service of the namespace, is replaced by that pod's
  address before the command starts, as the pod's resolver would answer it. That is how
  `PET_MASTER_ADDR` (`<job>-0.<service>`) reaches rank 0's address. The host's /etc/hosts
  and resolver are never touched. (The EndpointSlice controller refuses loopback addresses and
  says so in Warning events; nothing reads those slices here.)

Lifecycle, as a kubelet and the node lifecycle controller drive it:

- A pod's processes are every process that carries the pod's marker in its environment
  (`KUBETUNE_LOCAL_POD`), the way a container's cgroup holds them, so torchrun's workers (in
  sessions of their own) belong to their pod.
- When the container's main process exits, what is left of the pod's processes is killed and
  the pod ends with the real exit code (128 + N for signal N) and termination message
  (`FallbackToLogsOnError`: the log's tail when a failed container wrote none).
- When the pod is deleted, its main process gets SIGTERM; after the grace period whatever is
  left gets SIGKILL; the pod then ends and is removed (kwok leaves pods this runner runs to it:
  `RUNS_ON_HOST_ANNOTATION`, see tests/cluster/kwok-pod-stages.yaml).
- `lose()` is a lost node: every process of the pod is SIGKILLed, then the pod gets the
  `DisruptionTarget` condition and ends Failed with 137, as the taint manager and pod
  garbage collector leave a pod whose node went away.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fakegpu
from kubernetes import client
from kubernetes.client.exceptions import ApiException

HOST_MOUNTS = ("/dev/shm", "/tmp")
"""Mount points the host already has; commands may use them as they are."""
FIELD_PATH = re.compile(r"metadata\.(annotations|labels)\['([^']+)'\]")
RUNS_ON_HOST_ANNOTATION = "kubetune.io/runs-on-host"
POD_MARKER_ENV = "KUBETUNE_LOCAL_POD"
LOG_TAIL_BYTES = 2048
POLL_SECONDS = 0.2
_ADDRESSES = itertools.count(2)
_ADDRESS_LOCK = threading.Lock()


def next_loopback_address() -> str:
    """A loopback address no other pod of this test session has had (127.0.0.1 is the host's)."""
    with _ADDRESS_LOCK:
        n = next(_ADDRESSES)
        while n % 256 in (0, 1, 255):
            n = next(_ADDRESSES)
    return f"127.0.{n // 256}.{n % 256}"


@dataclass
class PodRun:
    exit_code: int
    termination_message: str
    output: str


@dataclass
class RunningPod:
    """One pod's container running on this host, watched by its own thread."""

    namespace: str
    name: str
    address: str
    root: Path
    process: subprocess.Popen
    marker: str
    termination_log: Path
    log: Path
    grace_seconds: int
    container: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    lost: bool = False
    result: PodRun | None = None

    def wait(self, timeout: float) -> PodRun:
        if not self.done.wait(timeout):
            raise TimeoutError(f"pod {self.namespace}/{self.name} still running after {timeout:.0f}s")
        assert self.result is not None
        return self.result

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class LocalPodRunner:
    def __init__(self, api: client.ApiClient, workdir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.workdir = workdir
        self.extra_env = dict(extra_env or {})
        """Added to every pod's environment (test seams such as the trainer's trace folder)."""
        self.pods: list[RunningPod] = []

    def run(self, namespace: str, name: str, timeout: float = 600.0) -> PodRun:
        """Run one pod to its end."""
        return self.start(namespace, name).wait(timeout)

    def start(self, namespace: str, name: str) -> RunningPod:
        """Start a scheduled, Running pod's container; its thread ends the pod when the container ends."""
        pod = self.api.sanitize_for_serialization(self.core.read_namespaced_pod(name, namespace))
        container = pod["spec"]["containers"][0]
        root = self.workdir / name
        mounts = self._volumes(pod, container, root)
        address = next_loopback_address()
        self._take(namespace, name, address)
        env = self._environment(pod, container, mounts)
        env.update(self.extra_env)
        env[POD_MARKER_ENV] = marker = pod["metadata"]["uid"]
        termination = root / "termination-log"
        env["KUBETUNE_TERMINATION_LOG"] = str(termination)
        command = [_remap(part, mounts) for part in [*container.get("command", []), *container.get("args", [])]]
        log = root / "log"
        with log.open("wb") as out:
            process = subprocess.Popen(command, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        running = RunningPod(namespace, name, address, root, process, marker, termination, log, grace, container)
        self.pods.append(running)
        threading.Thread(target=self._supervise, args=(running,), daemon=True, name=f"pod-{name}").start()
        return running

    def lose(self, pod: RunningPod, reason: str = "DeletionByTaintManager",
             message: str = "Taint manager: deleting due to NoExecute taint") -> None:
        """The pod's node is gone: its processes die at once, then the control plane marks the pod."""
        pod.lost = True
        kill_processes(pod.marker, signal.SIGKILL)
        pod.process.wait()
        now = _now()
        condition = {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": message,
                     "lastTransitionTime": now}
        self._end(pod, 137, "", extra_conditions=[condition])
        pod.done.wait(30)

    def close(self) -> None:
        """Kill every process this runner started (test teardown)."""
        for pod in self.pods:
            kill_processes(pod.marker, signal.SIGKILL)
        for pod in self.pods:
            pod.done.wait(10)

    def _take(self, namespace: str, name: str, address: str) -> None:
        """Claim the pod from kwok and give it its address, as the kubelet and the CNI plugin would."""
        self.core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": {
            RUNS_ON_HOST_ANNOTATION: "true"}}})
        self.core.patch_namespaced_pod_status(name, namespace, [
            {"op": "replace", "path": "/status/podIP", "value": address},
            {"op": "replace", "path": "/status/podIPs", "value": [{"ip": address}]}])

    def _supervise(self, pod: RunningPod) -> None:
        """Wait for the container to end, turning the pod's deletion into SIGTERM, then SIGKILL."""
        kill_at: float | None = None
        deleting = False
        next_check = 0.0
        while pod.process.poll() is None:
            now = time.monotonic()
            if not deleting and now >= next_check:
                next_check = now + POLL_SECONDS
                grace = self._deletion_grace(pod)
                if grace is not None:
                    deleting = True
                    pod.process.send_signal(signal.SIGTERM)
                    kill_at = now + grace
            if kill_at is not None and now >= kill_at:
                kill_processes(pod.marker, signal.SIGKILL)
            time.sleep(0.05)
        kill_processes(pod.marker, signal.SIGKILL)  # the container's end takes every process with it
        code = exit_code(pod.process.returncode)
        message = pod.termination_log.read_text() if pod.termination_log.exists() else ""
        fallback = pod.container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        if not message and code != 0 and fallback:
            message = pod.output()[-LOG_TAIL_BYTES:]
        pod.result = PodRun(code, message, pod.output())
        if not pod.lost:
            self._end(pod, code, message)
            if deleting or self._deletion_grace(pod) is not None:
                self._remove(pod)
        pod.done.set()

    def _deletion_grace(self, pod: RunningPod) -> int | None:
        """Seconds of grace once the pod is being deleted (or is gone); None while it is not."""
        try:
            current = self.core.read_namespaced_pod(pod.name, pod.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return 0
            raise
        if current.metadata.deletion_timestamp is None:
            return None
        seconds = current.metadata.deletion_grace_period_seconds
        return pod.grace_seconds if seconds is None else seconds

    def _end(self, pod: RunningPod, code: int, message: str,
             extra_conditions: list[dict[str, Any]] | None = None) -> None:
        """The pod's final status, as the kubelet (or, for a lost node, the control plane) writes it."""
        now = _now()
        phase, why = ("Succeeded", "PodCompleted") if code == 0 else ("Failed", "PodFailed")
        terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                      "startedAt": now, "finishedAt": now}
        if message:
            terminated["message"] = message
        conditions = [{"type": t, "status": "False", "reason": why, "lastTransitionTime": now}
                      for t in ("Ready", "ContainersReady")]
        status = {"phase": phase, "conditions": [*conditions, *(extra_conditions or [])],
                  "containerStatuses": [{"name": pod.container["name"], "image": pod.container["image"], "imageID": "",
                                         "ready": False, "restartCount": 0, "started": False,
                                         "state": {"terminated": terminated}}]}
        try:
            self.core.patch_namespaced_pod_status(pod.name, pod.namespace, {"status": status})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _remove(self, pod: RunningPod) -> None:
        """The kubelet's last word on a deleted pod: remove it now that its containers ended."""
        try:
            self.core.delete_namespaced_pod(pod.name, pod.namespace, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _volumes(self, pod: dict[str, Any], container: dict[str, Any], root: Path) -> dict[str, Path]:
        """Container mount path -> host folder, for every mount the host does not already have."""
        folders: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes", []):
            folder = root / "volumes" / volume["name"]
            folder.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                data = self._config_map(pod["metadata"]["namespace"], volume["configMap"]["name"])
                for key, text in data.items():
                    (folder / key).write_text(text)
            elif not ({"emptyDir", "ephemeral"} & volume.keys()):
                raise NotImplementedError(f"volume {volume['name']}: only configMap, emptyDir and ephemeral run here")
            folders[volume["name"]] = folder
        return {m["mountPath"]: folders[m["name"]] for m in container.get("volumeMounts", [])
                if m["mountPath"] not in HOST_MOUNTS}

    def _environment(self, pod: dict[str, Any], container: dict[str, Any], mounts: dict[str, Path]) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(self.workdir),
               "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1"}
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._secret(namespace, source["secretRef"]["name"])
            else:
                data = self._config_map(namespace, source["configMapRef"]["name"])
            env.update({prefix + k: v for k, v in data.items()})
        headless = self._headless_services(namespace)
        for item in container.get("env", []):
            value = item.get("value")
            if "valueFrom" in item:
                value = self._value_from(pod, item["valueFrom"])
            if value is not None:
                env[item["name"]] = self._resolve(namespace, _remap(value, mounts), headless)
        return env

    def _headless_services(self, namespace: str) -> set[str]:
        services = self.core.list_namespaced_service(namespace).items
        return {s.metadata.name for s in services if s.spec.cluster_ip == "None"}

    def _resolve(self, namespace: str, value: str, headless: set[str]) -> str:
        """A pod's `<hostname>.<subdomain>` DNS name -> that pod's address, as cluster DNS answers it."""
        labels = value.split(".")
        suffixes = ([], [namespace], [namespace, "svc"], [namespace, "svc", "cluster", "local"])
        if len(labels) < 2 or labels[1] not in headless or labels[2:] not in suffixes:
            return value
        hostname, subdomain = labels[0], labels[1]

        def address() -> str | None:
            for pod in self.core.list_namespaced_pod(namespace).items:
                annotations = pod.metadata.annotations or {}
                if (pod.spec.hostname, pod.spec.subdomain) == (hostname, subdomain) and \
                        pod.metadata.deletion_timestamp is None and RUNS_ON_HOST_ANNOTATION in annotations:
                    return pod.status.pod_ip
            return None

        return str(fakegpu.wait_for(address, timeout=60, what=f"DNS name {value} in {namespace}"))

    def _value_from(self, pod: dict[str, Any], ref: dict[str, Any]) -> str | None:
        namespace = pod["metadata"]["namespace"]
        if "fieldRef" in ref:
            return _field(pod, ref["fieldRef"]["fieldPath"])
        key_ref = ref.get("secretKeyRef") or ref.get("configMapKeyRef")
        read = self._secret if "secretKeyRef" in ref else self._config_map
        value = read(namespace, key_ref["name"]).get(key_ref["key"])
        if value is None and not key_ref.get("optional"):
            raise KeyError(f"{key_ref['name']} has no key {key_ref['key']}: the kubelet would not start this pod")
        return value

    def _secret(self, namespace: str, name: str) -> dict[str, str]:
        data = self.core.read_namespaced_secret(name, namespace).data or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def _config_map(self, namespace: str, name: str) -> dict[str, str]:
        """A kubelet waits for a pod's ConfigMap to exist: the operator creates it alongside the Job."""
        def read() -> tuple[dict[str, str]] | None:
            try:
                return (dict(self.core.read_namespaced_config_map(name, namespace).data or {}),)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                return None

        [data] = fakegpu.wait_for(read, timeout=30, what=f"ConfigMap {namespace}/{name}")
        return data


def pod_processes(marker: str) -> list[int]:
    """Process ids of this host's processes that carry `marker` as their pod (as a cgroup lists them)."""
    needle = f"{POD_MARKER_ENV}={marker}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if needle in environ:
            found.append(int(entry.name))
    return found


def kill_processes(marker: str, sig: signal.Signals) -> None:
    for pid in pod_processes(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def exit_code(returncode: int) -> int:
    """The container's exit code as the kubelet reports it: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _field(pod: dict[str, Any], path: str) -> str:
    if match := FIELD_PATH.fullmatch(path):
        return str(pod["metadata"].get(match[1], {}).get(match[2], ""))
    node: Any = pod
    for part in path.split("."):
        node = node.get(part, "") if isinstance(node, dict) else ""
    return str(node)


def _remap(value: str, mounts: dict[str, Path]) -> str:
    """`value` with a leading container mount path replaced by its host folder."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(mounts[mount]) + value[len(mount.rstrip("/")):]
    return value
