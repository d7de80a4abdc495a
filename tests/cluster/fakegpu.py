"""The outcomes tests can force on pods and nodes of the fake GPU cluster.

kwok plays the kubelet for the nodes of :mod:`gpunodes`. Pods become Running and stay so until a
test ends them with :func:`finish_pod` (the Stages in ``kwok-pod-stages.yaml`` read
the annotation it sets), optionally after :func:`add_disruption_target`, which writes
the condition the kubelet or taint manager writes when a node goes away, or
:func:`fail_node`, which makes the real taint-eviction controller do it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from gpunodes import DEFAULT_NODES, NodeSpec
from kubernetes import client

__all__ = ["DEFAULT_NODES", "NodeSpec", "add_disruption_target", "fail_node", "finish_pod",
           "heal_node", "wait_for", "wait_for_pod_phase"]

EXIT_CODE_ANNOTATION = "kubetune.io/fake-exit-code"
MESSAGE_ANNOTATION = "kubetune.io/fake-termination-message"
ATTEMPT_ANNOTATION = "kubetune.io/fake-exit-attempt"
FINISH_ATTEMPTS = 3
FINISH_WAIT_SECONDS = 10.0
"""kwok ends a pod within milliseconds of the annotation; one that is still Running after this long
missed the event (seen about once in ten full integration runs), so the annotation is sent again."""
NODE_FAILURE_TAINT = "kubetune.io/fake-node-failure"


def finish_pod(api: client.ApiClient, namespace: str, name: str, exit_code: int,
               message: str = "") -> None:
    """End a Running pod's containers with ``exit_code`` (0: Succeeded, else Failed).

    ``message`` becomes the containers' termination message, as a trainer writes it.
    """
    core = client.CoreV1Api(api)
    disrupted = _disrupted(core.read_namespaced_pod(name, namespace))
    for attempt in range(FINISH_ATTEMPTS):
        annotations = {EXIT_CODE_ANNOTATION: str(exit_code), ATTEMPT_ANNOTATION: str(attempt)}
        if message:
            annotations[MESSAGE_ANNOTATION] = message
        core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": annotations}})
        try:
            wait_for(lambda: _ended(core, namespace, name), timeout=FINISH_WAIT_SECONDS,
                     what=f"pod {namespace}/{name} to end")
            return
        except TimeoutError:
            pod = _pod_or_none(core, namespace, name)
            print(f"[fakegpu] pod {namespace}/{name} still {pod.status.phase if pod else 'gone'} "
                  f"{FINISH_WAIT_SECONDS:.0f}s after its exit annotation (attempt {attempt + 1})", flush=True)
            if disrupted and pod is not None and not _disrupted(pod):
                add_disruption_target(api, namespace, name)
    raise TimeoutError(f"pod {namespace}/{name} did not end after {FINISH_ATTEMPTS} exit annotations")


def _pod_or_none(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Pod | None:
    try:
        return core.read_namespaced_pod(name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _ended(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    pod = _pod_or_none(core, namespace, name)
    return pod is None or pod.status.phase in ("Succeeded", "Failed")


def _disrupted(pod: client.V1Pod) -> bool:
    return any(c.type == "DisruptionTarget" and c.status == "True" for c in pod.status.conditions or [])


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
    core = client.CoreV1Api(api)
    core.patch_namespaced_pod_status(name, namespace, {"status": {"conditions": [condition]}})
    wait_for(lambda: _disrupted(core.read_namespaced_pod(name, namespace)), timeout=10,
             what=f"the DisruptionTarget condition on pod {namespace}/{name}")


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
