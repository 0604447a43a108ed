"""The overlay: a stream's view kept from the pipeline's messages (ViewTracker), drawn on a frame (annotate) and
tested on the images it makes; and the --show window that uses it, which refuses to start without a display."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest

from streamtsm.capture import Frame
from streamtsm.errors import ConfigError
from streamtsm.overlay import (
    ACTION_COLOUR,
    BAR_COLOUR,
    PANEL_ALPHA,
    PANEL_COLOUR,
    StreamView,
    ViewTracker,
    annotate,
    elide,
    layout_for,
    style_for,
    text_width,
)
from streamtsm.postprocess import ActionEvent
from streamtsm.publish.schema import decode, encode, event_message, prediction_message, stats_message
from streamtsm.sinks import StepReport, StreamResult
from streamtsm.sinks.display import check_display, gui_backend

TOPK = [("waving", 0.7), ("clapping", 0.4), ("swiping_left", 0.1)]


def _view(**changes) -> StreamView:
    values = dict(stream_id="cam0", topk=list(TOPK), action=None, action_score=None, fps=29.9, latency_ms=38.0,
                  status="running")
    values.update(changes)
    return StreamView(**values)


def _noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width) if channels == 0 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _wire(payload: dict) -> tuple[str, dict]:
    """The message as a subscriber receives it (NaN scores become null on the wire)."""
    return decode(encode("streamtsm.x", payload))


def _pred(stream: str, topk, frame: int = 1, latency_ms: float = 40.0) -> tuple[str, dict]:
    return _wire(prediction_message(stream_id=stream, frame_index=frame, capture_ts=1000.0, model="m", topk=topk,
                                    publish_ts=1000.0 + latency_ms / 1000.0))


def _event(stream: str, kind: str, label: str, score: float = 0.8) -> tuple[str, dict]:
    onset = kind == "onset"
    event = ActionEvent(kind=kind, label=label, start_frame=10, start_ts=999.0, end_frame=None if onset else 20,
                        end_ts=None if onset else 999.5, score=score)
    return _wire(event_message(stream_id=stream, model="m", event=event, frame_index=22, capture_ts=1000.0))


def _bar_lengths(image: np.ndarray) -> list[int]:
    """The length in pixels of each score bar, top to bottom: bands of rows holding BAR_COLOUR pixels."""
    mask = np.all(image == np.array(BAR_COLOUR, np.uint8), axis=2)
    per_row = mask.sum(axis=1)
    lengths, band = [], 0
    for count in [*per_row, 0]:
        if count:
            band = max(band, int(count))
        elif band:
            lengths.append(band)
            band = 0
    return lengths


def _count(image: np.ndarray, colour) -> int:
    return int(np.all(image == np.array(colour, np.uint8), axis=2).sum())


# --- annotate ---------------------------------------------------------------------------------------------------


def test_annotate_leaves_the_input_untouched_and_returns_a_new_image_of_its_shape():
    image = _noise(240, 320)
    before = image.copy()
    out = annotate(image, _view(action="waving", action_score=0.7))
    assert np.array_equal(image, before)
    assert out is not image and not np.shares_memory(out, image)
    assert out.shape == image.shape and out.dtype == np.uint8


def test_annotate_changes_the_panel_and_nothing_else_without_an_action():
    image = _noise(480, 640)
    out = annotate(image, _view())
    x, y, w, h = layout_for(480, 640, _view()).panel
    assert w > 0 and h > 0
    changed = np.any(out != image, axis=2)
    inside = np.zeros_like(changed)
    inside[y:y + h, x:x + w] = True
    assert not changed[~inside].any()
    # Alpha-blended over the whole panel: nearly every pixel of it differs (noise equal to the blend stays).
    assert changed[inside].mean() > 0.95


def test_annotate_panel_is_translucent_and_its_text_has_no_dark_shadow():
    view = _view(topk=[])
    black = annotate(np.zeros((480, 640, 3), np.uint8), view)
    white = annotate(np.full((480, 640, 3), 255, np.uint8), view)
    layout = layout_for(480, 640, view)
    x, y, w, h = layout.panel
    # A pixel of the panel's padding shows the frame through the panel's colour.
    expected_white = round(255 * (1 - PANEL_ALPHA) + PANEL_COLOUR[0] * PANEL_ALPHA)
    assert abs(int(white[y + 1, x + 1, 0]) - expected_white) <= 1
    assert abs(int(black[y + 1, x + 1, 0]) - round(PANEL_COLOUR[0] * PANEL_ALPHA)) <= 1
    # Text is light drawn on the blend: no pixel of the id row is darker than the blend (a shadow would be).
    row_y = dict(layout.rows)["id"]
    id_row = white[y + row_y:y + row_y + layout.style.line_h, x:x + w]
    assert id_row.max() > expected_white + 50  # there is text
    assert id_row.min() >= expected_white - 1


def test_annotate_bar_lengths_follow_the_scores():
    image = np.full((480, 640, 3), 128, np.uint8)
    view = _view()
    lengths = _bar_lengths(annotate(image, view))
    assert len(lengths) == 3
    assert lengths[0] > lengths[1] > lengths[2] > 0
    layout = layout_for(480, 640, view)
    inner = layout.panel[2] - 2 * layout.style.pad
    for length, (_, score) in zip(lengths, TOPK):
        assert abs(length - score * inner) <= 1
    # Reordered scores reorder the bars.
    lengths = _bar_lengths(annotate(image, _view(topk=[("a", 0.2), ("b", 0.9)])))
    assert lengths[0] < lengths[1]


def test_annotate_shows_a_nonfinite_or_out_of_range_score_without_raising():
    image = np.full((480, 640, 3), 128, np.uint8)
    lengths = _bar_lengths(annotate(image, _view(topk=[("a", 1.5), ("b", math.nan), ("c", -1.0)])))
    layout = layout_for(480, 640, _view())
    assert lengths == [layout.panel[2] - 2 * layout.style.pad]  # clipped to 1; nan and negative draw no fill


def test_annotate_highlights_the_action_only_between_onset_and_offset():
    tracker = ViewTracker()
    image = np.full((240, 320, 3), 128, np.uint8)
    highlighted = []
    for topic, payload in [_pred("cam0", TOPK), _event("cam0", "onset", "waving"), _pred("cam0", TOPK, 2),
                           _event("cam0", "offset", "waving"), _pred("cam0", TOPK, 3)]:
        tracker.on_message(topic, payload)
        out = annotate(image, tracker.view("cam0"))
        green = _count(out, ACTION_COLOUR)
        # The border round the frame, away from the panel.
        border = tuple(out[239, 160]) == ACTION_COLOUR and tuple(out[120, 319]) == ACTION_COLOUR
        assert border == (green > 0)
        highlighted.append(green > 0)
    assert highlighted == [False, True, True, False, False]


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (2, 2), (5, 3000), (3000, 5), (96, 96), (97, 131),
                                  (2160, 3840)])
def test_annotate_draws_on_any_frame_size(size):
    view = _view(topk=[(f"a_label_much_longer_than_any_panel_{i}", 1.0 / (i + 1)) for i in range(40)],
                 stream_id="a-stream-id-that-is-long-" * 4, action="waving_" * 20, action_score=0.5)
    image = _noise(*size, seed=1)
    out = annotate(image, view)
    assert out.shape == (*size, 3) and out.dtype == np.uint8


def test_annotate_shows_the_panel_on_the_smallest_usual_frame():
    out = annotate(np.full((96, 96, 3), 128, np.uint8), _view())
    assert len(_bar_lengths(out)) >= 1  # id, fps line and at least the best label fit
    assert [kind for kind, _ in layout_for(96, 96, _view()).rows][:3] == ["id", "info", "bar"]


def test_annotate_text_height_scales_with_frame_height():
    heights = []
    for h, w in [(240, 320), (480, 640), (1080, 1920), (2160, 3840)]:
        view = _view(stream_id="HH", topk=[])
        out = annotate(np.zeros((h, w, 3), np.uint8), view)
        layout = layout_for(h, w, view)
        x, y, pw, _ = layout.panel
        row_y = dict(layout.rows)["id"]
        ink = np.any(out[y + row_y:y + row_y + layout.style.line_h, x:x + pw] > 100, axis=2)
        rows = np.flatnonzero(ink.any(axis=1))
        heights.append(int(rows[-1] - rows[0] + 1))
    assert heights == sorted(heights) and len(set(heights)) == 4
    assert 3.0 < heights[3] / heights[1] < 6.0  # 2160 / 480 = 4.5
    assert heights[0] >= 6  # legible on a small frame


@pytest.mark.parametrize("channels", [0, 1, 4])
def test_annotate_converts_grey_and_bgra_to_bgr(channels):
    image = _noise(240, 320, channels)
    before = image.copy()
    out = annotate(image, _view())
    assert out.shape == (240, 320, 3) and out.dtype == np.uint8
    assert np.array_equal(image, before)
    code = cv2.COLOR_BGRA2BGR if channels == 4 else cv2.COLOR_GRAY2BGR
    expected = cv2.cvtColor(image if channels != 1 else image[:, :, 0], code)
    x, y, w, h = layout_for(240, 320, _view()).panel
    assert np.array_equal(out[y + h:], expected[y + h:])  # below the panel: the frame, converted


@pytest.mark.parametrize("image", [np.zeros((10, 10, 3), np.float32), np.zeros((10, 10, 2), np.uint8),
                                   np.zeros((0, 10, 3), np.uint8), np.zeros((10,), np.uint8), [[1, 2]]],
                         ids=["float", "2-channels", "empty", "1-d", "list"])
def test_annotate_refuses_what_is_not_an_image(image):
    with pytest.raises(ConfigError, match="annotate needs"):
        annotate(image, _view())


def test_elide_cuts_what_does_not_fit():
    style = style_for(480, 640)
    assert elide("waving", 1000, style) == "waving"
    short = elide("a_label_much_longer_than_the_room", 100, style)
    assert short.endswith("...") and text_width(short, style) <= 100 and len(short) > 3
    assert elide("a_label", 2, style) == ""


# --- ViewTracker ------------------------------------------------------------------------------------------------


def test_view_tracker_gives_a_fresh_view_for_an_unknown_stream():
    view = ViewTracker().view("cam9")
    assert view == StreamView("cam9") and view.topk == [] and view.action is None and view.status == "starting"


def test_view_tracker_takes_topk_and_latency_from_predictions():
    tracker = ViewTracker()
    tracker.on_message(*_pred("cam0", [("a", 0.6), ("b", float("nan"))], frame=7, latency_ms=40.0))
    view = tracker.view("cam0")
    assert view.topk[0] == ("a", 0.6) and view.topk[1][0] == "b" and math.isnan(view.topk[1][1])
    assert view.latency_ms == pytest.approx(40.0, abs=1e-3) and view.frame == 7 and view.model == "m"
    assert tracker.view("cam1") == StreamView("cam1")  # other streams unchanged


def test_view_tracker_action_runs_from_onset_to_offset():
    tracker = ViewTracker()
    tracker.on_message(*_event("cam0", "onset", "waving", 0.8))
    assert (tracker.view("cam0").action, tracker.view("cam0").action_score) == ("waving", pytest.approx(0.8))
    tracker.on_message(*_pred("cam0", [("waving", 0.9), ("b", 0.1)]))
    assert tracker.view("cam0").action_score == pytest.approx(0.9)  # the newest score of the action
    tracker.on_message(*_pred("cam0", [("b", 0.9)]))
    assert tracker.view("cam0").action_score == pytest.approx(0.9)  # not listed: kept
    tracker.on_message(*_event("cam0", "offset", "other"))
    assert tracker.view("cam0").action == "waving"  # another label's offset does not end it
    tracker.on_message(*_event("cam0", "offset", "waving"))
    assert (tracker.view("cam0").action, tracker.view("cam0").action_score) == (None, None)


def test_view_tracker_takes_fps_and_status_from_stats():
    tracker = ViewTracker()
    tracker.on_message(*_wire(stats_message(streams={"cam0": {"fps": 12.5, "status": "running"},
                                                     "cam1": {"fps": None, "status": "reconnecting"}})))
    assert (tracker.view("cam0").fps, tracker.view("cam0").status) == (12.5, "running")
    assert (tracker.view("cam1").fps, tracker.view("cam1").status) == (None, "reconnecting")
    assert tracker.stream_ids() == ["cam0", "cam1"]


def test_view_tracker_hands_out_copies():
    tracker = ViewTracker()
    tracker.on_message(*_pred("cam0", [("a", 0.6)]))
    view = tracker.view("cam0")
    view.topk.append(("x", 1.0))
    view.action = "x"
    assert tracker.view("cam0").topk == [("a", 0.6)] and tracker.view("cam0").action is None


def test_view_tracker_ignores_what_it_does_not_know():
    tracker = ViewTracker()
    for payload in [{"type": "pred"}, {"type": "event", "stream": 3}, {"type": "stats", "streams": {"c": 5}},
                    {"type": "other", "stream": "c"}, "not a dict", {"type": "pred", "stream": "c", "topk": [5]}]:
        tracker.on_message("t", payload)
    assert tracker.view("c").topk == [] and tracker.view("c").action is None


# --- --show: the window draws the overlay, and refuses to start without a display ------------------------------

QT_BUILD = "General configuration for OpenCV 5.0.0\n  GUI:                           QT5\n    QT:  YES (ver 5.15)\n"
HEADLESS_BUILD = "General configuration\n  GUI:                           NONE\n  Media I/O:\n"
OLD_GTK_BUILD = "  GUI: \n    QT:                          NO\n    GTK+:                        YES (ver 3.24.20)\n" \
                "      GThread :                  YES (ver 2.64.6)\n  Media I/O:\n"
OLD_NONE_BUILD = "  GUI: \n    QT:                          NO\n    GTK+:                        NO\n  Media I/O:\n"
RUN = [sys.executable, "-m", "streamtsm.cli"]


@pytest.mark.parametrize("text, backend", [(QT_BUILD, "QT5"), (HEADLESS_BUILD, None), (OLD_GTK_BUILD, "GTK+"),
                                           (OLD_NONE_BUILD, None), ("no such section", None)])
def test_gui_backend_reads_the_build_information(text, backend):
    assert gui_backend(text) == backend


def test_check_display_refuses_a_headless_opencv():
    with pytest.raises(ConfigError, match="no window backend|has none"):
        check_display({"DISPLAY": ":0"}, "linux", HEADLESS_BUILD)


def test_check_display_refuses_linux_without_a_display():
    with pytest.raises(ConfigError, match="neither DISPLAY nor WAYLAND_DISPLAY is set"):
        check_display({}, "linux", QT_BUILD)
    with pytest.raises(ConfigError, match="no X server answers at DISPLAY=:987"):
        check_display({"DISPLAY": ":987"}, "linux", QT_BUILD)
    with pytest.raises(ConfigError, match="no Wayland socket"):
        check_display({"WAYLAND_DISPLAY": "wayland-9", "XDG_RUNTIME_DIR": "/nonexistent"}, "linux", QT_BUILD)


def test_check_display_accepts_what_can_draw(tmp_path):
    check_display({"QT_QPA_PLATFORM": "offscreen"}, "linux", QT_BUILD)  # Qt told to draw without a display
    check_display({}, "win32", QT_BUILD)  # a desktop platform has its display
    (tmp_path / "wayland-1").touch()
    check_display({"WAYLAND_DISPLAY": "wayland-1", "XDG_RUNTIME_DIR": str(tmp_path)}, "linux", QT_BUILD)


def test_display_shows_each_stream_with_its_overlay(monkeypatch):
    import streamtsm.sinks.display as display

    shown = []
    monkeypatch.setattr(display.cv2, "imshow", lambda title, image: shown.append((title, image.copy())))
    monkeypatch.setattr(display.cv2, "waitKey", lambda ms: -1)
    monkeypatch.setattr(display.cv2, "destroyAllWindows", lambda: None)
    stop = threading.Event()
    sink = display.display_sink(stop, streams=2)
    image = np.full((120, 160, 3), 128, np.uint8)
    sink.on_message(*_event("a", "onset", "waving"))
    for i, sid in enumerate(["a", "b"]):
        frame = Frame(stream_id=sid, index=i, timestamp=0.0, image=image)
        sink.on_step(StepReport(group="m", step_ms=1.0, results=(StreamResult(sid, frame, list(TOPK)),)))
    sink.close()
    assert [title for title, _ in shown] == ["streamtsm a", "streamtsm b"] and not stop.is_set()
    assert _count(shown[0][1], ACTION_COLOUR) > 0 and _count(shown[1][1], ACTION_COLOUR) == 0  # a's action only
    assert np.array_equal(image, np.full((120, 160, 3), 128, np.uint8))  # the captured frame is untouched
    assert sink.dropped == 0


def _without_display() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="DISPLAY decides only on Linux")
def test_run_show_without_a_display_is_one_line_and_exit_2_before_the_model_loads():
    # An unknown model would be the error if the model were loaded before the display is checked.
    proc = subprocess.run(RUN + ["run", "--show", "--model", "tsm_r77", "--publish", "none"], env=_without_display(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr  # not 134: Qt never got to abort
    assert proc.stderr.count("\n") == 1 and "--show needs" in proc.stderr and "unknown model" not in proc.stderr
    assert proc.stdout == ""


def _xvfb() -> tuple[subprocess.Popen, str]:
    """A virtual X server on a free display number (Xvfb writes the number it took to -displayfd)."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "640x480x24", "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()  # written once the server accepts connections
    if not number:
        proc.kill()
        proc.wait()
        pytest.fail("Xvfb did not start")
    return proc, f":{number}"


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed (Debian package xvfb; "
                                                          "tools/setup.sh installs it)")
def test_run_show_under_a_virtual_display_ends_cleanly_with_duration():
    xvfb, display = _xvfb()
    try:
        env = {**_without_display(), "DISPLAY": display}
        proc = subprocess.run(RUN + ["run", "--show", "--source", "synthetic:96x72@30", "--publish", "none",
                                     "--duration", "3", "--quiet"], env=env, capture_output=True, text=True,
                              timeout=180)
    finally:
        xvfb.terminate()
        xvfb.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert "synthetic:" in proc.stdout and "frames processed" in proc.stdout
    assert re.search(r"display: \d+ frames dropped", proc.stdout) and "Traceback" not in proc.stderr
