"""Many recognizers into one broker, many subscribers out of it; Prometheus metrics from the pipeline's messages."""

from __future__ import annotations

import importlib
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from streamtsm.engine.torch_engine import TorchOnlineEngine
from streamtsm.errors import ConfigError
from streamtsm.sinks.base import StepReport
from streamtsm.sinks.metrics import MetricsSink
from streamtsm.models import create
from streamtsm.pipeline import ModelGroup, Pipeline, PipelineOptions, StreamSpec
from streamtsm.publish import Publisher, Subscriber
from streamtsm.publish.broker import run_broker
from streamtsm.publish.schema import prediction_message, stats_message

from .conftest import randomize_


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
    sink.on_message("streamtsm.pred.cam0", p)
    for frames, dropped in ((10, 2), (25, 5)):
        sink.on_message("streamtsm.stats", stats_message(streams={"cam0": {
            "fps": 12.5, "status": "running", "frames": frames, "dropped": dropped, "reconnects": 1}},
            extra={"publish_dropped": 3}))
    sink.on_step(StepReport(group="tsm", step_ms=20.0, results=()))
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
    sink.on_message("streamtsm.stats", stats_message(streams={"cam9": {"fps": 3.0, "status": "running", "frames": 1,
                                                              "dropped": 0, "reconnects": 0}}))
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'streamtsm_stream_fps{stream="cam9"} 3.0' in body


def test_metrics_without_prometheus_client_is_one_line_naming_the_extra(monkeypatch, capsys):
    from streamtsm.cli import main

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # `import prometheus_client` now fails
    monkeypatch.delitem(sys.modules, "streamtsm.sinks.metrics")
    code = main(["run", "--model", "tsn_mobilenetv2", "--publish", "none", "--max-frames", "1",
                 "--metrics-port", "9100"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install 'streamtsm[metrics]'" in err, err
    with pytest.raises(ConfigError, match=r"pip install 'streamtsm\[metrics\]'"):
        importlib.import_module("streamtsm.sinks.metrics")


def test_metrics_port_in_use_is_a_config_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            MetricsSink().serve(port)


def test_two_groups_of_one_model_keep_apart_in_stats_and_step_metrics():
    def engine(seed):
        model = create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.25, input_size=32, resize_size=36)
        return TorchOnlineEngine(randomize_(model, seed=seed))

    groups = [ModelGroup(engine(1), [StreamSpec("synthetic:64x48@30", "a")]),
              ModelGroup(engine(2), [StreamSpec("synthetic:64x48@30", "b")], clip_stride=2)]
    sink = MetricsSink()
    pipeline = Pipeline.from_groups(groups, sinks=[sink], options=PipelineOptions(max_frames=3))
    stats = pipeline.start().run()
    name = groups[0].engine.model_name
    assert list(stats["models"]) == [name, f"{name}#2"]  # in group order
    assert (stats["streams"]["a"]["group"], stats["streams"]["b"]["group"]) == (name, f"{name}#2")
    for key, m in stats["models"].items():
        assert m["model"] == name and m["steps"] > 0
        assert sink.registry.get_sample_value("streamtsm_model_step_seconds_count", {"model": key}) == m["steps"]


def test_metrics_nonfinite_counter_follows_the_stats_per_stream():
    sink = MetricsSink()
    for bad in (0, 2, 2, 5):
        sink.on_message("streamtsm.stats", stats_message(streams={
            "cam0": {"fps": 10.0, "status": "running", "frames": 9, "dropped": 0, "reconnects": 0, "nonfinite": bad},
            "cam1": {"fps": 10.0, "status": "running", "frames": 9, "dropped": 0, "reconnects": 0, "nonfinite": 0}}))
    get = sink.registry.get_sample_value
    assert get("streamtsm_nonfinite_total", {"stream": "cam0"}) == 5
    assert get("streamtsm_nonfinite_total", {"stream": "cam1"}) == 0


def _event(stream, label, kind):
    from streamtsm.postprocess import ActionEvent
    from streamtsm.publish.schema import event_message

    offset = kind == "offset"
    return event_message(stream_id=stream, model="m", frame_index=5, capture_ts=time.time(), event=ActionEvent(
        kind=kind, label=label, start_frame=1, start_ts=time.time() - 1, end_frame=4 if offset else None,
        end_ts=time.time() if offset else None, score=0.8))


def test_metrics_events_total_counts_by_stream_label_and_kind():
    sink = MetricsSink()
    for stream, label, kind in [("cam0", "waving", "onset"), ("cam0", "waving", "offset"),
                                ("cam0", "waving", "onset"), ("cam1", "clapping", "onset")]:
        sink.on_message(f"streamtsm.event.{stream}", _event(stream, label, kind))
    get = sink.registry.get_sample_value
    assert get("streamtsm_events_total", {"stream": "cam0", "label": "waving", "event": "onset"}) == 2
    assert get("streamtsm_events_total", {"stream": "cam0", "label": "waving", "event": "offset"}) == 1
    assert get("streamtsm_events_total", {"stream": "cam1", "label": "clapping", "event": "onset"}) == 1
    assert get("streamtsm_events_total", {"stream": "cam1", "label": "clapping", "event": "offset"}) is None


def test_metrics_build_info_is_one_labelled_with_the_version():
    import streamtsm

    sink = MetricsSink()
    assert sink.registry.get_sample_value("streamtsm_build_info", {"version": streamtsm.__version__}) == 1


def test_metrics_server_answers_healthz_and_readyz_from_the_stats():
    sink = MetricsSink()
    server = sink.serve(0)
    base = f"http://127.0.0.1:{server.port}"

    def status(path):
        try:
            with urllib.request.urlopen(base + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    try:
        assert status("/healthz")[0] == 200
        assert status("/readyz")[0] == 503  # no stats yet: no stream known to run
        sink.on_message("streamtsm.stats", stats_message(streams={"cam0": {
            "fps": 3.0, "status": "reconnecting", "frames": 1, "dropped": 0, "reconnects": 1}}))
        code, body = status("/readyz")
        assert code == 503 and b'"cam0": "reconnecting"' in body
        sink.on_message("streamtsm.stats", stats_message(streams={"cam0": {
            "fps": 3.0, "status": "running", "frames": 2, "dropped": 0, "reconnects": 1}}))
        assert status("/readyz")[0] == 200
        assert status("/")[0] == 404  # metrics only: no page
    finally:
        sink.close()
    with pytest.raises(OSError):  # close() stopped the server
        urllib.request.urlopen(base + "/healthz", timeout=5)
