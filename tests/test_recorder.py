"""Event recordings (`run --record-events DIR`): per action a clip from the pre-roll to the post-roll, a snapshot of
its first frame and a sidecar of its events; memory held to the pre-roll, disk held under the cap, the paths in the
offset message."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from streamtsm.capture import Frame
from streamtsm.cli import main
from streamtsm.postprocess import ActionEvent
from streamtsm.publish import Subscriber
from streamtsm.publish.schema import TOPIC_EVENT, event_message, topic_for
from streamtsm.sinks import CallbackSink, StepReport, StreamResult
from streamtsm.sinks.fanout import Fanout
from streamtsm.sinks.recorder import Recorder, RecorderSink, RecordingNames

SID = "cam0"
W, H = 64, 48
T0 = 1_700_000_000.0


def _image(index: int) -> np.ndarray:
    """A frame that differs from its neighbours in a way JPEG keeps: a bright block that moves with the index."""
    image = np.full((H, W, 3), 40, np.uint8)
    x = (index * 4) % (W - 16)
    image[8:40, x:x + 16] = (255, 200, 100)
    return image


def _frame(index: int, fps: float, media: bool, t0: float = T0) -> Frame:
    # A file is processed faster than it plays: its capture times are close together, its media times are not.
    if media:
        return Frame(SID, index, t0 + index * 0.001, _image(index), media_ts=index / fps)
    return Frame(SID, index, t0 + index / fps, _image(index))


def _event(kind: str, start: Frame, end: Frame | None = None) -> ActionEvent:
    return ActionEvent(kind=kind, label="waving", start_frame=start.index, start_ts=start.timestamp,
                       end_frame=end.index if end else None, end_ts=end.timestamp if end else None, score=0.9,
                       start_media_ts=start.media_ts, end_media_ts=end.media_ts if end else None)


def _message(event: ActionEvent, at: Frame) -> dict:
    return event_message(stream_id=SID, model="m", event=event, frame_index=at.index, capture_ts=at.timestamp,
                         media_ts=at.media_ts)


def _feed(sink, n: int, fps: float, actions: list[tuple[int, int]], *, hold: int = 3, media: bool = False,
          fanout: Fanout | None = None, t0: float = T0) -> dict[str, list[dict]]:
    """Frames 0..n-1 of one stream, in the pipeline's order (a frame's events before its step); each action
    ``(first, last)`` gets its onset ``hold - 1`` frames after ``first`` and its offset ``hold`` after ``last``."""
    frames = [_frame(i, fps, media, t0) for i in range(n)]
    sent: dict[str, list[dict]] = {"onset": [], "offset": []}
    for i, f in enumerate(frames):
        for first, last in actions:
            if i not in (first + hold - 1, last + hold):
                continue
            end_frame = frames[last] if last < n else None
            for kind, decided, end in (("onset", first + hold - 1, None), ("offset", last + hold, end_frame)):
                if i == decided:
                    event = _event(kind, frames[first], end)
                    if fanout is not None:
                        fanout.events(SID, "m", [event], f.index, f.timestamp, f.media_ts)
                    else:
                        payload = _message(event, f)
                        sink.on_message(topic_for(TOPIC_EVENT, SID), payload)
                        sent[kind].append(payload)
        report = StepReport("m", 1.0, (StreamResult(SID, f, [("waving", 0.9)]),))
        (fanout.step if fanout is not None else sink.on_step)(report)
    return sent


def _read_clip(path: Path) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS)
    images = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        images.append(image)
    cap.release()
    return images, fps


def _sidecars(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*.json"))]


@pytest.mark.parametrize("media", [False, True], ids=["capture_time", "media_time"])
def test_recorder_clip_spans_pre_roll_action_and_post_roll(tmp_path, media):
    fps, pre, post = 10.0, 1.0, 1.5
    rec = Recorder(tmp_path, pre_roll=pre, post_roll=post, onset_lag=3)
    _feed(rec, 100, fps, [(30, 50)], media=media)
    rec.close()
    (side,) = _sidecars(tmp_path)
    images, clip_fps = _read_clip(tmp_path / side["clip"])
    action = (50 - 30) / fps
    assert abs(len(images) - (pre + action + post) * fps) <= 1
    assert side["frames"] == len(images) and side["end"] == "post_roll"
    assert clip_fps == pytest.approx(fps, rel=0.01)  # the frames' own timing, media or capture
    assert side["time_base"] == ("media" if media else "capture")


def test_recorder_snapshot_is_the_onset_frame(tmp_path):
    rec = Recorder(tmp_path, pre_roll=1.0, post_roll=1.0)
    _feed(rec, 80, 10.0, [(30, 50)])
    rec.close()
    (side,) = _sidecars(tmp_path)
    snapshot = cv2.imread(str(tmp_path / side["snapshot"]))
    assert snapshot is not None and snapshot.shape == (H, W, 3)
    diff = np.abs(snapshot.astype(int) - _image(30)).mean()
    assert diff < 4  # the onset's first frame, up to JPEG
    assert np.abs(snapshot.astype(int) - _image(29)).mean() > 4 * diff + 4  # and not its neighbour
    assert side["snapshot_frame"] == 30


def test_recorder_sidecar_holds_both_event_messages(tmp_path):
    rec = Recorder(tmp_path, pre_roll=0.5, post_roll=0.5)
    sent = _feed(rec, 80, 10.0, [(20, 30), (50, 60)])
    rec.close()
    sides = _sidecars(tmp_path)
    assert len(sides) == 2 and rec.written == 2
    for side, onset, offset in zip(sides, sent["onset"], sent["offset"]):
        assert side["onset"] == onset and side["offset"] == offset and side["end"] == "post_roll"
        assert side["stream"] == SID


def test_recording_names_agree_between_event_and_its_payload():
    names = RecordingNames("/x")
    rng = random.Random(0)
    for _ in range(2000):
        ts = T0 + rng.random() * 1e6
        frame = Frame(SID, rng.randrange(10**9), ts, _image(0))
        event = _event("onset", frame)
        payload = _message(event, frame)
        assert names.stem(SID, event.start_frame, event.start_ts) == names.stem(SID, payload["start_frame"],
                                                                                 payload["start_ts"])


def test_fanout_adds_clip_and_snapshot_to_the_offset_message_only(tmp_path):
    got: list[dict] = []
    sink = RecorderSink(Recorder(tmp_path, pre_roll=0.5, post_roll=0.5), maxsize=1000)  # nothing dropped
    fanout = Fanout([CallbackSink(messages=lambda topic, payload: got.append(payload)), sink])
    _feed(None, 60, 10.0, [(20, 30)], fanout=fanout)
    sink.close()
    onset, offset = (p for p in got if p["type"] == "event")
    assert "clip" not in onset and "snapshot" not in onset
    assert offset["clip"].endswith(".mp4") and offset["snapshot"].endswith(".jpg")
    assert not Path(offset["clip"]).is_absolute()  # relative to DIR
    images, _ = _read_clip(tmp_path / offset["clip"])
    assert images and cv2.imread(str(tmp_path / offset["snapshot"])) is not None
    assert json.loads((tmp_path / offset["clip"]).with_suffix(".json").read_text())["offset"] == offset
    assert sink.dropped == 0


def test_fanout_without_a_recorder_leaves_the_offset_message_as_it_was():
    got: list[dict] = []
    fanout = Fanout([CallbackSink(messages=lambda topic, payload: got.append(payload))])
    _feed(None, 60, 10.0, [(20, 30)], fanout=fanout)
    offset = got[-1]
    assert offset["event"] == "offset" and "clip" not in offset and "snapshot" not in offset


def test_recorder_ring_holds_only_the_pre_roll(tmp_path):
    fps, pre, lag = 30.0, 1.0, 3
    rec = Recorder(tmp_path, pre_roll=pre, onset_lag=lag)
    most = 0
    for i in range(400):
        rec.on_step(StepReport("m", 1.0, (StreamResult(SID, _frame(i, fps, False), []),)))
        most = max(most, rec.frames_held())
    assert pre * fps <= most <= pre * fps + lag + 2


def test_recorder_cuts_an_action_longer_than_max_clip_and_says_so(tmp_path):
    fps = 10.0
    rec = Recorder(tmp_path, pre_roll=0.5, post_roll=0.5, max_clip=3.0, onset_lag=3)
    most = 0
    frames = [_frame(i, fps, False) for i in range(200)]
    onset = _message(_event("onset", frames[10]), frames[12])
    offset = _message(_event("offset", frames[10], frames[180]), frames[183])
    for f in frames:
        if f.index == 12:
            rec.on_message("e", onset)
        if f.index == 183:
            rec.on_message("e", offset)
        rec.on_step(StepReport("m", 1.0, (StreamResult(SID, f, []),)))
        most = max(most, rec.frames_held())
    rec.close()
    (side,) = _sidecars(tmp_path)
    assert side["end"] == "max_clip" and abs(side["frames"] - 3.0 * fps) <= 1
    assert side["offset"] == offset  # the sidecar gets the offset when it comes
    assert most <= 3.0 * fps + 0.5 * fps + 3 + 2  # the action's frames were bounded by max_clip, not its length
    assert len(_read_clip(tmp_path / side["clip"])[0]) == side["frames"]


def _fake_unit(root: Path, stem: str, size: int, age_s: float) -> list[Path]:
    paths = []
    for suffix in (".mp4", ".jpg", ".json"):
        p = root / (stem + suffix)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * (size // 3))
        t = time.time() - age_s
        os.utime(p, (t, t))
        paths.append(p)
    return paths


def test_recorder_disk_cap_removes_the_oldest_recordings_first(tmp_path, caplog):
    # The size of the one recording made below, measured by making it once elsewhere (encoding is deterministic).
    probe = Recorder(tmp_path / "probe", pre_roll=0.5, post_roll=0.5)
    _feed(probe, 60, 10.0, [(20, 30)])
    probe.close()
    size = probe.disk_bytes()
    root = tmp_path / "rec"
    oldest = _fake_unit(root, "cam0/cam0-20230101T000000.000Z-f1", 30_000, age_s=300)
    older = _fake_unit(root, "cam1/cam1-20230101T000100.000Z-f7", 30_000, age_s=200)
    mine = root / "cam0" / "notes.txt"  # not a recording: never removed
    mine.write_bytes(b"y" * 100_000)
    rec = Recorder(root, pre_roll=0.5, post_roll=0.5, max_bytes=size + 30_000 + 100)
    assert rec.disk_bytes() == 60_000  # earlier runs' recordings are counted
    with caplog.at_level(logging.INFO, logger="streamtsm.sinks.recorder"):
        _feed(rec, 60, 10.0, [(20, 30)])
        rec.close()
    assert not any(p.exists() for p in oldest) and all(p.exists() for p in older) and mine.exists()
    assert rec.removed == 1 and rec.disk_bytes() <= rec.max_bytes
    assert "removed cam0/cam0-20230101T000000.000Z-f1" in caplog.text
    # A tighter cap takes every older recording, and keeps the newest whatever its size.
    rec = Recorder(root, pre_roll=0.5, post_roll=0.5, max_bytes=1)
    _feed(rec, 60, 10.0, [(20, 30)], t0=T0 + 3600)
    rec.close()
    assert not any(p.exists() for p in older) and rec.removed == 2 and mine.exists()
    (side,) = _sidecars(root)
    assert side["onset"]["start_ts"] > T0 + 3600


def test_recorder_files_that_cannot_be_written_warn_once_and_are_counted(tmp_path, caplog):
    (tmp_path / SID).write_text("a file where the stream's folder would go")
    rec = Recorder(tmp_path, pre_roll=0.5, post_roll=0.5)
    with caplog.at_level(logging.WARNING, logger="streamtsm.sinks.recorder"):
        _feed(rec, 90, 10.0, [(20, 30), (50, 60)])
        rec.close()
    assert rec.failed == 2 and rec.written == 0
    assert caplog.text.count("cannot write") == 1


def test_recorder_stop_mid_action_writes_the_clip_and_says_the_run_ended(tmp_path):
    rec = Recorder(tmp_path, pre_roll=0.5, post_roll=0.5)
    _feed(rec, 50, 10.0, [(20, 1000)])  # the action is still going when the frames stop
    rec.close()
    (side,) = _sidecars(tmp_path)
    assert side["end"] == "run_ended" and side["offset"] is None
    images, _ = _read_clip(tmp_path / side["clip"])
    assert abs(len(images) - (0.5 + 3.0) * 10) <= 1


def test_recorder_streams_a_clip_as_its_frames_arrive_so_a_stop_encodes_only_a_few(tmp_path, monkeypatch):
    real = cv2.VideoWriter
    phase, writes = ["running"], []

    class Counting:  # cv2.VideoWriter, counting the frames encoded and when
        def __init__(self, *args):
            self.writer = real(*args)

        def isOpened(self):
            return self.writer.isOpened()

        def write(self, image):
            writes.append(phase[0])
            self.writer.write(image)

        def release(self):
            self.writer.release()

    monkeypatch.setattr(cv2, "VideoWriter", Counting)
    fps, lag = 30.0, 3
    rec = Recorder(tmp_path, pre_roll=1.0, post_roll=0.5, onset_lag=lag)
    _feed(rec, 300, fps, [(60, 10_000)], hold=lag)  # 8 s of action, still going when the frames stop
    assert rec.frames_unwritten() <= lag
    phase[0] = "closing"
    rec.close()
    (side,) = _sidecars(tmp_path)
    images, _ = _read_clip(tmp_path / side["clip"])
    assert side["end"] == "run_ended" and len(images) == side["frames"]
    assert abs(len(images) - (300 - 60 + 1.0 * fps)) <= 1  # the pre-roll and every frame of the action
    # All but the last onset_lag frames were encoded as they came: the stop had only those left.
    assert writes.count("closing") <= lag and len(writes) == side["frames"]


def test_recorder_post_roll_zero_ends_the_clip_at_the_actions_last_frame(tmp_path):
    # The offset comes `hold` frames after the action's last one: the frames between must not reach the clip.
    fps = 10.0
    rec = Recorder(tmp_path, pre_roll=1.0, post_roll=0.0, onset_lag=3)
    _feed(rec, 80, fps, [(30, 50)], hold=3)
    rec.close()
    (side,) = _sidecars(tmp_path)
    images, _ = _read_clip(tmp_path / side["clip"])
    assert side["frames"] == len(images) == 31  # frames 20..50
    assert side["clip_end"] == pytest.approx(T0 + 50 / fps) and side["end"] == "post_roll"


def test_recorder_sink_block_keeps_every_frame_of_a_file_from_a_slow_recorder(tmp_path):
    class Slow(Recorder):
        def on_step(self, step):
            time.sleep(0.002)  # a disk slower than the model
            super().on_step(step)

    sink = RecorderSink(Slow(tmp_path, pre_roll=1.0, post_roll=1.0), maxsize=2, policy="block")
    _feed(sink, 100, 10.0, [(30, 60)], media=True)
    sink.close()
    (side,) = _sidecars(tmp_path)
    assert sink.dropped == 0 and side["end"] == "post_roll"
    assert side["frames"] == len(_read_clip(tmp_path / side["clip"])[0]) == 51  # frames 20..70


# -- the command line ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--pre-roll", "nan"], "--pre-roll must be >= 0 and <= 300"),
    (["--pre-roll", "-1"], "--pre-roll must be >= 0"),
    (["--post-roll", "301"], "--post-roll must be >= 0 and <= 300"),
    (["--record-max-gb", "0"], "--record-max-gb must be > 0"),
    (["--record-max-gb", "inf"], "--record-max-gb must be > 0"),
    (["--record-max-clip", "0"], "--record-max-clip must be > 0"),
])
def test_run_record_options_out_of_range_are_one_line_and_exit_2(tmp_path, capsys, argv, words):
    code = main(["run", "--publish", "none", "--record-events", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_run_record_events_on_a_file_or_uncreatable_folder_is_one_line_and_exit_2(tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("")
    for target, words in ((a_file, "must name a folder, got the file"), (a_file / "sub", "cannot create")):
        code = main(["run", "--publish", "none", "--record-events", str(target), "--duration", "1"])
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_run_record_options_without_the_folder_are_one_line_and_exit_2(capsys):
    code = main(["run", "--publish", "none", "--pre-roll", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "--pre-roll need --record-events DIR" in err


def _free_port() -> int:
    s = zmq.Context.instance().socket(zmq.PUB)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(linger=0)
    return port


def test_run_record_events_puts_paths_in_offsets_and_a_stop_mid_action_leaves_a_playable_clip(tmp_path):
    port = _free_port()
    root = tmp_path / "rec"
    proc = subprocess.Popen([sys.executable, "-m", "streamtsm.cli", "run", "--source", "synthetic:64x48@30",
                             "--publish", f"tcp://127.0.0.1:{port}", "--duration", "120", "--quiet",
                             "--record-events", str(root), "--pre-roll", "0.5", "--post-roll", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    offset = in_progress = None
    try:
        with Subscriber(f"tcp://127.0.0.1:{port}", [TOPIC_EVENT]) as sub:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and in_progress is None:
                got = sub.recv(timeout=1.0)
                if got is None:
                    assert proc.poll() is None, proc.communicate()[1]
                    continue
                payload = got[1]
                if payload["event"] == "offset" and offset is None:
                    offset = payload
                elif payload["event"] == "onset" and offset is not None:
                    in_progress = payload
        assert in_progress is not None, "no offset and later onset within 90 s"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "recordings:" in out
    # The offset named its recording, relative to DIR; it was written there.
    assert offset["clip"] == RecordingNames(root).paths("synthetic", offset["start_frame"], offset["start_ts"])["clip"]
    assert _read_clip(root / offset["clip"])[0] and cv2.imread(str(root / offset["snapshot"])) is not None
    # The action in progress at the stop: its clip plays, and its sidecar says the run ended it.
    stem = RecordingNames(root).stem("synthetic", in_progress["start_frame"], in_progress["start_ts"])
    side = json.loads((root / (stem + ".json")).read_text())
    assert side["end"] == "run_ended" and side["onset"] == in_progress
    images, _ = _read_clip(root / side["clip"])
    assert len(images) == side["frames"] > 0


def test_site_config_record_settings_apply_beside_the_file_and_the_command_line_wins(tmp_path, capsys,
                                                                                     monkeypatch):
    import streamtsm.sinks.recorder as recorder_module
    from streamtsm.siteconfig import load_site_config

    made: list[dict] = []

    class Seen(Recorder):
        def __init__(self, root, **kwargs):
            made.append({"root": Path(root), **kwargs})
            super().__init__(root, **kwargs)

    monkeypatch.setattr(recorder_module, "Recorder", Seen)

    path = tmp_path / "site.toml"
    path.write_text('[defaults]\nrecord_events = "rec"\npre_roll = 1\npost_roll = 0.5\n\n'
                    '[[camera]]\nid = "cam0"\nsource = "synthetic:64x48@30"\n')
    site = load_site_config(path)
    assert site.options["record_events"] == str(tmp_path / "rec") and site.options["pre_roll"] == 1
    code = main(["run", "--config", str(path), "--publish", "none", "--max-frames", "2", "--quiet",
                 "--post-roll", "3"])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "rec").is_dir() and f"recordings: 0 written to {tmp_path / 'rec'}" in out
    (seen,) = made
    assert seen["root"] == tmp_path / "rec" and (seen["pre_roll"], seen["post_roll"]) == (1, 3.0)  # file, line
    assert seen["max_clip"] == 120.0 and seen["max_bytes"] == 10e9  # built in
    path.write_text('[defaults]\nrecord_events = "rec"\npre_roll = -1\n\n[[camera]]\nid = "c"\nsource = 0\n')
    code = main(["run", "--config", str(path), "--publish", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "site.toml:3: [defaults] pre_roll must be >= 0" in err, err


def test_recorder_sink_queues_only_events_and_steps_and_counts_what_it_drops(tmp_path):
    import threading

    gate = threading.Event()

    class Slow(Recorder):
        def on_step(self, step):
            gate.wait(10)
            super().on_step(step)

    sink = RecorderSink(Slow(tmp_path), maxsize=2)
    for i in range(100):  # predictions and stats: never queued, so never dropped
        sink.on_message(f"streamtsm.pred.{SID}", {"type": "pred", "n": i})
        sink.on_message("streamtsm.stats", {"type": "stats"})
    assert sink.dropped == 0
    for i in range(10):  # returns at once though the recorder is blocked
        sink.on_step(StepReport("m", 1.0, (StreamResult(SID, _frame(i, 10.0, False), []),)))
    gate.set()
    sink.close()
    assert 7 <= sink.dropped <= 8  # 10 given: one being delivered, two queued
    assert f"{sink.dropped} items dropped" in sink.summary()
