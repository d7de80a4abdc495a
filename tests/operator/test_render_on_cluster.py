"""The rendering table of `test_render.py`, read back from the API server.

A FineTuneJob that sets every spec field goes through the running operator; the Job the API
server stored (after its own defaulting) must still say what each row of the table says.
That catches what a unit test cannot: fields the server drops, rewrites or rejects.
"""

from __future__ import annotations

from typing import Any

import fakegpu
import pytest
from cluster_support import TIMEOUT, create, job_or_none
from kubernetes import client
from test_render import WHERE_FIELDS_LAND, _full_job

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
