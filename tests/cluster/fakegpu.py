"""Fake GPU nodes, and the pod outcomes tests can force on them.

kwok plays the kubelet for nodes annotated ``kwok.x-k8s.io/node: fake``. The nodes
here look like real GPU nodes (``nvidia.com/gpu`` allocatable, the labels the NVIDIA
GPU operator sets, the ``nvidia.com/gpu`` NoSchedule taint on some), so the real
scheduler makes real placement decisions. Pods become Running and stay so until a
test ends them with :func:`finish_pod` (the Stages in ``kwok-pod-stages.yaml`` read
the annotation it sets), optionally after :func:`add_disruption_target`, which writes
the condition the kubelet or taint manager writes when a node goes away, or
:func:`fail_node`, which makes the real taint-eviction controller do it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kubernetes import client

EXIT_CODE_ANNOTATION = "kubetune.io/fake-exit-code"
MESSAGE_ANNOTATION = "kubetune.io/fake-termination-message"
KWOK_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}
NODE_FAILURE_TAINT = "kubetune.io/fake-node-failure"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@dataclass(frozen=True)
class NodeSpec:
    """One fake node: its name, GPU count and whether it carries the GPU taint."""

    name: str
    gpus: int = 8
    tainted: bool = False


DEFAULT_NODES = (
    NodeSpec("kwok-gpu-0"),
    NodeSpec("kwok-gpu-1"),
    NodeSpec("kwok-gpu-2", tainted=True),
    NodeSpec("kwok-gpu-3", tainted=True),
    NodeSpec("kwok-cpu-0", gpus=0),
)


def node_manifest(spec: NodeSpec, kubelet_version: str) -> dict:
    """A Node object shaped like a p5.48xlarge (8x H100) or a plain CPU node."""
    labels = {
        "kubernetes.io/hostname": spec.name, "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64", "type": "kwok",
        "node.kubernetes.io/instance-type": "p5.48xlarge" if spec.gpus else "m7i.8xlarge",
    }
    resources = {"cpu": "192", "memory": "2048Gi", "pods": "110",
                 "ephemeral-storage": "3500Gi"}
    if spec.gpus:
        labels |= {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": str(spec.gpus),
                   "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                   "nvidia.com/gpu.memory": "81559"}
        resources["nvidia.com/gpu"] = str(spec.gpus)
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels, "annotations": dict(KWOK_ANNOTATION)},
        "spec": {"taints": [dict(GPU_TAINT)] if spec.tainted else []},
        "status": {
            "allocatable": resources, "capacity": dict(resources),
            "nodeInfo": {
                "kubeletVersion": kubelet_version, "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": "amd64",
                "containerRuntimeVersion": "containerd://kwok", "kernelVersion": "kwok",
                "osImage": "kwok fake GPU node", "bootID": "", "machineID": "",
                "systemUUID": ""},
        },
    }


def register_nodes(api: client.ApiClient, kubelet_version: str,
                   nodes: tuple[NodeSpec, ...] = DEFAULT_NODES) -> list[str]:
    """Create the fake nodes that do not exist yet; returns all their names."""
    core = client.CoreV1Api(api)
    existing = {n.metadata.name for n in core.list_node().items}
    for spec in nodes:
        if spec.name not in existing:
            core.create_node(node_manifest(spec, kubelet_version))
    return [spec.name for spec in nodes]


def finish_pod(api: client.ApiClient, namespace: str, name: str, exit_code: int,
               message: str = "") -> None:
    """End a Running pod's containers with ``exit_code`` (0: Succeeded, else Failed).

    ``message`` becomes the containers' termination message, as a trainer writes it.
    """
    annotations = {EXIT_CODE_ANNOTATION: str(exit_code)}
    if message:
        annotations[MESSAGE_ANNOTATION] = message
    client.CoreV1Api(api).patch_namespaced_pod(
        name, namespace, {"metadata": {"annotations": annotations}})


def add_disruption_target(api: client.ApiClient, namespace: str, name: str,
                          reason: str = "DeletionByTaintManager",
                          message: str = "Taint manager: deleting due to NoExecute taint") -> None:
    """Mark a pod as disrupted the way the control plane does before killing it.

    Follow with ``finish_pod(..., exit_code=137)`` to let a Job's podFailurePolicy
    see a disrupted, failed pod.
    """
    condition = {"type": "DisruptionTarget", "status": "True", "reason": reason,
                 "message": message,
                 "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    client.CoreV1Api(api).patch_namespaced_pod_status(
        name, namespace, {"status": {"conditions": [condition]}})


def fail_node(api: client.ApiClient, node: str, key: str = NODE_FAILURE_TAINT) -> None:
    """Put a NoExecute taint on ``node``: the real taint-eviction controller then
    deletes its pods with a ``DisruptionTarget`` condition and kwok ends them Failed
    (137), as after a node failure or drain. Undo with :func:`heal_node`."""
    taints = [*_taints_without(api, node, key),
              {"key": key, "value": "true", "effect": "NoExecute"}]
    client.CoreV1Api(api).patch_node(node, {"spec": {"taints": taints}})


def heal_node(api: client.ApiClient, node: str, key: str = NODE_FAILURE_TAINT) -> None:
    client.CoreV1Api(api).patch_node(
        node, {"spec": {"taints": _taints_without(api, node, key)}})


def _taints_without(api: client.ApiClient, node: str, key: str) -> list[dict]:
    taints = client.CoreV1Api(api).read_node(node).spec.taints or []
    return [t.to_dict() for t in taints if t.key != key]


def wait_for(predicate: Callable[[], object], timeout: float = 30.0,
             interval: float = 0.2, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_for_pod_phase(api: client.ApiClient, namespace: str, name: str, phase: str,
                       timeout: float = 30.0) -> client.V1Pod:
    """Wait until the pod reaches ``phase`` (Running, Succeeded, Failed)."""
    core = client.CoreV1Api(api)

    def reached() -> client.V1Pod | None:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase == phase else None

    return wait_for(reached, timeout, what=f"pod {namespace}/{name} to be {phase}")
