"""Headless Chromium, driven over the DevTools protocol on a pipe, for tests that open a page as a person would.

Why a pipe and not Selenium or a websocket: `--remote-debugging-pipe` speaks the Chrome DevTools Protocol
(null-terminated JSON) on the browser's file descriptors 3 and 4, so nothing listens on any port, not even
loopback, and no driver binary or Python package has to match the browser's version. The browser is
Debian's `chromium` (`make tools` installs it), started headless with a fresh profile per instance.

A page opened here records what a test needs to judge it offline: every URL it requested, and every
console error, uncaught exception and browser log entry at level error.

    with Chromium(tmp_path / "chromium") as browser:
        page = browser.open(path.as_uri())
        assert page.remote_requests() == [] and page.errors == []
        page.evaluate("document.images.length")

`python -m tests.headless_chromium PAGE.html OUT.png` saves a screenshot of a page (docs/report.png).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# What a self-contained page opened from disk may load: itself, files beside it, embedded data.
LOCAL_SCHEMES = frozenset({"file", "data"})

FLAGS = (
    "--headless", "--no-sandbox",  # the sandbox needs user namespaces or a setuid helper; tests run as root
    "--remote-debugging-pipe", "--no-first-run", "--no-default-browser-check", "--disable-dev-shm-usage",
    # Nothing of the browser's own may go on the network either (updates, sync, safe browsing, metrics).
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-default-apps", "--no-pings", "--metrics-recording-only", "--hide-scrollbars", "--mute-audio",
)


class BrowserError(RuntimeError):
    """The browser failed, answered a command with an error, or did not answer in time."""


class Chromium:
    """One headless browser process and its DevTools pipe; a context manager that always ends the process."""

    def __init__(self, profile: Path, binary: str | None = None, timeout: float = 60.0) -> None:
        self.profile = Path(profile)
        self.binary = binary or shutil.which("chromium")
        self.timeout = timeout
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict[str, Any]] = []

    def __enter__(self) -> Chromium:
        if self.binary is None:
            raise BrowserError("chromium is not installed: `make tools` installs it (Debian package chromium)")
        self.profile.mkdir(parents=True, exist_ok=True)
        # The browser reads commands on fd 3 and writes answers on fd 4. The pipes are handed over as the shell's
        # stdin and stdout and moved there by `exec` (no preexec_fn: the test process runs torch's threads).
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self._stderr = (self.profile.parent / f"{self.profile.name}.stderr").open("wb")
        command = [*FLAGS, f"--user-data-dir={self.profile}", "about:blank"]
        self._proc = subprocess.Popen(["/bin/sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2',
                                       self.binary, *command],
                                      stdin=to_browser_r, stdout=from_browser_w, stderr=self._stderr,
                                      start_new_session=True)  # its renderers and helpers end with it
        os.close(to_browser_r)
        os.close(from_browser_w)
        try:
            self.send("Browser.getVersion")
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        try:
            if self._proc.poll() is None:
                self._write({"id": self._new_id(), "method": "Browser.close"})
                self._proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=15)
        finally:
            for fd in (self._to_browser, self._from_browser):
                os.close(fd)
            self._stderr.close()

    def open(self, url: str, width: int = 1200, height: int = 900) -> Page:
        """A new tab that has loaded `url` (its load event fired), recording from before the first request."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self.send("Page.setLifecycleEventsEnabled", {"enabled": True}, session=session)
        answer = self.send("Page.navigate", {"url": url}, session=session)
        if answer.get("errorText"):
            raise BrowserError(f"{url} did not open: {answer['errorText']}")
        # Network idle (nothing in flight for 500 ms) comes after the load event, so what the page's scripts
        # fetch or log once loaded is recorded too.
        self.wait_for("Page.lifecycleEvent", session,
                      lambda p: p["name"] == "networkIdle" and p["loaderId"] == answer["loaderId"])
        return page

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept for `events`."""
        message: dict[str, Any] = {"id": self._new_id(), "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._write(message)
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read(deadline, method)
            if answer.get("id") == message["id"]:
                if "error" in answer:
                    raise BrowserError(f"{method} failed: {answer['error']}")
                return answer.get("result", {})
            if "method" in answer:
                self._events.append(answer)

    def wait_for(self, event: str, session: str,
                 matches: Callable[[dict[str, Any]], bool] = lambda params: True) -> dict[str, Any]:
        """Block until an `event` for `session` whose params `matches` has arrived (it may have already)."""
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            for message in self._events[seen:]:
                if message["method"] == event and message.get("sessionId") == session and matches(message["params"]):
                    return message["params"]
            seen = len(self._events)
            message = self._read(deadline, event)
            if "method" in message:
                self._events.append(message)

    def events(self, session: str) -> list[dict[str, Any]]:
        return [m for m in self._events if m.get("sessionId") == session]

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _write(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data):]

    def _read(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(left, 0))
            if not ready:
                raise BrowserError(f"chromium sent no {waiting_for} within {self.timeout:.0f} s{self._stderr_tail()}")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium exited (code {self._proc.poll()}) while we waited for {waiting_for}"
                                   f"{self._stderr_tail()}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def _stderr_tail(self) -> str:
        self._stderr.flush()
        text = Path(self._stderr.name).read_text(errors="replace").strip()
        return f"; its stderr ends:\n{text[-2000:]}" if text else ""


class Page:
    """One tab: what it requested and logged, a way to run JavaScript in it, and a screenshot."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self._browser = browser
        self._session = session

    @property
    def requested(self) -> list[str]:
        """Every URL the tab asked for (documents, images, scripts, styles, fonts, fetches), in order."""
        return [e["params"]["request"]["url"] for e in self._events("Network.requestWillBeSent")] + [
            e["params"]["url"] for e in self._events("Network.webSocketCreated")]

    def remote_requests(self) -> list[str]:
        """The requested URLs that are neither file: nor data: (a self-contained page asks for nothing else)."""
        return [url for url in self.requested if urlsplit(url).scheme not in LOCAL_SCHEMES]

    @property
    def errors(self) -> list[str]:
        """console.error/assert calls, uncaught exceptions and browser log entries at level error
        (a resource that failed to load, a refused request, a blocked script)."""
        found = []
        for event in self._browser.events(self._session):
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append("console." + params["type"] + ": " + " ".join(
                    str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])))
            elif event["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append("exception: " + details.get("exception", {}).get("description", details["text"]))
            elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"log ({entry['source']}): {entry['text']} {entry.get('url', '')}".strip())
        return found

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited), as JSON would carry it."""
        answer = self._browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                         "awaitPromise": True}, session=self._session)
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            raise BrowserError(f"{expression!r} threw: {details.get('exception', {}).get('description', details)}")
        return answer["result"].get("value")

    def screenshot(self, width: int | None = None, until: str | None = None) -> bytes:
        """A PNG of the whole page (not only the viewport), or from its top to the bottom of the element that
        CSS selector `until` picks; at CSS pixel size or scaled to `width` pixels."""
        size = self._browser.send("Page.getLayoutMetrics", session=self._session)["cssContentSize"]
        height = size["height"]
        if until:
            height = self.evaluate(f"document.querySelector({json.dumps(until)}).getBoundingClientRect().bottom"
                                   " + window.scrollY + 16")
        scale = width / size["width"] if width else 1.0
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(height, size["height"]), "scale": scale}
        shot = self._browser.send("Page.captureScreenshot", {"format": "png", "clip": clip,
                                                             "captureBeyondViewport": True}, session=self._session)
        return base64.b64decode(shot["data"])

    def _events(self, method: str) -> list[dict[str, Any]]:
        return [e for e in self._browser.events(self._session) if e["method"] == method]


def main() -> None:
    parser = argparse.ArgumentParser(description="Save a screenshot of a local HTML page with headless Chromium.")
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1200, help="viewport width in CSS pixels (default 1200)")
    parser.add_argument("--scale-to", type=int, help="scale the picture to this many pixels wide")
    parser.add_argument("--until", help="CSS selector: the picture ends below this element (default: the whole page)")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as scratch, Chromium(Path(scratch) / "profile") as browser:
        page = browser.open(args.page.resolve().as_uri(), width=args.width)
        for line in page.errors + [f"remote request: {url}" for url in page.remote_requests()]:
            print(line)
        args.png.write_bytes(page.screenshot(width=args.scale_to, until=args.until))
    print(f"{args.png}: {args.png.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
