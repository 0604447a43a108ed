"""The benchmark tools' own parts that a wrong figure could hide in: the web client of tools/bench_views.py, which
stands in for a browser, really reads the page, the MJPEG frames and the events, and reports them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from streamtsm.capture import Frame
from streamtsm.publish.schema import stats_message
from streamtsm.sinks.base import StepReport, StreamResult
from streamtsm.web import WebServer
from streamtsm.web.sink import WebSink

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_views.py"
TIMEOUT = 20.0  # a generous bound on any wait: the test asserts what happens, never how fast


def test_bench_views_client_counts_frames_and_events():
    sink = WebSink(max_fps=50.0)
    server = WebServer(0, view=sink).start()
    stop = threading.Event()

    def feed():  # a stream that appears only after the client started: it must retry the 404, as the page does
        i = 0
        while not stop.is_set():
            image = np.full((48, 64, 3), i % 255, np.uint8)
            sink.on_step(StepReport("m", 1.0, (StreamResult("cam", Frame("cam", i, time.time(), image),
                                                            [("a", 0.9)]),)))
            sink.on_message("streamtsm.stats", stats_message(streams={"cam": {
                "fps": 10.0, "status": "running", "frames": i, "dropped": 0, "reconnects": 0}}))
            i += 1
            stop.wait(0.02)

    client = subprocess.Popen([sys.executable, str(TOOL), "--client", server.url + "cam"], stdout=subprocess.PIPE,
                              text=True)
    feeder = threading.Thread(target=feed, daemon=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        feeder.start()
        deadline = time.monotonic() + TIMEOUT
        while sink.stats()["frames_encoded"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # let the newest frames and records reach the client
        client.send_signal(signal.SIGTERM)
        counts = json.loads(client.communicate(timeout=TIMEOUT)[0])
    finally:
        stop.set()
        if client.poll() is None:
            client.kill()
        server.close()
        sink.close()
    assert counts["page_bytes"] > 0
    assert counts["frames_status"] == 200 and counts["frames"] >= 2
    assert counts["events_status"] == 200 and counts["events"] >= 2
    assert counts["frames_bytes"] > counts["frames"] * 100  # whole JPEGs came through, not just the boundaries
