"""Frame, FrameBuffer and CaptureThread: ordering, drop policies, strides, reconnects, hangs and stopping."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtsm.capture import (STATUSES, TRANSITIONS, CameraSource, CaptureThread, Frame, FrameBuffer, Source,
                               StatusTransitionError, StreamCapture, StreamStatus, VideoSource, check_transition)
from streamtsm.capture.sources import Loss
from streamtsm.errors import ConfigError, SourceError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VIDEOS = DATA / "videos"
WAIT_S = 10.0  # upper bound on any wait in these tests; they normally take milliseconds


def _video(name: str) -> Path:
    path = VIDEOS / name
    if not path.exists():
        pytest.skip(f"../shared/data not present: {path} is needed for the real-video tests")
    return path


def _frame(index: int, generation: int = 0) -> Frame:
    return Frame("s", index, float(index), np.zeros((2, 2, 3), np.uint8), generation)


def _wait_for(condition, timeout: float = WAIT_S) -> bool:
    """Polls a condition until it holds or the time-out passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def _drain(buffer: FrameBuffer, thread: CaptureThread) -> list[Frame]:
    """Pops frames until the buffer is finished (the thread closed it) or the time-out passes."""
    frames = []
    deadline = time.monotonic() + WAIT_S
    while not buffer.finished and time.monotonic() < deadline:
        frame = buffer.pop()
        if frame is None:
            time.sleep(0.001)
        else:
            frames.append(frame)
    thread.join(WAIT_S)
    assert not thread.is_alive(), "capture thread did not exit"
    assert buffer.finished
    return frames


class FakeCamera(Source):
    """A live source giving tiny frames quickly; chosen reads fail and chosen opens raise."""

    is_live = True

    def __init__(self, *, fail_reads=(), open_ok=None, read_delay: float = 0.0005):
        self.name = "fake camera"
        self.fps = None
        self.fail_reads = set(fail_reads)
        self.open_ok = open_ok  # attempt number (1-based) -> whether that open succeeds
        self.read_delay = read_delay
        self.on_open = None
        self.reads = 0
        self.opens = 0
        self.is_open = False

    def open(self) -> None:
        self.opens += 1
        if self.on_open is not None:
            self.on_open()
        if self.open_ok is not None and not self.open_ok(self.opens):
            raise SourceError(f"cannot open {self.name} (attempt {self.opens})")
        self.is_open = True

    def read(self) -> np.ndarray | None:
        if not self.is_open:
            return None
        time.sleep(self.read_delay)  # a camera blocks until its next frame
        n, self.reads = self.reads, self.reads + 1
        return None if n in self.fail_reads else np.full((4, 4, 3), n % 256, np.uint8)

    def release(self) -> None:
        self.is_open = False


class FakeFile(Source):
    """A non-live source returning the given images, then None."""

    is_live = False

    def __init__(self, images, fps: float | None = None):
        self.name = "fake file"
        self.fps = fps
        self.images = list(images)
        self.position = 0
        self.released = 0

    def open(self) -> None:
        self.position = 0

    def read(self) -> np.ndarray | None:
        if self.position >= len(self.images):
            return None
        self.position += 1
        return self.images[self.position - 1]

    def release(self) -> None:
        self.released += 1


# -- Frame ------------------------------------------------------------------------------------------------------


def test_frame_is_frozen_and_compares_by_identity():
    frame = _frame(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.index = 4
    assert frame == frame
    assert frame != _frame(3)
    assert "image" not in repr(frame)
    assert frame.generation == 0


# -- FrameBuffer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"policy": "drop_newest"}, {"capacity": 0}, {"capacity": 1.5}])
def test_buffer_rejects_bad_policy_or_capacity(kwargs):
    with pytest.raises(ConfigError, match="drop_oldest, wait|capacity must be an integer >= 1"):
        FrameBuffer(**kwargs)


def test_buffer_drop_oldest_keeps_newest_and_counts_drops():
    buffer = FrameBuffer(capacity=2, policy="drop_oldest")
    for i in range(5):
        assert buffer.put(_frame(i))
    assert len(buffer) == 2 and buffer.dropped == 3 and buffer.put_count == 5
    assert [buffer.pop().index, buffer.pop().index] == [3, 4]
    assert buffer.pop() is None
    assert buffer.popped == 2


def test_buffer_wait_blocks_until_there_is_room():
    buffer = FrameBuffer(capacity=1, policy="wait")
    buffer.put(_frame(0))
    done = threading.Event()

    def produce():
        buffer.put(_frame(1))
        done.set()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    assert not done.wait(0.1), "put returned while the buffer was full"
    assert buffer.pop().index == 0
    assert done.wait(WAIT_S)
    producer.join(WAIT_S)
    assert buffer.pop().index == 1
    assert buffer.dropped == 0


def test_buffer_wait_gives_up_when_stop_is_set():
    buffer = FrameBuffer(capacity=1, policy="wait")
    buffer.put(_frame(0))
    stop = threading.Event()
    result = []
    producer = threading.Thread(target=lambda: result.append(buffer.put(_frame(1), stop)), daemon=True)
    producer.start()
    stop.set()
    producer.join(WAIT_S)
    assert result == [False]
    assert buffer.put_count == 1 and len(buffer) == 1


def test_buffer_notify_is_set_on_put_and_close():
    notify = threading.Event()
    first, second = FrameBuffer(notify=notify), FrameBuffer(notify=notify)
    second.put(_frame(0))
    assert notify.is_set()
    notify.clear()
    first.close()
    assert notify.is_set()


def test_buffer_finished_only_when_closed_and_empty():
    buffer = FrameBuffer(capacity=2)
    buffer.put(_frame(0))
    buffer.close()
    assert buffer.closed and not buffer.finished
    buffer.pop()
    assert buffer.finished
    with pytest.raises(RuntimeError):
        buffer.put(_frame(1))


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 5), policy=st.sampled_from(["drop_oldest", "wait"]),
       ops=st.lists(st.booleans(), max_size=60))
def test_buffer_invariants_hold_for_any_sequence_of_puts_and_pops(capacity, policy, ops):
    buffer = FrameBuffer(capacity=capacity, policy=policy)
    stop = threading.Event()
    stop.set()  # a full "wait" buffer then refuses at once instead of blocking this single thread
    accepted, popped = [], []
    for i, is_put in enumerate(ops):
        if is_put:
            if buffer.put(_frame(i), stop):
                accepted.append(i)
        elif (frame := buffer.pop()) is not None:
            popped.append(frame.index)
        assert len(buffer) <= capacity
        assert buffer.put_count == buffer.popped + buffer.dropped + len(buffer)
    while (frame := buffer.pop()) is not None:
        popped.append(frame.index)
    assert popped == sorted(popped)
    assert set(popped) <= set(accepted)
    assert buffer.put_count == len(accepted)
    if policy == "wait":
        assert buffer.dropped == 0 and popped == accepted


# -- CaptureThread: files ---------------------------------------------------------------------------------------


def test_capture_thread_reads_file_in_order_with_wait_policy():
    buffer = FrameBuffer(capacity=4, policy="wait")
    thread = CaptureThread(VideoSource(str(_video("sample.avi"))), "sample", buffer).start()
    frames = _drain(buffer, thread)
    assert [f.index for f in frames] == list(range(164))
    assert all(f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(f.stream_id == "sample" and f.generation == 0 for f in frames)
    stats = thread.stats()
    assert stats["status"] == "ended" and stats["frames_read"] == 164 and stats["dropped"] == 0


def test_capture_thread_stride_keeps_every_other_frame():
    buffer = FrameBuffer(capacity=4, policy="wait")
    thread = CaptureThread(VideoSource(str(_video("sample.avi"))), "sample", buffer, frame_stride=2).start()
    frames = _drain(buffer, thread)
    assert [f.index for f in frames] == list(range(0, 164, 2))
    stats = thread.stats()
    assert stats["skipped"] == 82 and stats["dropped"] == 0


def test_capture_thread_realtime_file_gives_every_frame():
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(20)]
    buffer = FrameBuffer(capacity=2, policy="wait")
    thread = CaptureThread(FakeFile(images, fps=500.0), "f", buffer, realtime=True).start()
    frames = _drain(buffer, thread)
    assert [int(f.image[0, 0, 0]) for f in frames] == list(range(20))
    assert thread.status == "ended"


class LossyFile(FakeFile):
    """A FakeFile that, once ended, says it fell short: twice a truncation, once a gap."""

    def losses(self):
        return [Loss("truncated", 2, "fake file: 2 frames short"), Loss("truncated", 3, "fake file: 3 more short"),
                Loss("gap", 1, "fake file: a gap")]


def _mjpg(path: Path, frames: int = 30) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), i * 8, np.uint8))
    writer.release()
    return path


def test_capture_thread_truncated_file_is_not_a_quiet_end(tmp_path, caplog):
    whole = _mjpg(tmp_path / "whole.avi").read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole[: len(whole) // 2])
    buffer = FrameBuffer(capacity=4, policy="wait")
    with caplog.at_level(logging.WARNING, logger="streamtsm.capture"):
        thread = CaptureThread(VideoSource(str(cut)), "cut", buffer).start()
        frames = _drain(buffer, thread)
    stats = thread.stats()
    assert stats["status"] == "ended" and 0 < len(frames) < 30
    assert stats["missing_frames"] == 30 - len(frames)
    assert "of the 30 frames its header gives" in stats["last_error"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("stream cut: file cut.avi ended after")


def test_capture_thread_image_sequence_gap_is_not_a_quiet_end(tmp_path, caplog):
    for n in (1, 2, 5):
        cv2.imwrite(str(tmp_path / f"img_{n:05d}.jpg"), np.full((16, 16, 3), n * 10, np.uint8))
    buffer = FrameBuffer(capacity=4, policy="wait")
    with caplog.at_level(logging.WARNING, logger="streamtsm.capture"):
        thread = CaptureThread(VideoSource(str(tmp_path / "img_%05d.jpg")), "seq", buffer).start()
        frames = _drain(buffer, thread)
    assert len(frames) == 2 and thread.status == "ended"
    assert thread.stats()["missing_frames"] == 3
    assert [r.getMessage() for r in caplog.records if "number 3 is missing" in r.getMessage()]


def test_capture_thread_warns_once_per_kind_of_loss_and_counts_every_frame(caplog):
    buffer = FrameBuffer(capacity=4, policy="wait")
    with caplog.at_level(logging.WARNING, logger="streamtsm.capture"):
        thread = CaptureThread(LossyFile([np.zeros((4, 4, 3), np.uint8)] * 3), "f", buffer).start()
        _drain(buffer, thread)
    assert thread.stats()["missing_frames"] == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["stream f: fake file: 2 frames short", "stream f: fake file: a gap"]


def test_capture_thread_complete_file_has_no_missing_frames(caplog):
    buffer = FrameBuffer(capacity=4, policy="wait")
    with caplog.at_level(logging.WARNING, logger="streamtsm.capture"):
        thread = CaptureThread(FakeFile([np.zeros((4, 4, 3), np.uint8)] * 3), "f", buffer).start()
        _drain(buffer, thread)
    assert thread.stats()["missing_frames"] == 0 and thread.stats()["last_error"] is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_stream_capture_stats_report_missing_frames():
    capture = StreamCapture(LossyFile([np.zeros((4, 4, 3), np.uint8)] * 3), "f").start()
    frames = _pop_all(capture, lambda _: capture.finished)
    capture.join(WAIT_S)
    assert len(frames) == 3 and capture.stats()["missing_frames"] == 6


def test_capture_thread_counts_and_converts_bad_frames():
    images = [
        np.full((4, 4), 7, np.uint8),  # gray
        np.full((4, 4, 1), 8, np.uint8),  # gray with a channel axis
        np.full((4, 4, 4), 9, np.uint8),  # BGRA
        np.full((4, 4, 3), 0x1234, np.uint16),  # 16-bit
        np.zeros((0, 0, 3), np.uint8),  # empty
        np.zeros((4, 4, 3), np.float32),  # not a pixel type any backend gives
        np.full((4, 4, 3), 10, np.uint8),
    ]
    buffer = FrameBuffer(capacity=8, policy="wait")
    thread = CaptureThread(FakeFile(images), "f", buffer).start()
    frames = _drain(buffer, thread)
    assert [f.index for f in frames] == [0, 1, 2, 3, 6]
    assert [int(f.image[0, 0, 0]) for f in frames] == [7, 8, 9, 0x12, 10]
    assert all(f.image.shape == (4, 4, 3) and f.image.dtype == np.uint8 for f in frames)
    assert thread.stats()["bad_frames"] == 2


def test_capture_thread_missing_file_fails_with_source_error(tmp_path):
    path = tmp_path / "missing.mp4"
    buffer = FrameBuffer(policy="wait")
    thread = CaptureThread(VideoSource(str(path)), "missing", buffer).start()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert thread.status == "failed" and buffer.finished
    assert isinstance(thread.error, SourceError) and str(path) in str(thread.error)
    assert thread.open_error is thread.error


def test_capture_thread_stops_while_blocked_on_full_wait_buffer():
    images = [np.zeros((4, 4, 3), np.uint8)] * 10
    buffer = FrameBuffer(capacity=1, policy="wait")
    source = FakeFile(images)
    thread = CaptureThread(source, "f", buffer).start()
    assert _wait_for(lambda: len(buffer) == 1 and source.position >= 2)
    thread.stop()
    thread.join(1.0)
    assert not thread.is_alive()
    assert thread.status == "stopped" and buffer.closed and source.released >= 1


# -- CaptureThread: live sources --------------------------------------------------------------------------------


def test_capture_thread_drop_oldest_under_slow_consumer_gives_newest_frames():
    buffer = FrameBuffer(capacity=2, policy="drop_oldest")
    thread = CaptureThread(FakeCamera(), "cam", buffer).start()
    indexes = []
    deadline = time.monotonic() + WAIT_S
    while len(indexes) < 15 and time.monotonic() < deadline:
        if (frame := buffer.pop()) is not None:
            indexes.append(frame.index)
        time.sleep(0.01)  # a consumer slower than the camera
    thread.stop()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    while (frame := buffer.pop()) is not None:
        indexes.append(frame.index)
    assert buffer.dropped > 0
    assert buffer.put_count == buffer.popped + buffer.dropped + len(buffer)
    assert indexes == sorted(set(indexes))
    assert indexes[-1] == thread.stats()["frames_read"] - 1  # the last frame popped is the newest captured
    assert thread.status == "stopped"


def test_capture_thread_reconnects_after_read_failure():
    source = FakeCamera(fail_reads={10})
    buffer = FrameBuffer(capacity=64, policy="drop_oldest")
    thread = CaptureThread(source, "cam", buffer, backoff=(0.01, 0.05))
    statuses_at_open = []
    source.on_open = lambda: statuses_at_open.append(thread.status)
    thread.start()
    frames = []

    def enough_after_reconnect():
        while (frame := buffer.pop()) is not None:
            frames.append(frame)
        return sum(f.generation == 1 for f in frames) >= 5

    assert _wait_for(enough_after_reconnect)
    thread.stop()
    thread.join(WAIT_S)
    assert statuses_at_open[:2] == ["starting", "reconnecting"]
    assert [f.generation for f in frames] == sorted(f.generation for f in frames)
    assert [f.index for f in frames] == sorted({f.index for f in frames})
    stats = thread.stats()
    assert stats["reconnects"] == 1 and stats["generation"] == 1
    assert "read failed" in stats["last_error"]


def test_capture_thread_retries_reopen_until_it_works():
    source = FakeCamera(fail_reads={3}, open_ok=lambda attempt: attempt == 1 or attempt >= 4)
    buffer = FrameBuffer(capacity=64)
    thread = CaptureThread(source, "cam", buffer, backoff=(0.01, 0.02)).start()
    assert _wait_for(lambda: thread.generation == 1 and buffer.put_count > 5)
    thread.stop()
    thread.join(WAIT_S)
    assert source.opens == 4
    assert thread.stats()["reconnects"] == 1


def test_capture_thread_fails_when_reconnects_are_exhausted():
    source = FakeCamera(fail_reads={3}, open_ok=lambda attempt: attempt == 1)
    buffer = FrameBuffer(capacity=8)
    thread = CaptureThread(source, "cam", buffer, backoff=(0.01, 0.02), max_reconnects=2).start()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert thread.status == "failed" and buffer.closed
    assert isinstance(thread.error, SourceError) and "gave up on fake camera" in str(thread.error)
    assert source.opens == 3


def test_capture_thread_without_reconnect_fails_on_loss():
    buffer = FrameBuffer(capacity=8)
    thread = CaptureThread(FakeCamera(fail_reads={3}), "cam", buffer, reconnect=False).start()
    thread.join(WAIT_S)
    assert thread.status == "failed" and "read failed" in str(thread.error)
    assert buffer.put_count == 3


def test_capture_thread_stop_during_backoff_returns_quickly():
    source = FakeCamera(fail_reads={2}, open_ok=lambda attempt: attempt == 1)
    thread = CaptureThread(source, "cam", FrameBuffer(), backoff=(30.0, 60.0)).start()
    assert _wait_for(lambda: thread.status == "reconnecting")
    thread.stop()
    thread.join(1.0)
    assert not thread.is_alive()
    assert thread.status == "stopped"


def test_capture_thread_missing_camera_fails_without_retrying():
    buffer = FrameBuffer()
    thread = CaptureThread(CameraSource(99), "cam99", buffer, backoff=(30.0, 60.0)).start()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert thread.status == "failed" and buffer.finished
    assert isinstance(thread.error, SourceError) and "camera 99" in str(thread.error)
    assert thread.stats()["last_error"] == str(thread.error)


def test_capture_thread_hung_read_is_flagged_then_reconnected():
    release = threading.Event()

    class HangingCamera(FakeCamera):
        def read(self):
            if self.reads == 5 and not release.is_set():
                release.wait(WAIT_S)  # the backend stops delivering without reporting an error
            return super().read()

    buffer = FrameBuffer(capacity=64)
    thread = CaptureThread(HangingCamera(), "cam", buffer, read_timeout=0.2, backoff=(0.01, 0.02)).start()
    assert _wait_for(lambda: thread.stalled)
    assert thread.stats()["stalled"] and thread.status == "running"
    release.set()
    assert _wait_for(lambda: thread.generation == 1)
    thread.stop()
    thread.join(WAIT_S)
    assert not thread.stalled
    assert "hung" in thread.stats()["last_error"]


def test_capture_thread_source_bug_fails_with_the_exception():
    class BrokenCamera(FakeCamera):
        def read(self):
            raise ZeroDivisionError("bug")

    buffer = FrameBuffer()
    thread = CaptureThread(BrokenCamera(), "cam", buffer).start()
    thread.join(WAIT_S)
    assert thread.status == "failed" and isinstance(thread.error, ZeroDivisionError) and buffer.closed


def test_capture_thread_stats_report_counters_and_fps():
    buffer = FrameBuffer(capacity=4)
    thread = CaptureThread(FakeCamera(), "cam", buffer, frame_stride=3).start()
    assert _wait_for(lambda: thread.stats()["frames_read"] >= 30)
    stats = thread.stats()
    thread.stop()
    thread.join(WAIT_S)
    assert stats["stream_id"] == "cam" and stats["source"] == "fake camera" and stats["status"] == "running"
    assert stats["fps"] > 0 and stats["skipped"] > 0 and stats["last_error"] is None
    assert set(stats) == {"stream_id", "source", "status", "stalled", "frames_read", "skipped", "bad_frames",
                          "missing_frames", "dropped", "reconnects", "generation", "fps", "last_error"}


@pytest.mark.parametrize("kwargs", [{"frame_stride": 0}, {"backoff": (2.0, 1.0)}, {"max_reconnects": -1},
                                    {"read_timeout": 0}])
def test_capture_thread_rejects_bad_options(kwargs):
    with pytest.raises(ConfigError):
        CaptureThread(FakeCamera(), "cam", FrameBuffer(), **kwargs)


# -- StreamCapture (supervised) and StreamStatus --------------------------------------------------------------------


def _pop_all(capture: StreamCapture, until, poll: bool = True) -> list[Frame]:
    """Pops (and polls) until ``until(frames)`` holds or the time-out passes."""
    frames: list[Frame] = []
    deadline = time.monotonic() + WAIT_S
    while not until(frames) and time.monotonic() < deadline:
        if poll:
            capture.poll()
        frame = capture.pop()
        if frame is None:
            time.sleep(0.002)
        else:
            frames.append(frame)
    return frames


def test_stream_capture_file_waits_for_the_consumer_and_gives_every_frame_in_order():
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(12)]
    capture = StreamCapture(FakeFile(images), "f").start()
    time.sleep(0.05)  # a slow consumer: the file's reader must wait, not drop
    frames = _pop_all(capture, lambda _: capture.finished)
    capture.join(WAIT_S)
    assert [f.index for f in frames] == list(range(12))
    stats = capture.stats()
    assert stats["dropped"] == 0 and stats["status"] == "ended" and capture.status is StreamStatus.ENDED


@pytest.mark.parametrize("live_buffer", [1, 2, 3])
def test_stream_capture_live_source_holds_its_newest_frames_oldest_first_and_drops_the_rest(live_buffer):
    capture = StreamCapture(FakeCamera(), "cam", live_buffer=live_buffer).start()
    assert _wait_for(lambda: capture.stats()["frames_read"] >= 20)
    capture.stop()
    capture.join(WAIT_S)
    read = capture.stats()["frames_read"]
    held = [capture.pop() for _ in range(live_buffer + 1)]
    assert held[-1] is None, f"room for {live_buffer} frame(s), no more"
    assert [f.index for f in held[:-1]] == list(range(read - live_buffer, read)), "the newest, oldest first"
    assert capture.stats()["dropped"] == read - live_buffer, "every other frame was dropped and counted"


def test_stream_capture_refuses_a_live_buffer_with_no_room():
    with pytest.raises(ConfigError, match="capacity must be an integer >= 1, got 0"):
        StreamCapture(FakeCamera(), "cam", live_buffer=0)


def test_stream_capture_replaces_a_hung_live_reader_and_keeps_counting():
    release = threading.Event()
    made: list[FakeCamera] = []

    class HangingCamera(FakeCamera):
        def read(self):
            if self.reads == 5:
                release.wait(WAIT_S)  # never returns before the test ends
                return None
            return super().read()

    may_open = threading.Event()

    def factory() -> Source:
        made.append(HangingCamera() if not made else FakeCamera())
        if len(made) == 2:
            made[-1].on_open = lambda: may_open.wait(WAIT_S)  # hold the new reader in its open
        return made[-1]

    capture = StreamCapture(factory, "cam", read_timeout=0.2, backoff=(0.01, 0.02)).start()
    try:
        frames = _pop_all(capture, lambda _: len(made) == 2)
        assert capture.status is StreamStatus.RECONNECTING, "a replacement reader opening is a reconnect"
        may_open.set()
        frames += _pop_all(capture, lambda fs: fs and fs[-1].generation == 1 and len(fs) >= 10)
        stats = capture.stats()
    finally:
        release.set()
        may_open.set()
        capture.stop()
        capture.join(WAIT_S)
    assert len(made) == 2
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices)), "indices keep increasing across the replaced reader"
    assert frames[0].generation == 0 and frames[-1].generation == 1
    assert min(f.index for f in frames if f.generation == 1) >= 5, "the new reader counts on from the old one"
    assert stats["reconnects"] == 1 and stats["generation"] == 1 and stats["frames_read"] >= 5 + 5
    assert stats["status"] == "running"


def test_stream_capture_does_not_replace_a_source_given_as_an_object():
    release = threading.Event()

    class HangingCamera(FakeCamera):
        def read(self):
            if self.reads == 3:
                release.wait(WAIT_S)
                return None
            return super().read()

    capture = StreamCapture(HangingCamera(), "cam", read_timeout=0.1).start()
    try:
        assert _wait_for(lambda: capture.stats()["stalled"])
        assert not capture.poll() or capture.stats()["generation"] == 0
        assert not capture.poll() and capture.stats()["reconnects"] == 0
    finally:
        release.set()
        capture.stop()
        capture.join(WAIT_S)


def test_stream_capture_status_is_done_once_finished_and_stopped():
    capture = StreamCapture(FakeCamera(), "cam").start()
    assert _wait_for(lambda: capture.status is StreamStatus.RUNNING)
    assert capture.poll(), "starting -> running is news"
    capture.finish()
    capture.join(WAIT_S)
    assert capture.status is StreamStatus.DONE and capture.stats()["status"] == "done"
    assert capture.poll() and not capture.poll()


def test_stream_capture_missing_camera_fails_with_the_error():
    capture = StreamCapture(CameraSource(99), "cam99", backoff=(30.0, 60.0)).start()
    capture.join(WAIT_S)
    assert capture.status is StreamStatus.FAILED and capture.finished
    assert isinstance(capture.error, SourceError) and capture.stats()["last_error"] == str(capture.error)


def test_stream_status_values_are_the_thread_statuses_and_done():
    assert {s.value for s in StreamStatus} == set(STATUSES) | {"done"}
    assert set(TRANSITIONS) == set(StreamStatus)
    assert StreamStatus.RUNNING == "running" and json.dumps({"s": StreamStatus.DONE.value}) == '{"s": "done"}'


@pytest.mark.parametrize("old,new", [
    ("starting", "running"), ("running", "reconnecting"), ("reconnecting", "running"), ("starting", "ended"),
    ("running", "done"), ("ended", "done"), ("stopped", "done"), ("reconnecting", "failed"), ("failed", "failed"),
])
def test_stream_status_transition_allowed(old, new):
    check_transition(StreamStatus(old), StreamStatus(new))


@pytest.mark.parametrize("old,new", [
    ("failed", "running"), ("done", "running"), ("done", "failed"), ("ended", "running"), ("stopped", "running"),
    ("running", "starting"), ("reconnecting", "starting"), ("ended", "failed"),
])
def test_stream_status_illegal_transition_raises_naming_both(old, new):
    with pytest.raises(StatusTransitionError, match=f"from '{old}' to '{new}'"):
        check_transition(StreamStatus(old), StreamStatus(new))


class _DownThenUp(Source):
    """A live source whose first ``down_for`` opens fail."""

    is_live = True
    name = "flaky camera"

    def __init__(self, down_for: int, live: bool = True) -> None:
        self.down_for, self.opens, self.is_live = down_for, 0, live

    def open(self):
        self.opens += 1
        if self.opens <= self.down_for:
            raise SourceError(f"{self.name} is down (open {self.opens})")

    def read(self):
        time.sleep(0.005)
        return np.zeros((8, 8, 3), np.uint8)

    def release(self):
        pass


def test_capture_thread_retry_open_connects_a_live_source_that_comes_up_later():
    source = _DownThenUp(down_for=3)
    thread = CaptureThread(source, "cam", FrameBuffer(1, "drop_oldest"), backoff=(0.01, 0.02), retry_open=True)
    statuses = set()
    thread.start()
    deadline = time.monotonic() + 5
    while thread.status != "running" and time.monotonic() < deadline:
        statuses.add(thread.status)
        time.sleep(0.002)
    thread.stop()
    thread.join(2)
    assert "connecting" in statuses and source.opens == 4
    stats = thread.stats()
    assert stats["generation"] == 0 and stats["reconnects"] == 0  # never ran before: a first connection
    assert "is down (open 3)" in stats["last_error"]


def test_capture_thread_retry_open_still_fails_a_file_at_once():
    thread = CaptureThread(_DownThenUp(down_for=1, live=False), "f", FrameBuffer(1, "wait"), retry_open=True)
    thread.start()
    thread.join(2)
    assert thread.status == "failed" and isinstance(thread.error, SourceError)


def test_capture_thread_stop_while_connecting_is_prompt():
    thread = CaptureThread(_DownThenUp(down_for=10**9), "cam", FrameBuffer(1, "drop_oldest"), backoff=(5.0, 8.0),
                           retry_open=True)
    thread.start()
    deadline = time.monotonic() + 2
    while thread.status != "connecting" and time.monotonic() < deadline:
        time.sleep(0.005)
    t0 = time.monotonic()
    thread.stop()
    thread.join(2)
    assert not thread.is_alive() and thread.status == "stopped"
    assert time.monotonic() - t0 < 1.0  # a wait between attempts ends at once on stop


# -- preprocessing in the capture thread --------------------------------------------------------------------------


def test_capture_thread_preprocess_puts_each_frames_tensor_made_in_the_capture_thread():
    images = [np.full((24, 32, 3), i * 20, np.uint8) for i in range(6)]
    threads = []

    def preprocess(image):
        threads.append(threading.current_thread().name)
        return image.astype(np.float32).transpose(2, 0, 1) / 255

    buffer = FrameBuffer(capacity=4, policy="wait")
    thread = CaptureThread(FakeFile(images), "cam", buffer, preprocess=preprocess).start()
    frames = _drain(buffer, thread)
    assert [f.index for f in frames] == list(range(6))
    for f, image in zip(frames, images):
        assert f.tensor is not None and f.tensor.shape == (3, 24, 32)
        np.testing.assert_array_equal(f.tensor, image.astype(np.float32).transpose(2, 0, 1) / 255)
    assert threads == ["capture-cam"] * 6


def test_capture_thread_preprocess_that_raises_leaves_the_tensor_to_the_consumer():
    def preprocess(image):
        raise ValueError("bad crop")

    buffer = FrameBuffer(capacity=4, policy="wait")
    thread = CaptureThread(FakeFile([np.zeros((8, 8, 3), np.uint8)] * 3), "cam", buffer, preprocess=preprocess).start()
    frames = _drain(buffer, thread)
    assert len(frames) == 3 and all(f.tensor is None for f in frames)
    assert thread.stats()["status"] == "ended" and thread.error is None


def test_stream_capture_preprocesses_in_a_live_readers_thread_only():
    live = StreamCapture(FakeCamera(), "cam", preprocess=lambda image: image[..., 0].astype(np.float32)).start()
    frame = None

    def got_one():
        nonlocal frame
        frame = live.pop()
        return frame is not None

    assert _wait_for(got_one)
    live.stop()
    live.join(WAIT_S)
    assert frame.tensor is not None and frame.tensor.shape == frame.image.shape[:2]
    np.testing.assert_array_equal(frame.tensor, frame.image[..., 0])

    file = StreamCapture(FakeFile([np.full((8, 8, 3), 7, np.uint8)] * 2), "file",
                         preprocess=lambda image: image[..., 0].astype(np.float32)).start()
    frames = []

    def drained():
        while (f := file.pop()) is not None:
            frames.append(f)
        return file.finished

    assert _wait_for(drained)
    file.join(WAIT_S)
    assert len(frames) == 2 and all(f.tensor is None for f in frames)  # the consumer preprocesses a file's frames
