"""Start, watch and stop the control-plane processes of one test cluster.

Each component runs in its own process group, and its pid, executable and port
are written to ``state.json`` in the cluster's state dir the moment it starts, so
that ``cluster-down`` (another process) or a crashed run's successor can stop
exactly what was started: by recorded pid, checked against /proc, never by name.
When the caller asks (the pytest fixture does), components also get SIGTERM if the
starting process dies, so a killed test run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from clusterpki import Pki

PR_SET_PDEATHSIG = 1
STOP_GRACE_SECONDS = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the starting thread exits."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _cmdline(pid: int) -> list[str]:
    """The argv of a live, non-zombie process, or [] when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return []
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except (OSError, IndexError):
        return []


class ComponentExited(RuntimeError):
    """A component died before it was ready; its log tail is the message."""

    @property
    def port_taken(self) -> bool:
        return "address already in use" in str(self)


class ProcessSet:
    """The components of one cluster, recorded in ``<state_dir>/state.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.tie_to_parent = False
        self.started_at = time.monotonic()
        self._children: dict[str, subprocess.Popen] = {}

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def _state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {"ports": {}, "components": {}}

    def _save(self, state: dict) -> None:
        self.state_file.write_text(json.dumps(state, indent=2))

    def allocate_ports(self, names: Iterable[str]) -> None:
        state = self._state()
        state["ports"] = {name: free_port() for name in names}
        self._save(state)

    def ports(self) -> dict[str, int]:
        return self._state()["ports"]

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start one component in its own process group, logging to ``<name>.log``."""
        with open(self.state_dir / f"{name}.log", "ab") as log:
            child = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.state_dir, start_new_session=True, env=env,
                preexec_fn=_die_with_parent if self.tie_to_parent else None)
        self._children[name] = child
        state = self._state()
        state["components"][name] = {"pid": child.pid, "exe": argv[0]}
        self._save(state)

    def _alive(self, name: str, record: dict) -> bool:
        child = self._children.get(name)
        if child is not None and child.poll() is not None:
            return False
        argv = _cmdline(record["pid"])
        return bool(argv) and argv[0] == record["exe"]

    def pids(self) -> dict[str, int]:
        """Each component's process id."""
        return {name: record["pid"] for name, record in self._state()["components"].items()}

    def liveness(self) -> dict[str, bool]:
        return {name: self._alive(name, record)
                for name, record in self._state()["components"].items()}

    def all_alive(self) -> bool:
        alive = self.liveness()
        return bool(alive) and all(alive.values())

    def log_tail(self, name: str, lines: int = 25) -> str:
        try:
            text = (self.state_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, name: str, ready: Callable[[], bool], timeout: float = 60) -> None:
        """Poll ``ready``; fail fast with the log tail if the component dies."""
        record = self._state()["components"][name]
        deadline = time.monotonic() + timeout
        while not ready():
            if not self._alive(name, record):
                raise ComponentExited(f"{name} exited during start-up:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready after {timeout:.0f}s:\n"
                                   f"{self.log_tail(name)}")
            time.sleep(0.2)
        print(f"[up] {name} ready (+{time.monotonic() - self.started_at:.1f}s)", flush=True)

    def stop_all(self) -> None:
        """Stop components in reverse start order: SIGTERM the group, then SIGKILL."""
        components = self._state()["components"]
        for name in reversed(list(components)):
            self._stop(name, components[name])
        self._children.clear()

    def _stop(self, name: str, record: dict) -> None:
        if self._alive(name, record):
            _signal_group(record["pid"], signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            while self._alive(name, record) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._alive(name, record):
                _signal_group(record["pid"], signal.SIGKILL)
        child = self._children.get(name)
        if child is not None:
            child.wait(timeout=STOP_GRACE_SECONDS)


def start_server(argv: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A server beside the control plane, in its own process group, output to `log`, SIGTERMed if this
    thread's process dies (`stop_server` ends it)."""
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True, preexec_fn=_die_with_parent)


def stop_server(process: subprocess.Popen[bytes], grace_seconds: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM a `start_server` process group, then SIGKILL it after the grace period."""
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except urllib.error.HTTPError as error:
        error.close()
        return False
    except OSError:
        return False


def https_ready(url: str, pki: Pki) -> bool:
    """GET ``url`` verifying the serving cert and presenting the admin client cert."""
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return http_ok(url, context)


def https_ok_insecure(url: str) -> bool:
    """For /healthz of components that serve a self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return http_ok(url, context)


def run_checked(argv: list[str], stdin: str | None = None) -> str:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")
    return result.stdout
