"""The live web view's server, against a real HTTP client on 127.0.0.1: the page, MJPEG, Server-Sent Events,
health and readiness; a stalled browser never holds up the sink; close() ends open responses."""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from streamtsm.capture import Frame
from streamtsm.cli import main
from streamtsm.postprocess import ActionEvent
from streamtsm.publish.schema import event_message, prediction_message, stats_message
from streamtsm.sinks.base import StepReport, StreamResult
from streamtsm.web import WebServer
from streamtsm.web.sink import WebSink

TIMEOUT = 10.0  # a generous bound on any wait: the tests assert what happens, never how fast


@pytest.fixture
def web():
    sink = WebSink(max_fps=50.0)
    server = WebServer(0, view=sink).start()
    yield sink, server
    server.close()
    sink.close()


def _step(sink: WebSink, stream: str, image: np.ndarray, index: int = 0) -> None:
    frame = Frame(stream, index, time.time(), image)
    sink.on_step(StepReport("m", 1.0, (StreamResult(stream, frame, [("a", 0.9)]),)))


def _image(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : (i * 7) % w] = (0, 200, 255)  # a bar that grows from frame to frame
    return image


def _stats(**statuses: str) -> dict:
    return stats_message(streams={sid: {"fps": 10.0, "status": status, "frames": 1, "dropped": 0, "reconnects": 0}
                                  for sid, status in statuses.items()})


def _get(server: WebServer, path: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(f"{server.url.rstrip('/')}{path}", timeout=TIMEOUT) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _feed_frames(sink: WebSink, stream: str, stop: threading.Event, **size) -> threading.Thread:
    def feed():
        i = 0
        while not stop.is_set():
            _step(sink, stream, _image(i, **size), i)
            i += 1
            stop.wait(0.01)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def _read_mjpeg_parts(resp: http.client.HTTPResponse, count: int) -> list[bytes]:
    """Reads ``count`` JPEG parts of a multipart/x-mixed-replace body by their Content-Length."""
    parts = []
    while len(parts) < count:
        line = resp.readline()
        assert line, "the MJPEG stream ended early"
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
            assert resp.readline() == b"\r\n"
            parts.append(resp.read(length))
    return parts


def test_web_page_is_served_and_names_its_endpoints(web):
    _, server = web
    status, headers, body = _get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert "new EventSource(\"/events\")" in page and "/video/" in page and 'id="events"' in page


def test_web_unknown_path_and_unknown_stream_are_404(web):
    sink, server = web
    assert _get(server, "/nothing")[0] == 404
    assert _get(server, "/video/nobody.mjpg")[0] == 404
    assert _get(server, "/metrics")[0] == 404  # no registry given: no metrics


def test_web_mjpeg_frames_parse_as_jpeg_and_change_over_time(web):
    sink, server = web
    _step(sink, "cam0", _image(0))
    stop = threading.Event()
    feeder = _feed_frames(sink, "cam0", stop)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/video/cam0.mjpg")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type").startswith("multipart/x-mixed-replace; boundary=")
        parts = _read_mjpeg_parts(resp, 6)
    finally:
        conn.close()
        stop.set()
        feeder.join(TIMEOUT)
    images = [cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR) for p in parts]
    assert all(im is not None and im.shape == (48, 64, 3) for im in images)
    assert any(not np.array_equal(images[0], im) for im in images[1:]), "the frames change as the stream moves"
    assert sink.stats()["frames_encoded"] >= 6


def test_web_jpegs_are_encoded_only_while_someone_watches(web):
    sink, _ = web
    for i in range(20):
        _step(sink, "cam0", _image(i), i)
    time.sleep(0.3)  # the encoder would have had time to encode; it must not have
    assert sink.stats()["frames_encoded"] == 0


def _sse_records(resp: http.client.HTTPResponse):
    """Yields ``(event, data)`` of each Server-Sent Events record."""
    event, data = "message", []
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.rstrip(b"\r\n").decode()
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line.startswith("event: "):
            event = line[7:]


def test_web_sse_delivers_event_messages_as_on_the_wire_with_nan_as_null(web):
    sink, server = web
    sink.on_message("streamtsm.stats", _stats(cam0="running"))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/events")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
        records = _sse_records(resp)
        kind, data = next(records)
        assert kind == "message" and json.loads(data)["type"] == "stats"  # the newest stats, replayed at connect
        onset = ActionEvent(kind="onset", label="waving", start_frame=10, start_ts=time.time(), end_frame=None,
                            end_ts=None, score=math.nan)
        event = event_message(stream_id="cam0", model="m", frame_index=12, capture_ts=time.time(), event=onset)
        sink.on_message("streamtsm.event.cam0", event)
        got = next(json.loads(d) for k, d in records if k == "message" and json.loads(d)["type"] == "event")
    finally:
        conn.close()
    assert got == {**event, "score": None}  # the payload of the ZeroMQ message, NaN sent as null


def test_web_sse_replays_recent_events_to_a_page_that_connects_late(web):
    sink, server = web
    for i in range(3):
        sink.on_message("streamtsm.event.cam0", event_message(
            stream_id="cam0", model="m", frame_index=i, capture_ts=time.time(),
            event=ActionEvent(kind="onset", label=f"a{i}", start_frame=i, start_ts=time.time(), end_frame=None,
                              end_ts=None, score=0.9)))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/events")
        records = _sse_records(conn.getresponse())
        labels = [json.loads(next(records)[1])["label"] for _ in range(3)]
    finally:
        conn.close()
    assert labels == ["a0", "a1", "a2"]


def test_web_healthz_is_200_and_readyz_503_until_every_stream_runs(web):
    sink, server = web
    assert _get(server, "/healthz")[0] == 200
    status, _, body = _get(server, "/readyz")
    assert status == 503 and json.loads(body)["reason"] == "no stats yet"
    sink.on_message("streamtsm.stats", _stats(cam0="running", cam1="connecting"))
    status, headers, body = _get(server, "/readyz")
    assert status == 503 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["not_ready"] == {"cam1": "connecting"}
    sink.on_message("streamtsm.stats", _stats(cam0="running", cam1="running"))
    status, _, body = _get(server, "/readyz")
    assert status == 200 and json.loads(body) == {"ready": True, "streams": {"cam0": "running", "cam1": "running"},
                                                  "not_ready": {}}
    sink.on_message("streamtsm.stats", _stats(cam0="ended", cam1="running"))
    assert _get(server, "/readyz")[0] == 503


def _stalled_mjpeg_client(port: int, path: str) -> socket.socket:
    """A client that asks for a stream and never reads: a small receive buffer fills after a frame or two."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


def test_web_stalled_client_never_blocks_the_sink_and_its_missed_frames_are_counted():
    sink = WebSink(max_fps=50.0, queue_size=16)
    server = WebServer(0, view=sink).start()
    many = {f"cam{i}": "running" for i in range(200)}  # a large site's stats: ~20 kB a message
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)  # ~300 kB JPEGs: fill any buffer
    _step(sink, "cam0", noise)
    stalled = _stalled_mjpeg_client(server.port, "/video/cam0.mjpg")
    events = _stalled_mjpeg_client(server.port, "/events")
    try:
        deadline = time.monotonic() + TIMEOUT
        while sink.stats()["viewers"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)

        calls_done = threading.Event()

        def pipeline():
            for i in range(2000):  # enough to fill any socket buffer; ends once both kinds of drop are seen
                stats = sink.stats()
                if i >= 100 and stats["frames_dropped"] and stats["messages_dropped"]:
                    break
                _step(sink, "cam0", np.roll(noise, i, axis=1), i)
                sink.on_message("streamtsm.pred.cam0", prediction_message(
                    stream_id="cam0", frame_index=i, capture_ts=time.time(), model="m", topk=[("a", 0.5)]))
                sink.on_message("streamtsm.stats", _stats(**many))
                time.sleep(0.005)
            calls_done.set()

        thread = threading.Thread(target=pipeline, daemon=True)
        thread.start()
        thread.join(60)
        assert calls_done.is_set(), "the sink's calls returned while a client was stalled"
        while sink.stats()["frames_dropped"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = sink.stats()
        assert stats["viewers"] == 1 and stats["frames_dropped"] > 0, stats
        assert stats["messages_dropped"] > 0, stats  # the page's queue overflowed
    finally:
        stalled.close()
        events.close()
        server.close()
        sink.close()


def test_web_close_ends_open_responses_promptly_and_frees_the_port(web):
    sink, server = web
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)
    _step(sink, "cam0", noise)
    stop = threading.Event()
    feeder = _feed_frames(sink, "cam0", stop, h=480, w=640)
    stalled = _stalled_mjpeg_client(server.port, "/video/cam0.mjpg")
    readers = []
    for path in ("/video/cam0.mjpg", "/events"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read(10)  # the response has started
        readers.append((conn, resp))
    try:
        deadline = time.monotonic() + TIMEOUT
        while sink.stats()["frames_dropped"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # the stalled client is now blocked in a write
        closer = threading.Thread(target=server.close)
        closer.start()
        closer.join(TIMEOUT)
        assert not closer.is_alive(), "close() returned with clients connected"
        for _, resp in readers:
            with _ends():
                while resp.read(65536):  # every open response ends: EOF, not the client's timeout
                    pass
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    finally:
        stop.set()
        feeder.join(TIMEOUT)
        stalled.close()
        for conn, _ in readers:
            conn.close()


class _ends:
    """A response that ends may end cleanly or be reset; only a client-side timeout means it did not end."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, (ConnectionError, http.client.IncompleteRead))


# -- the command line --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, message", [
    (["--http-port", "0"], "--http-port must be >= 1 and <= 65535"),
    (["--http-port", "70000"], "--http-port must be >= 1 and <= 65535"),
    (["--http-addr", "0.0.0.0"], "--http-addr 0.0.0.0 needs a port: give --http-port PORT"),
    (["--http-port", "9100", "--metrics-port", "9100", "--http-addr", "0.0.0.0"],
     "one server then serves the page and /metrics, on one address"),
])
def test_run_http_options_out_of_range_or_inconsistent_are_one_line_and_exit_2(capsys, argv, message):
    code = main(["run", "--publish", "none", "--max-frames", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_run_http_port_in_use_is_one_line_and_exit_2(capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = main(["run", "--publish", "none", "--model", "tsn_mobilenetv2", "--http-port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot serve the web view on 127.0.0.1:{port}" in err


def test_run_http_and_metrics_on_one_port_are_one_server(capsys):
    """With --http-port equal to --metrics-port, one server answers the page, /metrics and the health checks."""
    port = _free_port()
    got = {}

    def client():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=TIMEOUT) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        for path in ("/", "/metrics", "/healthz", "/readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT) as r:
                got[path] = (r.status, r.read().decode())
        os.kill(os.getpid(), signal.SIGINT)  # run's handler stops it cleanly

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    code = main(["run", "--source", "synthetic:64x48@30", "--model", "tsm_mobilenetv2_online", "--publish", "none",
                 "--quiet", "--duration", "60", "--http-port", str(port), "--metrics-port", str(port)])
    thread.join(TIMEOUT)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"serving the web view and /metrics (health: /healthz, /readyz) at http://127.0.0.1:{port}/" in captured.err
    assert captured.err.count(f":{port}") == 1, "one server, one line"
    assert got["/"][0] == 200 and "EventSource" in got["/"][1]
    assert got["/metrics"][0] == 200 and "streamtsm_build_info" in got["/metrics"][1]
    assert got["/healthz"][0] == 200 and got["/readyz"][0] == 200
    assert "web view:" in captured.out and "dropped for slow clients" in captured.out
