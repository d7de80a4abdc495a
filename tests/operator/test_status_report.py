"""`status.outputs.report`: the training report's page, listed from rank 0's first validation on, not only
once the job succeeded (issue 15)."""

from __future__ import annotations

from ftj_builders import NOW, make_batch_job, make_job, make_pod, observed

from kubetune.api.status import FineTuneJobStatus, Outputs
from kubetune.operator.reports import parse_progress, parse_result
from kubetune.operator.status import compute_status

RUNNING = make_batch_job().active(1)
PAGE = "s3://outputs/corgi/report/index.html"  # make_job's output is s3://outputs/corgi/


def training(**extra: object) -> dict[str, object]:
    return {"stage": "training", "step": 10, "totalSteps": 100, **extra}


def test_a_running_job_lists_the_report_rank_zero_names() -> None:
    before = compute_status(make_job().typed(), observed(RUNNING, (make_pod().running(),)), NOW, None,
                            parse_progress(training()))
    assert before.outputs is None, "no report before the first validation"
    status = compute_status(make_job().typed(), observed(RUNNING, (make_pod().running(),)), NOW, before,
                            parse_progress(training(outputs={"report": PAGE})))
    assert status.outputs == Outputs(report=PAGE)
    later = compute_status(make_job().typed(), observed(RUNNING, (make_pod().running(),)), NOW, status, None)
    assert later.outputs == Outputs(report=PAGE), "kept while /progress cannot be read"


def test_only_a_page_under_the_jobs_own_output_is_listed() -> None:
    for page in ("s3://elsewhere/report/index.html", "s3://outputs/corgi-other/report/index.html",
                 "s3://outputs/corgi/" + "x" * 3000):
        status = compute_status(make_job().typed(), observed(RUNNING, (make_pod().running(),)), NOW, None,
                                parse_progress(training(outputs={"report": page})))
        assert status.outputs is None, page


def test_the_final_outputs_keep_the_report() -> None:
    running = FineTuneJobStatus(phase="Running", outputs=Outputs(report=PAGE))
    result = parse_result('{"phase": "Succeeded", "reason": "Completed", "message": "done", '
                          '"outputs": {"uri": "s3://outputs/corgi/final/", "step": 100, "reason": "LastStep"}}')
    done = compute_status(make_job().typed(), observed(make_batch_job().complete(), (make_pod().succeeded(),)), NOW,
                          running, None, result)
    assert done.phase == "Succeeded"
    assert done.outputs == Outputs(uri="s3://outputs/corgi/final/", step=100, reason="LastStep", report=PAGE)


def test_a_failed_run_reports_its_report_from_the_termination_message() -> None:
    result = parse_result(f'{{"phase": "Failed", "exitCode": 78, "reason": "ConfigError", "message": "bad", '
                          f'"step": 40, "outputs": {{"report": "{PAGE}"}}}}')
    failed = compute_status(make_job().typed(), observed(make_batch_job().failed(), (make_pod().failed(78),)), NOW,
                            FineTuneJobStatus(phase="Running"), None, result)
    assert failed.outputs == Outputs(report=PAGE)
