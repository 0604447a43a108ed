"""Media time: frames, predictions and events from a file carry their position in it, and action durations of a
file are measured in the file's time, not in how fast it was processed; live sources keep wall-clock times."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamtsm.capture import CaptureThread, FrameBuffer, Source, open_source
from streamtsm.engine.torch_engine import TorchOnlineEngine
from streamtsm.models import create
from streamtsm.pipeline import Pipeline, PipelineOptions, StreamSpec
from streamtsm.postprocess import EventDetector
from streamtsm.publish.schema import event_message
from streamtsm.sinks import CallbackSink

from .conftest import randomize_

LABELS = ["wave", "clap", "jump"]
FPS = 10.0
BRIGHT = range(10, 26)  # frames showing the "action": 1.6 s of a 3 s file at 10 fps


def write_clip(path, frames: int = 30, fps: float = FPS, bright=BRIGHT) -> str:
    """A small MJPG AVI whose frames in ``bright`` are white and the others black."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), 255 if i in bright else 0, np.uint8))
    writer.release()
    return str(path)


class BrightnessEngine:
    """A real engine whose logits are replaced by a script: "wave" for a white frame, no opinion for a black one."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, frames, state):
        logits, state = self.inner.step(frames, state)
        scripted = np.zeros_like(logits)
        scripted[:, 0] = np.where(frames.mean(axis=(1, 2, 3)) > 0, 10.0, 0.0)  # normalized: black < 0 < white
        return scripted, state


@pytest.fixture(scope="module")
def engine():
    model = create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.25, input_size=32, resize_size=36)
    return BrightnessEngine(TorchOnlineEngine(randomize_(model, seed=3), labels=LABELS))


def run_pipeline(engine, source, **options) -> tuple[list[dict], list[dict]]:
    messages: list[tuple[str, dict]] = []
    options = PipelineOptions(smooth=1, hold=3, threshold=0.5, realtime=False, **options)
    pipeline = Pipeline(engine, [StreamSpec(source, "s", frame_stride=1)], options=options,
                        sinks=[CallbackSink(messages=lambda t, p: messages.append((t, p)))])
    pipeline.start()
    pipeline.run()
    preds = [p for t, p in messages if t.startswith("streamtsm.pred.")]
    events = [p for t, p in messages if t.startswith("streamtsm.event.")]
    return preds, events


def test_capture_thread_file_frames_carry_their_position_in_the_file(tmp_path):
    source = open_source(write_clip(tmp_path / "clip.avi"))
    buffer = FrameBuffer(64, "wait")
    thread = CaptureThread(source, "f", buffer, frame_stride=2).start()
    thread.join(10)
    frames = []
    while (frame := buffer.pop()) is not None:
        frames.append(frame)
    assert [f.index for f in frames] == list(range(0, 30, 2))
    # Frames skipped by the stride still count: the position is the index over the file's fps.
    assert [f.media_ts for f in frames] == pytest.approx([i / FPS for i in range(0, 30, 2)])


def test_capture_thread_live_frames_have_no_media_time():
    source = open_source("synthetic:32x32@200")
    buffer = FrameBuffer(4, "drop_oldest")
    thread = CaptureThread(source, "live", buffer).start()
    deadline = time.monotonic() + 5
    frame = None
    while frame is None and time.monotonic() < deadline:
        frame = buffer.pop()
        time.sleep(0.01)
    thread.stop()
    thread.join(5)
    assert frame is not None and frame.media_ts is None


def test_event_detector_duration_is_media_time_when_given():
    detector = EventDetector(hold=1)
    # Processed within 0.2 s of wall time, the action spans 1.6 s of the file.
    detector.update("wave", 0.9, 10, 1000.0, media_ts=1.0)
    detector.update("wave", 0.9, 26, 1000.2, media_ts=2.6)
    (offset,) = detector.flush()
    assert offset.duration_s == pytest.approx(1.6)
    assert (offset.start_media_ts, offset.end_media_ts) == (1.0, 2.6)


def test_event_detector_duration_is_wall_time_without_media_time():
    detector = EventDetector(hold=1)
    detector.update("wave", 0.9, 10, 1000.0)
    detector.update("wave", 0.9, 26, 1000.2)
    (offset,) = detector.flush()
    assert offset.duration_s == pytest.approx(0.2)
    assert (offset.start_media_ts, offset.end_media_ts) == (None, None)


def test_event_message_carries_media_times_of_a_file():
    detector = EventDetector(hold=1)
    detector.update("wave", 0.9, 10, 1000.0, media_ts=1.0)
    detector.update("wave", 0.9, 26, 1000.2, media_ts=2.6)
    (offset,) = detector.flush()
    message = event_message(stream_id="s", model="m", event=offset, frame_index=28, capture_ts=1000.3,
                            media_ts=2.8, publish_ts=1000.31)
    assert (message["start_media_ts"], message["end_media_ts"], message["media_ts"]) == (1.0, 2.6, 2.8)
    assert message["duration_s"] == pytest.approx(1.6)


def test_pipeline_file_faster_than_real_time_reports_media_durations(engine, tmp_path):
    preds, events = run_pipeline(engine, write_clip(tmp_path / "action.avi"))
    assert len(preds) == 30
    assert [p["media_ts"] for p in preds] == pytest.approx([p["frame"] / FPS for p in preds])
    assert [e["event"] for e in events] == ["onset", "offset"]
    onset, offset = events
    assert (onset["label"], onset["start_frame"], onset["start_media_ts"]) == ("wave", 10, 1.0)
    assert onset["media_ts"] == pytest.approx(1.2)  # decided on the hold-th white frame
    assert (offset["end_frame"], offset["end_media_ts"]) == (25, 2.5)
    # The action lasts 1.5 s of the file (frames 10 to 25 at 10 fps), however fast the file was processed.
    assert offset["duration_s"] == pytest.approx(1.5)


class ScriptedCamera(Source):
    """A live source: black, then white for reads 10-39, then black; about 100 frames a second."""

    is_live = True
    name = "scripted camera"
    fps = 100.0

    def __init__(self):
        self.reads = 0

    def open(self):
        pass

    def read(self):
        time.sleep(0.01)
        self.reads += 1
        return np.full((48, 64, 3), 255 if 10 <= self.reads < 40 else 0, np.uint8)

    def release(self):
        pass


def test_pipeline_live_source_keeps_wall_clock_durations(engine):
    preds, events = run_pipeline(engine, ScriptedCamera(), max_frames=60)
    assert preds and all(p["media_ts"] is None for p in preds)
    offsets = [e for e in events if e["event"] == "offset"]
    assert offsets, "the white stretch made an action"
    for e in offsets:
        assert e["start_media_ts"] is None and e["end_media_ts"] is None and e["media_ts"] is None
        assert e["duration_s"] == pytest.approx(e["end_ts"] - e["start_ts"], abs=1e-5)


def test_pipeline_stats_count_the_frames_a_truncated_file_lost(engine, tmp_path):
    # Item 6's figure as the stats message carries it (the clip from above, cut in half).
    data = Path(write_clip(tmp_path / "whole.avi")).read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    options = PipelineOptions(smooth=1, realtime=False)
    pipeline = Pipeline(engine, [StreamSpec(str(cut), "cut", frame_stride=1)], options=options)
    pipeline.start()
    stream = pipeline.run()["streams"]["cut"]
    assert stream["status"] == "done" and 0 < stream["captured"] < 30
    assert stream["missing_frames"] == 30 - stream["captured"]
