"""The fake GPU nodes of the test cluster, as plain manifests.

The nodes look like real GPU nodes (``nvidia.com/gpu`` allocatable, the labels the
NVIDIA GPU operator sets, the ``nvidia.com/gpu`` NoSchedule taint on some), so the
real scheduler makes real placement decisions: pods reach the tainted nodes only
with an explicit toleration (no ExtendedResourceToleration admission, as on EKS),
so two 8-GPU nodes are open to any GPU pod and two more to those that tolerate.
The annotation ``kwok.x-k8s.io/node: fake`` hands them to kwok, which plays their
kubelet. Kept free of the Kubernetes client so ``cluster-up`` starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

KWOK_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
NODE_LABEL_SELECTOR = "type=kwok"


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


def nodes_yaml(kubelet_version: str, nodes: tuple[NodeSpec, ...] = DEFAULT_NODES) -> str:
    """All fake nodes as one multi-document YAML stream, for ``kubectl apply -f -``."""
    return yaml.safe_dump_all([node_manifest(spec, kubelet_version) for spec in nodes])
