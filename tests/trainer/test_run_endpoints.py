"""`kubetune run` says where /metrics and /progress are served, or that they are off and how to turn
them on; its --help says so too."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml
from trainer_support import job_document

from kubetune.cli import main
from kubetune.commands.run import ENDPOINTS_OFF
from kubetune_trainer.exitcodes import EXIT_CONFIG

SERVING = re.compile(r"^\[kubetune\] serving (http://127\.0\.0\.1:(\d+))/metrics and \1/progress$")


def _job_file(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _lines(process: subprocess.Popen[str]) -> tuple[queue.Queue[str], threading.Thread]:
    """Every output line, read on a thread so the child never blocks on a full pipe."""
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in process.stdout or []],
                              daemon=True)
    reader.start()
    return lines, reader


def test_help_says_the_endpoints_need_a_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "/metrics" in text and "/progress" in text and "Without --port neither is served" in text


def test_without_a_port_it_says_the_endpoints_are_off(tmp_path: Path, tiny_sd: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    doc = job_document(str(tiny_sd), str(tmp_path / "no-such-data"), str(tmp_path / "out"))
    code = main(["run", str(_job_file(tmp_path, doc)), "--no-progress", "--scratch", str(tmp_path / "scratch")])
    assert code == EXIT_CONFIG  # the line comes before staging, which fails here at once
    out = capsys.readouterr().out
    assert ENDPOINTS_OFF in out and "--port" in ENDPOINTS_OFF and "serving" not in out


@pytest.mark.integration
def test_with_port_0_it_prints_the_urls_of_the_port_it_bound(tmp_path: Path, tiny_sd: Path, squares: Path) -> None:
    doc = job_document(str(tiny_sd), str(squares), str(tmp_path / "out"),
                       output={"checkpointEvery": 100000}, training={"maxSteps": 100000})
    command = [sys.executable, "-m", "kubetune.cli", "run", str(_job_file(tmp_path, doc)), "--port", "0",
               "--no-progress", "--scratch", str(tmp_path / "scratch")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (lines, reader), seen = _lines(process), []
    try:
        while not (match := SERVING.match(seen[-1] if seen else "")):
            seen.append(lines.get(timeout=120))
        assert int(match[2]) > 0 and ENDPOINTS_OFF not in seen
        with urllib.request.urlopen(f"{match[1]}/metrics", timeout=10) as response:
            assert response.status == 200 and b"kubetune_trainer" in response.read()
        with urllib.request.urlopen(f"{match[1]}/progress", timeout=10) as response:
            assert isinstance(json.loads(response.read()), dict)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        reader.join(timeout=30)
        process.stdout.close()  # type: ignore[union-attr]
