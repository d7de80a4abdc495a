"""Output ownership on a real control plane: a second FineTuneJob writing into a live job's output
prefix is refused (Failed, OutputConflict, naming the first) and gets no children; with another
output.uri it runs, and once the first has ended a new job may take the prefix (the trainer then
checks what the prefix holds)."""

from __future__ import annotations

import fakegpu
import pytest
from cluster_support import (
    batch_job,
    condition,
    create,
    event_reasons,
    ftj,
    job_or_none,
    patch_spec,
    running_pods,
    wait_phase,
)

pytestmark = pytest.mark.integration

SHARED = {"uri": "s3://outputs/shared/"}


def test_a_second_job_on_a_live_jobs_output_is_refused(kube_admin, namespace, start_operator) -> None:
    start_operator()
    create(kube_admin, ftj(namespace, "first", output=SHARED))
    running_pods(kube_admin, namespace, 1, name="first")
    wait_phase(kube_admin, namespace, "Staging", "first")

    create(kube_admin, ftj(namespace, "second", output={"uri": "s3://outputs/shared/nested/"}))
    refused = wait_phase(kube_admin, namespace, "Failed", "second")
    failed = condition(refused, "Failed")
    assert failed["reason"] == "OutputConflict"
    assert f"FineTuneJob {namespace}/first (Staging)" in failed["message"]
    assert "s3://outputs/shared/nested/" in failed["message"] and "choose another spec.output.uri" in failed["message"]
    assert condition(refused, "Created")["status"] == "False"
    assert job_or_none(kube_admin, namespace, "second") is None
    fakegpu.wait_for(lambda: "OutputConflict" in event_reasons(kube_admin, namespace, "second"),
                     what="the OutputConflict event")
    assert wait_phase(kube_admin, namespace, "Staging", "first")  # the first job is untouched

    patch_spec(kube_admin, namespace, {"output": {"uri": "s3://outputs/second/"}}, "second")
    running_pods(kube_admin, namespace, 1, name="second")
    assert wait_phase(kube_admin, namespace, "Staging", "second")
    assert batch_job(kube_admin, namespace, "second") is not None
