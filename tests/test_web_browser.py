"""The web view in a real browser: headless Chromium (Debian's package) loads the page of a live `streamtsm run` on
the synthetic scene, and the stream's image updates and an action event appears in the list.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages ending in NUL on
file descriptors 3 and 4), so the test needs no driver package and no browser download. Set
``STREAMTSM_WEB_SCREENSHOT=PATH`` to keep a screenshot of the page (docs/web.png is made so).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT = 90.0  # generous bounds on waits; nothing here asserts how fast

if CHROMIUM is None:
    if os.environ.get("CI"):  # tools/setup.sh installs it: in CI a missing browser is a failure, not a skip
        pytest.fail("chromium is not installed (tools/setup.sh installs Debian's chromium)", pytrace=False)
    pytest.skip("no chromium on this machine (Debian: apt-get install chromium)", allow_module_level=True)


class Chromium:
    """Headless Chromium with the DevTools protocol on a pipe; :meth:`evaluate` and :meth:`screenshot` act on the
    one page it opened."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--remote-debugging-pipe", "--window-size=1280,860")

    def __init__(self, url: str, profile: str) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The protocol pipe is fd 3 (commands in) and fd 4 (replies out) of the browser: bash puts them there (dash
        # takes single-digit fds only).
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}', "bash", CHROMIUM, *self.FLAGS,
             f"--user-data-dir={profile}", url],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._replies: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + TIMEOUT
        while True:
            pages = [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert pages, "chromium opened no page"
        self.session = self.call("Target.attachToTarget", targetId=pages[0]["targetId"], flatten=True)["sessionId"]

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._replies.put(json.loads(message))
        self._replies.put(None)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        call_id = next(self._ids)
        message = {"id": call_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            pytest.fail(f"chromium exited ({self.proc.wait()}): {self.proc.stderr.read().decode()[-2000:]}")
        while True:
            reply = self._replies.get(timeout=TIMEOUT)
            assert reply is not None, f"chromium closed the pipe: {self.proc.stderr.read().decode()[-2000:]}"
            if reply.get("id") == call_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        return None if "exceptionDetails" in result else result["result"].get("value")

    def screenshot(self, clip: dict | None = None) -> bytes:
        params = {"format": "png"} if clip is None else {"format": "png", "clip": {**clip, "scale": 1}}
        return base64.b64decode(self.call("Page.captureScreenshot", self.session, **params)["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(10)
        except (AssertionError, OSError, queue.Empty, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_browser)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(what: str, check, deadline: float):
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def live_run(tmp_path):
    """`streamtsm run` on the synthetic scene with the web view on a free port; yields the page's URL."""
    port = _free_port()
    # Not --quiet, which drops the start lines; stdout (a line per prediction) goes to a file no one must drain.
    stdout = open(tmp_path / "run.out", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "streamtsm.cli", "run", "--source", "synthetic", "--publish", "none",
                             "--http-port", str(port), "--duration", "300"],
                            stdout=stdout, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"

    def ready():
        assert proc.poll() is None, f"run exited: {proc.stderr.read()}"
        try:
            with urllib.request.urlopen(url + "readyz", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    try:
        _wait_for("the run's web view to be ready", ready, time.monotonic() + TIMEOUT)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        stdout.seek(0)
        out = stdout.read()
        stdout.close()
    assert proc.returncode == 0, err
    assert f"serving the web view (health: /healthz, /readyz) at {url}" in err
    assert "web view:" in out


def test_web_page_in_headless_chromium_shows_a_live_image_and_events(live_run, tmp_path):
    with tempfile.TemporaryDirectory(dir=tmp_path) as profile:
        browser = Chromium(live_run, profile)
        try:
            deadline = time.monotonic() + TIMEOUT
            # The stream's card appears (from the event stream) and its MJPEG image decodes.
            _wait_for("the stream's image", lambda: browser.evaluate(
                "(() => { const i = document.querySelector('.stream img');"
                " return !!i && i.naturalWidth > 0; })()"), deadline)
            rect = browser.evaluate(
                "(() => { const r = document.querySelector('.stream img').getBoundingClientRect();"
                " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()")
            first = browser.screenshot(rect)
            _wait_for("the image to change", lambda: browser.screenshot(rect) != first, deadline)
            # The demo model on the synthetic scene starts actions within seconds: one shows in the list.
            text = _wait_for("an event in the list", lambda: browser.evaluate(
                "(() => { const li = document.querySelector('#events li');"
                " return li ? li.textContent : null; })()"), deadline)
            assert "synthetic onset" in text or "synthetic offset" in text, text
            topk = browser.evaluate("document.querySelectorAll('.stream .topk li').length")
            assert topk >= 1, "the top-k is listed"
            status = browser.evaluate("document.querySelector('.stream .status').textContent")
            assert status == "running"
            if os.environ.get("STREAMTSM_WEB_SCREENSHOT"):
                time.sleep(3)  # a few more events in the list, for the picture
                with open(os.environ["STREAMTSM_WEB_SCREENSHOT"], "wb") as f:
                    f.write(browser.screenshot())
        finally:
            browser.close()
