"""The rendering table of `test_render.py`, read back from the API server.

A FineTuneJob that sets every spec field goes through the running operator; the Job the API
server stored (after its own defaulting) must still say what each row of the table says.
That catches what a unit test cannot: fields the server drops, rewrites or rejects.
"""

from __future__ import annotations

from typing import Any

import fakegpu
import pytest
from cluster_support import TIMEOUT, create, job_or_none, running_pods
from ftj_builders import make_job
from kubernetes import client
from test_render import WHERE_FIELDS_LAND, _full_job

from kubetune.operator.observed import Observed
from kubetune.operator.render import render_job
from kubetune.operator.restart import failure_verdict
from kubetune.operator.settings import OperatorSettings

pytestmark = pytest.mark.integration


def _contains(actual: Any, expected: Any) -> bool:
    """`expected` with server defaults allowed on top: extra keys in dicts, nothing else."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _contains(actual[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(
            _contains(a, e) for a, e in zip(actual, expected, strict=True))
    return actual == expected


def test_every_row_of_the_render_table_survives_the_api_server(kube_admin, namespace, start_operator) -> None:
    body = _full_job().model_dump(by_alias=True, exclude_none=True, mode="json")
    body["metadata"] = {"name": "corgi", "namespace": namespace}
    body.pop("status", None)
    client.CoreV1Api(kube_admin).create_namespaced_secret(namespace, {
        "metadata": {"name": "s3-creds"}, "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}})
    start_operator()
    create(kube_admin, body)
    stored = fakegpu.wait_for(lambda: job_or_none(kube_admin, namespace), timeout=TIMEOUT, what="the Job")
    job = kube_admin.sanitize_for_serialization(stored)
    wrong = []
    for where, read, expected in WHERE_FIELDS_LAND:
        try:
            actual = read(job)
        except (KeyError, IndexError, StopIteration) as exc:
            actual = f"missing ({exc!r})"
        if not _contains(actual, expected):
            wrong.append(f"{where}: stored {actual!r}, rendered {expected!r}")
    assert not wrong, "\n".join(wrong)
    assert len(WHERE_FIELDS_LAND) > 40


def test_the_job_controller_fails_a_multi_node_job_on_a_lost_pod_and_says_so(kube_admin, namespace) -> None:
    """The rendered podFailurePolicy on the real Job controller: a lost pod fails the Job at once, and
    the Job's own condition names the DisruptionTarget rule, so the verdict holds even once the pod is gone."""
    typed = make_job("corgi").nodes(2).typed()
    rendered = render_job(typed, OperatorSettings(default_image="registry.local/kubetune:test"))
    rendered["metadata"] = {"name": "corgi", "namespace": namespace}  # no owner: the GC would remove an orphan
    batch = client.BatchV1Api(kube_admin)
    batch.create_namespaced_job(namespace, rendered)
    pods = running_pods(kube_admin, namespace, 2)
    lost = next(p for p in pods if p.metadata.annotations["batch.kubernetes.io/job-completion-index"] == "1")
    fakegpu.add_disruption_target(kube_admin, namespace, lost.metadata.name)
    fakegpu.finish_pod(kube_admin, namespace, lost.metadata.name, 137)

    def failed() -> dict[str, Any] | None:
        job = kube_admin.sanitize_for_serialization(batch.read_namespaced_job("corgi", namespace))
        return job if Observed(job=job).job_condition("Failed") else None

    job = fakegpu.wait_for(failed, timeout=TIMEOUT, what="the Job to fail")
    verdict = failure_verdict(typed, Observed(job=job))  # as if every pod were already gone
    assert verdict is not None and verdict.kind == "disrupted", Observed(job=job).job_condition("Failed")
