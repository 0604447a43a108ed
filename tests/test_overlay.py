"""The overlay: a stream's view kept from the pipeline's messages (ViewTracker), and drawn on a frame (annotate),
tested on the images it makes."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

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
