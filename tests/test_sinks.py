"""Sinks: the protocol the pipeline hands results to, a blocking sink behind a bounded queue on its own thread, and
the --show window as such a sink."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from streamtsm.capture import Frame
from streamtsm.engine.torch_engine import TorchOnlineEngine
from streamtsm.errors import ConfigError
from streamtsm.models import create
from streamtsm.pipeline import Pipeline, PipelineOptions, StreamSpec
from streamtsm.sinks import CallbackSink, QueuedSink, StepReport, StreamResult
from streamtsm.sinks.annotated import AnnotatingSink

from .conftest import randomize_

WAIT_S = 5.0


class Recorder:
    """A sink that records what it gets, in order; ``gate`` (when given) holds every call until it is set."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.entered = threading.Event()
        self.items: list = []
        self.closed_in: str | None = None

    def _take(self, item) -> None:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.items.append(item)

    def on_message(self, topic: str, payload: dict) -> None:
        self._take(("message", payload.get("n", payload.get("type"))))

    def on_step(self, step: StepReport) -> None:
        self._take(("step", step.group))

    def close(self) -> None:
        self.closed_in = threading.current_thread().name


class MessagesOnly:
    def __init__(self) -> None:
        self.items: list = []

    def on_message(self, topic: str, payload: dict) -> None:
        self.items.append(payload["n"])

    def close(self) -> None:
        pass


def _step(group: str) -> StepReport:
    return StepReport(group=group, step_ms=1.0, results=())


@pytest.fixture(scope="module")
def engine():
    model = create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.25, input_size=32, resize_size=36)
    return TorchOnlineEngine(randomize_(model, seed=5), labels=["a", "b", "c"])


def test_queued_sink_delivers_messages_and_steps_in_order_and_closes_the_sink_on_its_thread():
    recorder = Recorder()
    sink = QueuedSink(recorder, maxsize=1000, name="rec")
    expected = []
    for n in range(200):
        sink.on_message("t", {"n": n})
        expected.append(("message", n))
        if n % 10 == 0:
            sink.on_step(_step(f"g{n}"))
            expected.append(("step", f"g{n}"))
    sink.close()
    assert recorder.items == expected and sink.dropped == 0
    assert recorder.closed_in == "sink-rec", "the sink is closed by the thread that fed it"


@pytest.mark.parametrize(("policy", "kept"), [("drop_oldest", [8, 9, 10]), ("drop_newest", [1, 2, 3])])
def test_queued_sink_full_queue_drops_by_its_policy_and_counts(policy, kept):
    gate = threading.Event()
    recorder = Recorder(gate)
    sink = QueuedSink(recorder, maxsize=3, policy=policy)
    sink.on_message("t", {"n": 0})
    assert recorder.entered.wait(WAIT_S)  # message 0 is in the sink's hands, blocked
    for n in range(1, 11):
        sink.on_message("t", {"n": n})
    assert sink.dropped == 7
    gate.set()
    sink.close()
    assert recorder.items == [("message", n) for n in [0, *kept]]
    assert sink.dropped == 7


def test_queued_sink_that_blocks_forever_neither_stops_the_pipeline_nor_delays_close(engine, shared_data, caplog):
    gate = threading.Event()  # never set while the pipeline runs
    recorder = Recorder(gate)
    queued = QueuedSink(recorder, maxsize=4, close_timeout=0.2, name="stuck")
    messages, results = [], []
    counter = CallbackSink(messages=lambda topic, payload: messages.append(topic), results=results.append)
    clip = str(shared_data / "videos" / "sample.avi")
    pipeline = Pipeline(engine, [StreamSpec(clip, "clip")], sinks=[queued, counter],
                        options=PipelineOptions(max_frames=40))
    try:
        final = pipeline.start().run()
        assert final["streams"]["clip"]["frames"] == 40 and len(results) == 40, "every step ran"
        assert recorder.entered.is_set() and recorder.items == []
        t0 = time.monotonic()
        queued.close()
        assert time.monotonic() - t0 < 2.0, "close waits close_timeout, not for the blocked sink"
    finally:
        gate.set()
    # Everything the sink was given (each message, and one report per step of this one-stream pipeline) was
    # dropped, but the one it is stuck on: on arrival when the queue was full, or still queued at close.
    assert queued.dropped == len(messages) + len(results) - 1
    assert "stuck dropped" in caplog.text and "did not finish within 0.2 s" in caplog.text


def test_queued_sink_error_not_raised_by_a_call_is_raised_by_close():
    class Broken(MessagesOnly):
        def on_message(self, topic: str, payload: dict) -> None:
            raise ConfigError("no display")

    sink = QueuedSink(Broken())
    sink.on_message("t", {"n": 0})
    with pytest.raises(ConfigError, match="no display"):
        sink.close()
    sink.close()  # once


def test_queued_sink_error_is_raised_once_in_the_callers_thread():
    class Broken:
        def on_message(self, topic: str, payload: dict) -> None:
            raise ConfigError("no display")

        def close(self) -> None:
            pass

    sink = QueuedSink(Broken())
    sink.on_message("t", {"n": 0})
    deadline = time.monotonic() + WAIT_S
    with pytest.raises(ConfigError, match="no display"):
        while time.monotonic() < deadline:
            sink.on_message("t", {"n": 1})
            time.sleep(0.01)
    sink.on_message("t", {"n": 2})  # raised once; what follows is dropped
    sink.close()
    assert sink.dropped >= 1


def test_queued_sink_passes_only_what_its_sink_wants():
    steps_only, messages_only = Recorder(), MessagesOnly()
    a = QueuedSink(steps_only, messages=False)
    b = QueuedSink(messages_only)
    for sink in (a, b):
        sink.on_message("t", {"n": 1})
        sink.on_step(_step("g"))
        sink.close()
    assert steps_only.items == [("step", "g")] and messages_only.items == [1]
    assert a.dropped == b.dropped == 0


@pytest.mark.parametrize(("kwargs", "match"), [({"maxsize": 0}, "at least 1 item, got maxsize=0"),
                                               ({"policy": "wait"}, "drop_oldest, drop_newest, block, got 'wait'"),
                                               ({"block_timeout": 0}, "block_timeout must be a number of seconds > 0, "
                                                                      "got 0")])
def test_queued_sink_rejects_a_bad_size_or_policy(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QueuedSink(MessagesOnly(), **kwargs)


class _Putter(threading.Thread):
    """Puts messages ``0..n-1`` into ``sink`` from a thread of its own (the pipeline's, blocked under ``block``);
    keeps what the puts raised."""

    def __init__(self, sink: QueuedSink, n: int) -> None:
        super().__init__(daemon=True)
        self.sink, self.n, self.error, self.done = sink, n, None, threading.Event()

    def run(self) -> None:
        try:
            for i in range(self.n):
                self.sink.on_message("t", {"n": i})
        except Exception as e:  # noqa: BLE001 - the test looks at it
            self.error = e
        finally:
            self.done.set()


def test_queued_sink_block_makes_the_caller_wait_and_loses_nothing():
    gate = threading.Event()
    recorder = Recorder(gate)
    sink = QueuedSink(recorder, maxsize=2, policy="block")
    putter = _Putter(sink, 10)
    putter.start()
    assert recorder.entered.wait(WAIT_S)
    assert not putter.done.wait(0.2), "the caller waits while the queue is full"
    assert sink.dropped == 0
    gate.set()
    assert putter.done.wait(WAIT_S) and putter.error is None
    sink.close()
    assert recorder.items == [("message", n) for n in range(10)] and sink.dropped == 0


def test_queued_sink_block_close_wakes_a_waiting_caller():
    gate = threading.Event()  # the sink never finishes while the caller waits
    sink = QueuedSink(Recorder(gate), maxsize=1, policy="block", close_timeout=0.1)
    putter = _Putter(sink, 5)
    putter.start()
    try:
        assert not putter.done.wait(0.2)  # blocked: message 0 in the sink, 1 queued, 2 waiting for room
        sink.close()
        assert putter.done.wait(WAIT_S), "close() woke the caller"
    finally:
        gate.set()
    assert putter.error is None and sink.dropped == 4  # 1 still queued at close, 2-4 given after it


def test_queued_sink_block_stop_event_ends_the_wait():
    gate, stop = threading.Event(), threading.Event()
    sink = QueuedSink(Recorder(gate), maxsize=1, policy="block", stop=stop)
    putter = _Putter(sink, 4)
    putter.start()
    try:
        assert not putter.done.wait(0.2)
        stop.set()  # a SIGTERM: the run must end though the sink is slow
        assert putter.done.wait(WAIT_S), "a stop ended the wait"
        assert sink.dropped == 2  # messages 2 and 3: not queued, counted
    finally:
        gate.set()
    sink.close()


def test_queued_sink_block_raises_what_the_sink_raised_instead_of_waiting():
    gate = threading.Event()

    class Dies(Recorder):
        def on_message(self, topic: str, payload: dict) -> None:
            self.entered.set()
            gate.wait(WAIT_S)
            raise ConfigError("disk gone")

    sink = QueuedSink(Dies(), maxsize=1, policy="block")
    putter = _Putter(sink, 5)
    putter.start()
    assert not putter.done.wait(0.2)
    gate.set()  # the sink dies while the caller waits for room
    assert putter.done.wait(WAIT_S), "a dead sink does not leave its caller waiting"
    assert isinstance(putter.error, ConfigError) and "disk gone" in str(putter.error)
    sink.close()  # raised once already


def test_queued_sink_block_waits_for_a_stuck_sink_once_then_drops(caplog):
    gate = threading.Event()
    recorder = Recorder(gate)
    sink = QueuedSink(recorder, maxsize=1, policy="block", block_timeout=0.1, name="stuck")
    sink.on_message("t", {"n": 0})
    assert recorder.entered.wait(WAIT_S)
    sink.on_message("t", {"n": 1})  # queued
    with caplog.at_level(logging.WARNING, logger="streamtsm.sinks.base"):
        for n in range(2, 6):  # the first waits block_timeout, the rest are dropped at once
            sink.on_message("t", {"n": n})
    assert sink.dropped == 4 and caplog.text.count("took more than 0.1 s") == 1
    gate.set()
    deadline = time.monotonic() + WAIT_S
    while len(recorder.items) < 2 and time.monotonic() < deadline:  # the sink took message 1: no longer stuck
        time.sleep(0.01)
    sink.on_message("t", {"n": 6})
    sink.close()
    assert recorder.items == [("message", 0), ("message", 1), ("message", 6)] and sink.dropped == 4


def test_pipeline_with_a_slow_sink_under_block_loses_no_frame_of_a_file(engine, shared_data):
    got: list[int] = []

    class SlowWriter:  # a video writer slower than the model
        def on_step(self, item) -> None:
            time.sleep(0.005)
            got.append(item.result.frame.index)

        def close(self) -> None:
            pass

    sink = AnnotatingSink(SlowWriter(), maxsize=2, policy="block", name="slow")
    clip = str(shared_data / "videos" / "sample.avi")
    pipeline = Pipeline(engine, [StreamSpec(clip, "clip", frame_stride=1)], sinks=[sink],
                        options=PipelineOptions(max_frames=60))
    final = pipeline.start().run()
    sink.close()
    assert final["streams"]["clip"]["frames"] == 60
    assert got == list(range(60)) and sink.dropped == 0


def test_pipeline_reports_steps_only_to_sinks_that_define_on_step(engine, shared_data):
    reports: list[StepReport] = []

    class Types(MessagesOnly):
        def on_message(self, topic: str, payload: dict) -> None:
            self.items.append(payload["type"])

    class Steps(Types):
        def on_step(self, step: StepReport) -> None:
            reports.append(step)

    plain, steps = Types(), Steps()
    clip = str(shared_data / "videos" / "sample.avi")
    pipeline = Pipeline(engine, [StreamSpec(clip, "a"), StreamSpec(clip, "b")], sinks=[plain, steps],
                        options=PipelineOptions(max_frames=5))
    pipeline.start().run()
    assert plain.items == steps.items and plain.items.count("pred") == 10
    # Which frames share a step depends on when each capture thread delivers; every frame is in exactly one report,
    # each stream's in order, and a report holds at most one frame per stream.
    seen = {"a": [], "b": []}
    for report in reports:
        assert report.group == engine.model_name and report.step_ms > 0
        ids = [r.stream_id for r in report.results]
        assert len(ids) == len(set(ids)) >= 1
        for r in report.results:
            assert len(r.topk) == 3
            seen[r.stream_id].append(r.frame.index)
    assert seen == {"a": [0, 1, 2, 3, 4], "b": [0, 1, 2, 3, 4]}


def test_display_sink_draws_on_its_own_thread_and_q_stops_the_run(monkeypatch):
    import streamtsm.sinks.display as display

    drawn = []
    monkeypatch.setattr(display.cv2, "imshow", lambda title, image: drawn.append((title, threading.current_thread())))
    monkeypatch.setattr(display.cv2, "waitKey", lambda ms: ord("q"))
    monkeypatch.setattr(display.cv2, "destroyAllWindows", lambda: None)
    stop = threading.Event()
    sink = display.display_sink(stop)
    frame = Frame(stream_id="cam", index=0, timestamp=0.0, image=np.zeros((48, 64, 3), np.uint8))
    sink.on_message("streamtsm.pred.cam", {"type": "pred"})
    sink.on_step(StepReport(group="m", step_ms=1.0, results=(StreamResult("cam", frame, [("a", 0.9)]),)))
    assert stop.wait(WAIT_S), "q in the window sets the run's stop event"
    sink.close()
    assert [title for title, _ in drawn] == ["streamtsm cam"]
    assert drawn[0][1] is not threading.current_thread()
    assert sink.dropped == 0


def test_frames_reach_step_sinks_without_the_model_input_the_capture_thread_made(engine):
    # A live capture thread preprocesses its frames (Frame.tensor, 600 kB at 224); sinks that queue frames must not
    # hold those tensors too.
    reports: list[StepReport] = []

    class Steps(MessagesOnly):
        def on_message(self, topic: str, payload: dict) -> None:
            pass

        def on_step(self, step: StepReport) -> None:
            reports.append(step)

    pipeline = Pipeline(engine, [StreamSpec("synthetic:64x48@30", "live")], sinks=[Steps()],
                        options=PipelineOptions(max_frames=4))
    pipeline.start().run()
    frames = [r.frame for report in reports for r in report.results]
    assert len(frames) == 4 and all(f.tensor is None and f.image.shape == (48, 64, 3) for f in frames)
