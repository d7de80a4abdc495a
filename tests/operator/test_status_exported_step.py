"""Best weights reach the status: the trainer's termination message names the exported step and why, and
`status.outputs.step` / `status.outputs.reason` carry them (issue 15, item 1). No operator code is special
to them: `Outputs` parses the trainer's `outputs` as they are."""

from __future__ import annotations

import json

import pytest
from ftj_builders import NOW, make_batch_job, make_job, observed

from kubetune.api.status import FineTuneJobStatus
from kubetune.operator.reports import parse_result
from kubetune.operator.status import compute_status


@pytest.mark.parametrize(("step", "reason"), [(6, "BestValidationLoss"), (12, "LastStep")])
def test_the_exported_step_and_its_reason_reach_status_outputs(step: int, reason: str) -> None:
    message = json.dumps({"phase": "Succeeded", "exitCode": 0, "reason": "Completed", "message": "training finished",
                          "step": 12, "totalSteps": 12,
                          "outputs": {"uri": "s3://o/final/", "lora": {"diffusers": "s3://o/final/w.safetensors"},
                                      "step": step, "reason": reason}})
    status = compute_status(make_job().typed(), observed(make_batch_job().complete()), NOW,
                            FineTuneJobStatus(phase="Running"), None, parse_result(message))
    assert status.phase == "Succeeded"
    assert status.outputs is not None and (status.outputs.step, status.outputs.reason) == (step, reason)
    assert status.progress is not None and status.progress.step == 12  # the last step trained, not the exported one
    dumped = status.model_dump(by_alias=True, exclude_none=True)["outputs"]
    assert (dumped["step"], dumped["reason"]) == (step, reason)
