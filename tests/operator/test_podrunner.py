"""The pod runner's process bookkeeping: a pod's processes are found the way a cgroup holds them,
including children that left the pod's session (as torchrun's workers do), and killed together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from podrunner import POD_MARKER_ENV, exit_code, kill_processes, pod_processes

CHILD_IN_ITS_OWN_SESSION = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
    "time.sleep(60)\n"
)


def test_every_process_of_a_pod_is_found_and_killed() -> None:
    marker = uuid.uuid4().hex
    env = {**os.environ, POD_MARKER_ENV: marker}
    main = subprocess.Popen([sys.executable, "-c", CHILD_IN_ITS_OWN_SESSION], env=env, start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # not the pod's
    try:
        deadline = time.monotonic() + 30
        while len(pod_processes(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = pod_processes(marker)
        assert main.pid in found and len(found) == 2 and other.pid not in found
        kill_processes(marker, signal.SIGKILL)
        assert main.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while pod_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pod_processes(marker) == []
        assert other.poll() is None
    finally:
        kill_processes(marker, signal.SIGKILL)
        other.kill()
        other.wait()
        main.wait()


@pytest.mark.parametrize(("returncode", "code"), [(0, 0), (76, 76), (-signal.SIGKILL, 137), (-signal.SIGTERM, 143)])
def test_exit_codes_read_as_the_kubelet_reports_them(returncode: int, code: int) -> None:
    assert exit_code(returncode) == code
