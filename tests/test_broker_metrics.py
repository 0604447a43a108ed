"""Many recognizers into one broker, many subscribers out of it; Prometheus metrics from the pipeline's messages."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from streamtsm.metrics import MetricsSink
from streamtsm.publish import Publisher, Subscriber
from streamtsm.publish.broker import run_broker
from streamtsm.publish.schema import prediction_message, stats_message


@pytest.fixture
def broker(tmp_path):
    front, back = f"ipc://{tmp_path}/front", f"ipc://{tmp_path}/back"
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=run_broker, args=(front, back), kwargs={"stop": stop, "ready": ready})
    thread.start()
    assert ready.wait(5)
    yield front, back
    stop.set()
    thread.join(5)
    assert not thread.is_alive(), "the broker stops when asked"


def _pred(stream, frame):
    return prediction_message(stream_id=stream, frame_index=frame, capture_ts=time.time(), model="m",
                              topk=[("a", 0.9)])


def test_two_recognizers_reach_two_subscribers_through_the_broker(broker):
    front, back = broker
    pubs = [Publisher(front, bind=False), Publisher(front, bind=False)]
    subs = [Subscriber(back, ["streamtsm.pred"]), Subscriber(back, ["streamtsm.pred.cam1"])]
    try:
        received = [set(), set()]
        deadline = time.monotonic() + 10
        frame = 0
        # Keep sending until both subscribers have heard both recognizers (subscriptions take a moment to
        # travel upstream through the proxy).
        while time.monotonic() < deadline and not (len(received[0]) == 2 and received[1] == {"cam1"}):
            frame += 1
            pubs[0].send("streamtsm.pred.cam0", _pred("cam0", frame))
            pubs[1].send("streamtsm.pred.cam1", _pred("cam1", frame))
            for i, sub in enumerate(subs):
                while (msg := sub.recv(timeout=0.01)) is not None:
                    received[i].add(msg[1]["stream"])
        assert received[0] == {"cam0", "cam1"}
        assert received[1] == {"cam1"}, "prefix filtering happens through the broker"
    finally:
        for x in pubs + subs:
            x.close()


def test_metrics_follow_predictions_and_stats():
    sink = MetricsSink()
    p = _pred("cam0", 1)
    p["latency_ms"] = 40.0
    sink("streamtsm.pred.cam0", p)
    for frames, dropped in ((10, 2), (25, 5)):
        sink("streamtsm.stats", stats_message(streams={"cam0": {
            "fps": 12.5, "status": "running", "frames": frames, "dropped": dropped, "reconnects": 1}},
            extra={"publish_dropped": 3}))
    sink.observe_step("tsm", 20.0)
    get = sink.registry.get_sample_value
    assert get("streamtsm_stream_fps", {"stream": "cam0"}) == 12.5
    assert get("streamtsm_stream_frames_total", {"stream": "cam0"}) == 25
    assert get("streamtsm_stream_dropped_frames_total", {"stream": "cam0"}) == 5
    assert get("streamtsm_stream_reconnects_total", {"stream": "cam0"}) == 1
    assert get("streamtsm_capture_to_publish_seconds_count", {"stream": "cam0"}) == 1
    assert get("streamtsm_capture_to_publish_seconds_bucket", {"stream": "cam0", "le": "0.05"}) == 1
    assert get("streamtsm_model_step_seconds_count", {"model": "tsm"}) == 1
    assert get("streamtsm_publish_dropped_messages_total") == 3


def test_metrics_are_served_over_http_on_loopback():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = MetricsSink()
    sink.serve(port)
    sink("streamtsm.stats", stats_message(streams={"cam9": {"fps": 3.0, "status": "running", "frames": 1,
                                                              "dropped": 0, "reconnects": 0}}))
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'streamtsm_stream_fps{stream="cam9"} 3.0' in body
