"""The training report as a person sees it: `report/index.html` opened from disk in headless Chromium.

Issue 15 asks for a page that opens from S3 or a laptop with no network: nothing it shows may be
fetched, no script may fail, every logged step is a point on the loss chart (one SVG marker each,
in `<g id="series-step-loss">`), and every sample image decodes. The browser is Debian's chromium
(`make tools`), driven over the DevTools pipe by tests/headless_chromium.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_support import free_port, local_job

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job
from tests.headless_chromium import Chromium
from tests.tools import needs_tools

pytestmark = [pytest.mark.integration, needs_tools("chromium")]

IMAGES = "Array.from(document.images, image => ({alt: image.alt, width: image.naturalWidth}))"
STEP_MARKERS = "document.querySelectorAll('#series-step-loss use').length"


def test_the_browser_reports_what_a_page_fetches_and_logs(tmp_path: Path) -> None:
    """The checks below can fail: a remote image, a missing file and a console error are all caught."""
    remote = f"http://127.0.0.1:{free_port()}/chart.png"  # nothing listens there; the attempt is what counts
    page_file = tmp_path / "bad.html"
    page_file.write_text(f'<!DOCTYPE html><html><body><img alt="remote" src="{remote}">'
                         '<img alt="missing" src="missing.png"><script>console.error("boom")</script></body></html>')
    with Chromium(tmp_path / "chromium") as browser:
        page = browser.open(page_file.as_uri())
        images = page.evaluate(IMAGES)
    assert page.requested[0] == page_file.as_uri()
    assert page.remote_requests() == [remote]
    assert "console.error: boom" in page.errors
    assert any("ERR_FILE_NOT_FOUND" in error and error.endswith("missing.png") for error in page.errors), page.errors
    assert images == [{"alt": "remote", "width": 0}, {"alt": "missing", "width": 0}]


def test_the_report_opens_offline_with_every_step_and_sample(tiny_sd: Path, squares: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = local_job(str(tiny_sd), str(squares), str(out), data={"validationFraction": 0.2},
                    training={"maxSteps": 4},
                    validation={"every": 2, "prompts": ["a red square", "a blue circle"], "inferenceSteps": 2})
    result = run_job(job, RuntimeConfig(scratch=tmp_path / "scratch", log_every=0))
    assert result.exit_code == 0, result.message
    report = out / "report"
    history = [json.loads(line) for line in (report / "history.jsonl").read_text().splitlines()]
    steps = [line for line in history if line["kind"] == "step"]
    assert [line["step"] for line in steps] == [1, 2, 3, 4]
    assert [line["step"] for line in history if line["kind"] == "validation"] == [2, 4]
    samples = result.progress["samples"]
    assert len(samples) == 2 * 2  # two prompts at steps 2 and 4

    with Chromium(tmp_path / "chromium") as browser:
        page = browser.open((report / "index.html").as_uri())
        markers = page.evaluate(STEP_MARKERS)
        images = page.evaluate(IMAGES)
    assert page.requested[0] == (report / "index.html").as_uri()
    assert page.remote_requests() == [], "the report must open with no network"
    assert page.errors == []
    assert markers == len(steps)
    assert len(images) == len(samples)
    assert [image for image in images if image["width"] == 0] == [], "every sample image decodes"
