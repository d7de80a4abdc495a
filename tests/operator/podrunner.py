"""A kubelet stand-in for the end-to-end tests: it runs a scheduled pod's container on this host.

kwok plays the kubelet for the fake GPU nodes but runs nothing. `LocalPodRunner` takes a pod
the control plane scheduled there and executes its container's real command with its real
environment, resolved as the kubelet would (literal values, `fieldRef`, `secretKeyRef`,
`configMapKeyRef`, `envFrom`). Volumes become folders under a work directory: ConfigMap volumes
hold the ConfigMap's keys, emptyDir and ephemeral volumes are empty. Where a path inside the
container is a mount point, the same string in the command or the environment is pointed at
that folder; the container's `terminationMessagePath` is handed over the same way (as
`KUBETUNE_TERMINATION_LOG`). The pod's IP is set to 127.0.0.1, so the operator reaches the
trainer's `/progress`, and when the process exits the pod ends with its real exit code and
termination message (through kwok, as `fakegpu.finish_pod`).
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakegpu
from kubernetes import client
from kubernetes.client.exceptions import ApiException

HOST_MOUNTS = ("/dev/shm", "/tmp")
"""Mount points the host already has; commands may use them as they are."""
FIELD_PATH = re.compile(r"metadata\.(annotations|labels)\['([^']+)'\]")


@dataclass
class PodRun:
    exit_code: int
    termination_message: str
    output: str


class LocalPodRunner:
    def __init__(self, api: client.ApiClient, workdir: Path) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.workdir = workdir

    def run(self, namespace: str, name: str, timeout: float = 600.0) -> PodRun:
        pod = self.api.sanitize_for_serialization(self.core.read_namespaced_pod(name, namespace))
        container = pod["spec"]["containers"][0]
        root = self.workdir / name
        mounts = self._volumes(pod, container, root)
        env = self._environment(pod, container, mounts)
        termination = root / "termination-log"
        env["KUBETUNE_TERMINATION_LOG"] = str(termination)
        command = [_remap(part, mounts) for part in [*container.get("command", []), *container.get("args", [])]]
        self._set_pod_ip(namespace, name)
        done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=timeout,
                              check=False)
        message = termination.read_text() if termination.exists() else done.stderr[-4096:]
        fakegpu.finish_pod(self.api, namespace, name, done.returncode, message=message)
        return PodRun(done.returncode, message, done.stdout + done.stderr)

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
        for item in container.get("env", []):
            value = item.get("value")
            if "valueFrom" in item:
                value = self._value_from(pod, item["valueFrom"])
            if value is not None:
                env[item["name"]] = _remap(value, mounts)
        return env

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

    def _set_pod_ip(self, namespace: str, name: str) -> None:
        self.core.patch_namespaced_pod_status(name, namespace, [
            {"op": "replace", "path": "/status/podIP", "value": "127.0.0.1"},
            {"op": "replace", "path": "/status/podIPs", "value": [{"ip": "127.0.0.1"}]}])


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
