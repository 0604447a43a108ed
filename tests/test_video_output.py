"""`run --output PATH`: the annotated video, one file per stream, at the file's own rate or the processed rate, in
order (drop_newest from live sources, every frame with block from files), playable after a stop (SIGTERM included),
and its bad paths refused before anything starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamtsm.capture import Frame
from streamtsm.cli import main
from streamtsm.errors import ConfigError
from streamtsm.overlay import ACTION_COLOUR, annotate
from streamtsm.sinks import StepReport, StreamResult
from streamtsm.sinks.annotated import AnnotatingSink
from streamtsm.sinks.video import (
    FALLBACK_FPS,
    RATE_FRAMES,
    VideoWriter,
    check_output,
    decide_rate,
    video_sink,
)

RUN = [sys.executable, "-m", "streamtsm.cli"]
WAIT_S = 10.0


def _frame(index: int, ts: float = 0.0, media_ts: float | None = None, image=None, sid: str = "cam") -> Frame:
    image = np.full((48, 64, 3), index % 256, np.uint8) if image is None else image
    return Frame(stream_id=sid, index=index, timestamp=ts, image=image, media_ts=media_ts)


def _step(frame: Frame, topk=(("a", 0.9),)) -> StepReport:
    return StepReport(group="m", step_ms=1.0, results=(StreamResult(frame.stream_id, frame, list(topk)),))


def _read_video(path) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


# --- the rate ---------------------------------------------------------------------------------------------------


def test_decide_rate_of_a_file_is_its_fps_over_the_stride():
    fps = 25.0
    frames = [_frame(i, media_ts=i / fps) for i in range(0, 12, 3)]  # every 3rd frame
    assert decide_rate(frames[:1]) is None  # one frame does not tell the stride
    assert decide_rate(frames[:2]) == pytest.approx(fps / 3)
    assert decide_rate(frames) == pytest.approx(fps / 3)
    assert decide_rate([_frame(i, media_ts=i / fps) for i in range(2)]) == pytest.approx(fps)
    assert decide_rate(frames[:1], final=True) == FALLBACK_FPS  # frame 0 alone: nothing to tell it by


def test_decide_rate_of_a_live_source_is_the_median_processed_rate():
    times = [0.0, 1.0] + [1.0 + 0.1 * i for i in range(1, RATE_FRAMES - 1)]  # a slow first step, then 10 fps
    frames = [_frame(i, ts=t) for i, t in enumerate(times)]
    assert decide_rate(frames[:-1]) is None  # fewer than RATE_FRAMES within RATE_SECONDS: not yet
    assert decide_rate(frames) == pytest.approx(10.0)
    assert decide_rate(frames[:3], final=True) == pytest.approx(1 / 0.55)  # median of 1.0 and 0.1
    assert decide_rate([_frame(0, ts=5.0), _frame(1, ts=7.5)]) == pytest.approx(1.0)  # 2 s spanned: decided
    assert decide_rate(frames[:1], final=True) == FALLBACK_FPS


# --- the writer -------------------------------------------------------------------------------------------------


def test_video_writer_writes_the_annotated_frames_in_order(tmp_path):
    path = tmp_path / "cam.avi"
    sink = video_sink(str(path), ["cam"])
    given = []
    sink.on_message("streamtsm.event.cam", {"type": "event", "event": "onset", "stream": "cam", "label": "a",
                                            "score": 0.9})
    for i in range(6):
        frame = _frame(i, media_ts=i / 10.0, image=np.full((96, 128, 3), 20 + 40 * i, np.uint8))
        sink.on_step(_step(frame))
        given.append(frame.image)
    sink.close()
    frames, fps = _read_video(path)
    assert len(frames) == 6 and sink.target.files["cam"].written == 6 and sink.dropped == 0
    assert fps == pytest.approx(10.0, abs=0.01)
    view = sink.tracker.view("cam")
    for written, image in zip(frames, given):
        expected = annotate(image, view).astype(np.int16)
        assert np.abs(written.astype(np.int16) - expected).mean() < 5  # MJPEG is lossy; the next frame is 40 off
    # The action was drawn: the border round the frame is its colour (within the codec's loss).
    assert np.abs(frames[0][95, 64].astype(int) - ACTION_COLOUR).max() < 40


def test_video_sink_keeps_order_and_counts_what_the_writer_cannot_take(tmp_path):
    gate, got = threading.Event(), []

    class Slow:
        def on_step(self, item):
            gate.wait(WAIT_S)
            got.append(item.result.frame.index)

        def close(self):
            pass

    sink = AnnotatingSink(Slow(), maxsize=2, policy="drop_newest", name="slow")
    for i in range(8):
        sink.on_step(_step(_frame(i)))
        if i == 0:
            time.sleep(0.2)  # let the thread take frame 0 and block on it
    gate.set()
    sink.close()
    assert got == sorted(got) and got[:3] == [0, 1, 2]
    assert len(got) + sink.dropped == 8


def test_annotating_sink_draws_each_frame_with_the_view_of_its_moment():
    gate, views = threading.Event(), []

    class Slow:
        def on_step(self, item):
            gate.wait(WAIT_S)
            views.append((item.result.frame.index, item.view.action))

        def close(self):
            pass

    sink = AnnotatingSink(Slow(), maxsize=8, policy="drop_oldest", name="slow")
    sink.on_step(_step(_frame(0)))
    sink.on_message("t", {"type": "event", "event": "onset", "stream": "cam", "label": "wave", "score": 0.8})
    sink.on_step(_step(_frame(1)))
    sink.on_message("t", {"type": "event", "event": "offset", "stream": "cam", "label": "wave", "score": 0.8})
    sink.on_step(_step(_frame(2)))
    gate.set()  # drawn only now, after the offset: each frame still gets the view it was predicted under
    sink.close()
    assert views == [(0, None), (1, "wave"), (2, None)]


def test_video_writer_writes_the_frames_still_waiting_for_a_rate_at_close(tmp_path):
    sink = video_sink(str(tmp_path / "cam.mp4"), ["cam"])
    for i in range(3):  # a live source stopped before RATE_FRAMES frames: the rate is decided from these
        sink.on_step(_step(_frame(i, ts=100.0 + 0.2 * i)))
    sink.close()
    frames, fps = _read_video(tmp_path / "cam.mp4")
    assert len(frames) == 3 == sink.target.files["cam"].written
    assert fps == pytest.approx(5.0, abs=0.01)


def test_video_writer_keeps_the_first_size_when_a_source_changes_resolution(tmp_path):
    writer = VideoWriter({"cam": tmp_path / "cam.avi"})
    sink = AnnotatingSink(writer, maxsize=8, policy="drop_newest", name="w")
    sink.on_step(_step(_frame(0, media_ts=0.0, image=np.zeros((48, 64, 3), np.uint8))))
    sink.on_step(_step(_frame(1, media_ts=0.1, image=np.zeros((96, 128, 3), np.uint8))))
    sink.close()
    frames, _ = _read_video(tmp_path / "cam.avi")
    assert [f.shape for f in frames] == [(48, 64, 3)] * 2


# --- checks before anything starts ------------------------------------------------------------------------------


@pytest.mark.parametrize("template, streams, message", [
    ("x.mkv", 1, "must end in .mp4 or .avi"),
    ("x", 1, "must end in .mp4 or .avi"),
    ("x.mp4", 2, "must contain {stream} with 2 streams"),
    ("missing/x.mp4", 1, "in a folder that exists"),
    ("missing/{stream}/x.mp4", 2, "in a folder that exists"),
])
def test_check_output_refuses_paths_that_cannot_work(tmp_path, template, streams, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_output(str(tmp_path / template), streams)


def test_check_output_refuses_a_folder_and_a_file_as_parent(tmp_path):
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(ConfigError, match="must name a video file, got the folder"):
        check_output(str(tmp_path / "d.mp4"), 1)
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"in a folder that exists, got .* \(a file\)"):
        check_output(str(tmp_path / "f" / "x.mp4"), 1)
    check_output(str(tmp_path / "{stream}.MP4"), 3)  # fine: one file per stream, extension in any case


def test_check_output_refuses_a_folder_it_cannot_write(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere: the folder is made unwritable as os.access sees it
        import streamtsm.sinks.video as video

        real_access = os.access
        monkeypatch.setattr(video.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    try:
        with pytest.raises(ConfigError, match="can write to"):
            check_output(str(locked / "x.mp4"), 1)
    finally:
        locked.chmod(0o700)


def test_video_sink_refuses_two_streams_on_one_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="gives streams 'a' and 'b' the same file"):
        video_sink(str(tmp_path / "{stream}" / ".." / "same.mp4"), ["a", "b"])


@pytest.mark.parametrize("argv, message", [
    (["--output", "out.mkv"], "--output must end in .mp4 or .avi"),
    (["--source", "synthetic", "--source", "synthetic", "--output", "out.mp4"], "must contain {stream}"),
    (["--output", "no/such/folder/out.mp4"], "in a folder that exists"),
])
def test_run_output_bad_path_is_one_line_and_exit_2_before_the_model_loads(capsys, tmp_path, monkeypatch, argv,
                                                                         message):
    monkeypatch.chdir(tmp_path)
    # An unknown model would be the error if the model were loaded first.
    code = main(["run", "--model", "tsm_r77", "--publish", "none", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and "unknown model" not in err


# --- whole runs -------------------------------------------------------------------------------------------------


def _summary_count(pattern: str, out: str) -> int:
    match = re.search(pattern, out)
    assert match, out
    return int(match.group(1))


def test_run_output_of_a_file_has_every_frame_at_the_file_fps(capsys, tmp_path, shared_data):
    clip = shared_data / "videos" / "sample.avi"
    source_fps = cv2.VideoCapture(str(clip)).get(cv2.CAP_PROP_FPS)
    path = tmp_path / "out.mp4"
    code = main(["run", "--source", str(clip), "--frame-stride", "1", "--publish", "none", "--quiet",
                 "--output", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    processed = _summary_count(r"sample: (\d+) frames processed", out)
    frames, fps = _read_video(path)
    assert processed == 164 and len(frames) == processed
    assert _summary_count(r"output: (\d+) frames dropped", out) == 0
    assert fps == pytest.approx(source_fps, abs=0.01) and source_fps == pytest.approx(25.0)
    assert frames[0].shape == (240, 320, 3)


def test_run_output_of_a_file_with_a_slow_writer_still_has_every_frame(capsys, tmp_path, shared_data, monkeypatch):
    import streamtsm.sinks.video as video_module

    real = video_module.VideoWriter.on_step

    def slow(self, item):
        time.sleep(0.01)  # an encoder slower than the model: the file waits for it
        real(self, item)

    monkeypatch.setattr(video_module.VideoWriter, "on_step", slow)
    path = tmp_path / "out.avi"
    code = main(["run", "--source", str(shared_data / "videos" / "sample.avi"), "--frame-stride", "1",
                 "--publish", "none", "--quiet", "--max-frames", "80", "--output", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    processed = _summary_count(r"sample: (\d+) frames processed", out)
    assert processed == 80 and _summary_count(r"output: (\d+) frames dropped", out) == 0
    assert _summary_count(r"output: sample: (\d+) frames written", out) == len(_read_video(path)[0]) == processed


@pytest.mark.parametrize("sources, policy", [
    (["{clip}"], "block"),
    (["synthetic:64x48@30"], "drop_newest"),
    (["{clip}", "synthetic:64x48@30"], "drop_newest"),  # one live source: nothing may wait
])
def test_run_output_and_recorder_block_only_when_every_source_is_a_file(capsys, tmp_path, shared_data, monkeypatch,
                                                                        sources, policy):
    import streamtsm.sinks.recorder as recorder_module
    import streamtsm.sinks.video as video_module

    made: dict[str, str] = {}
    real_video_sink, real_recorder_sink = video_module.video_sink, recorder_module.RecorderSink

    def video_sink(*args, **kwargs):
        sink = real_video_sink(*args, **kwargs)
        made["output"] = sink.policy
        return sink

    class RecorderSink(real_recorder_sink):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made["recorder"] = self.queue.policy

    monkeypatch.setattr(video_module, "video_sink", video_sink)
    monkeypatch.setattr(recorder_module, "RecorderSink", RecorderSink)
    argv = ["run", "--publish", "none", "--quiet", "--max-frames", "2", "--output", str(tmp_path / "{stream}.avi"),
            "--record-events", str(tmp_path / "rec")]
    for i, source in enumerate(sources):
        argv += ["--source", source.format(clip=shared_data / "videos" / "sample.avi"), "--name", f"s{i}"]
    code = main(argv)
    assert code == 0, capsys.readouterr()
    assert made == {"output": policy, "recorder": policy}


def test_run_output_writes_one_file_per_stream(capsys, tmp_path):
    code = main(["run", "--source", "synthetic:96x72@30", "--source", "synthetic:64x48@30", "--name", "a",
                 "--name", "b", "--publish", "none", "--quiet", "--max-frames", "4",
                 "--output", str(tmp_path / "{stream}.avi")])
    out = capsys.readouterr().out
    assert code == 0, out
    for sid, shape in [("a", (72, 96, 3)), ("b", (48, 64, 3))]:
        frames, _ = _read_video(tmp_path / f"{sid}.avi")
        written = _summary_count(rf"output: {sid}: (\d+) frames written", out)
        assert len(frames) == written == 4 and frames[0].shape == shape


def test_run_output_plays_after_sigterm(tmp_path):
    path = tmp_path / "x.mp4"
    proc = subprocess.Popen(RUN + ["run", "--source", "synthetic:96x72@30", "--publish", "none",
                                   "--output", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, seen = time.monotonic() + 60, 0
        while time.monotonic() < deadline and seen < 2:  # two printed predictions: frames are being written
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"run exited early: {proc.stderr.read()}")
            seen += "synthetic #" in line
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    written = _summary_count(r"output: synthetic: (\d+) frames written", out)
    dropped = _summary_count(r"output: (\d+) frames dropped", out)
    processed = _summary_count(r"synthetic: (\d+) frames processed", out)
    frames, fps = _read_video(path)
    assert written >= 2 and len(frames) == written and written + dropped == processed
    assert 1.0 <= fps <= 240.0
