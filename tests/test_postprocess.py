"""Softmax, smoothing, top-k, action events and the per-stream stats helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtsm.errors import ConfigError
from streamtsm.postprocess import (
    ActionEvent,
    EventDetector,
    LatencyTracker,
    RateMeter,
    StreamPostprocessor,
    TemporalSmoother,
    softmax,
    topk,
)


def feed(detector, labels, scores=None, start=0, fps=10.0):
    """Feeds one label per step (frame i at i / fps seconds); returns [(frame, event), ...] in order."""
    scores = scores or [0.9] * len(labels)
    out = []
    for offset, (label, score) in enumerate(zip(labels, scores)):
        frame = start + offset
        out += [(frame, event) for event in detector.update(label, score, frame, frame / fps)]
    return out


# -- softmax, smoothing, top-k -----------------------------------------------------------------------------


def test_softmax_matches_definition_and_sums_to_one():
    logits = np.array([1.0, 2.0, 3.0])
    expected = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(softmax(logits), expected)
    np.testing.assert_allclose(softmax(np.array([[0.0, 0.0], [1.0, 3.0]])).sum(axis=-1), [1.0, 1.0])


def test_softmax_is_stable_for_large_logits():
    probs = softmax(np.array([1000.0, 1001.0, -1000.0], dtype=np.float32))
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs, [1 / (1 + np.e), np.e / (1 + np.e), 0.0], atol=1e-12)


def test_temporal_smoother_window_one_is_identity():
    smoother = TemporalSmoother(1)
    for logits in ([1.0, -2.0], [5.0, 0.5]):
        np.testing.assert_array_equal(smoother.update(np.array(logits)), logits)


def test_temporal_smoother_averages_last_window_steps():
    smoother = TemporalSmoother(3)
    steps = [[3.0, 0.0], [0.0, 3.0], [6.0, 0.0], [0.0, 9.0]]
    results = [smoother.update(np.array(step)) for step in steps]
    np.testing.assert_allclose(results[0], [3.0, 0.0])  # fewer steps than the window: mean of those seen
    np.testing.assert_allclose(results[1], [1.5, 1.5])
    np.testing.assert_allclose(results[2], [3.0, 1.0])
    np.testing.assert_allclose(results[3], [2.0, 4.0])  # the first step has left the window


def test_temporal_smoother_reset_forgets_history():
    smoother = TemporalSmoother(4)
    smoother.update(np.array([10.0, 0.0]))
    smoother.reset()
    np.testing.assert_allclose(smoother.update(np.array([0.0, 2.0])), [0.0, 2.0])


def test_temporal_smoother_does_not_alias_input():
    smoother = TemporalSmoother(2)
    logits = np.array([1.0, 2.0])
    smoother.update(logits)
    logits[:] = 100.0
    np.testing.assert_allclose(smoother.update(np.array([3.0, 4.0])), [2.0, 3.0])


@pytest.mark.parametrize("window", [0, -1, 1.5])
def test_temporal_smoother_invalid_window_raises_config_error(window):
    with pytest.raises(ConfigError, match="window"):
        TemporalSmoother(window)


def test_temporal_smoother_class_count_change_raises_config_error():
    smoother = TemporalSmoother(2)
    smoother.update(np.zeros(3))
    with pytest.raises(ConfigError, match="shape"):
        smoother.update(np.zeros(4))


def test_topk_sorts_by_score_and_keeps_ties_in_class_order():
    labels = ["a", "b", "c", "d"]
    result = topk(np.array([0.1, 0.3, 0.3, 0.3]), 3, labels)
    assert result == [("b", 0.3), ("c", 0.3), ("d", 0.3)]
    assert all(type(score) is float for _, score in result)


def test_topk_clips_k_to_class_count():
    assert [label for label, _ in topk(np.array([0.2, 0.8]), 5, ["x", "y"])] == ["y", "x"]


def test_topk_rejects_bad_k_and_label_count():
    with pytest.raises(ConfigError, match="top-k"):
        topk(np.array([1.0]), 0, ["x"])
    with pytest.raises(ConfigError, match="label"):
        topk(np.array([0.5, 0.5]), 1, ["x"])


# -- events ------------------------------------------------------------------------------------------------


def test_event_detector_onset_after_hold_steps_starts_at_first_step():
    detector = EventDetector(hold=3)
    events = feed(detector, ["bg", "wave", "wave", "wave", "wave"], scores=[0.9, 0.6, 0.7, 0.8, 0.9])
    assert events == [
        (3, ActionEvent(kind="onset", label="wave", start_frame=1, start_ts=0.1, end_frame=None, end_ts=None,
                        score=pytest.approx(0.7))),
    ]
    assert detector.active == "wave"


def test_event_detector_hold_one_reacts_immediately():
    events = feed(EventDetector(hold=1), ["a", "b"])
    assert [(frame, e.kind, e.label) for frame, e in events] == [
        (0, "onset", "a"), (1, "offset", "a"), (1, "onset", "b")
    ]


def test_event_detector_single_frame_flicker_does_not_split_action():
    detector = EventDetector(hold=3)
    events = feed(detector, ["wave"] * 4 + ["clap"] + ["wave"] * 3 + ["bg"] + ["wave"] * 2)
    assert [e.kind for _, e in events] == ["onset"]
    assert detector.active == "wave"


def test_event_detector_flicker_does_not_start_other_class():
    detector = EventDetector(hold=3)
    events = feed(detector, ["wave", "clap", "wave", "clap", "wave", "clap"])
    assert events == []


def test_event_detector_offset_after_hold_misses_ends_at_last_top1_step():
    detector = EventDetector(hold=3)
    events = feed(detector, ["wave"] * 5 + ["x", "y", "z", "x"], scores=[0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    assert events[1] == (
        7,  # decided on the third step without "wave"
        ActionEvent(kind="offset", label="wave", start_frame=0, start_ts=0.0, end_frame=4, end_ts=0.4,
                    score=pytest.approx((0.5 * 3 + 0.9 * 2) / 5)),
    )
    assert len(events) == 2 and detector.active is None


def test_event_detector_class_switch_emits_offset_then_onset_in_one_step():
    detector = EventDetector(hold=2)
    events = feed(detector, ["wave", "wave", "wave", "clap", "clap"])
    assert [(frame, e.kind, e.label) for frame, e in events] == [
        (1, "onset", "wave"), (4, "offset", "wave"), (4, "onset", "clap")
    ]
    offset, onset = events[1][1], events[2][1]
    assert (offset.start_frame, offset.end_frame) == (0, 2)
    assert (onset.start_frame, onset.end_frame) == (3, None)


def test_event_detector_threshold_keeps_low_scores_from_starting_or_sustaining():
    detector = EventDetector(hold=2, threshold=0.5)
    assert feed(detector, ["wave"] * 4, scores=[0.4, 0.49, 0.3, 0.45]) == []
    events = feed(detector, ["wave"] * 4, scores=[0.5, 0.9, 0.2, 0.1], start=4)
    assert [(frame, e.kind) for frame, e in events] == [(5, "onset"), (7, "offset")]
    assert events[1][1].end_frame == 5


def test_event_detector_background_never_becomes_active_and_ends_actions():
    detector = EventDetector(hold=2, background={"No gesture"})
    events = feed(detector, ["No gesture"] * 3 + ["swipe"] * 2 + ["No gesture"] * 2)
    assert [(frame, e.kind, e.label) for frame, e in events] == [(4, "onset", "swipe"), (6, "offset", "swipe")]


def test_event_detector_nan_score_never_qualifies():
    assert feed(EventDetector(hold=1), ["wave"], scores=[float("nan")]) == []


def test_event_detector_flush_emits_pending_offset_once():
    detector = EventDetector(hold=2)
    feed(detector, ["wave"] * 3 + ["bg"])
    assert detector.flush(4, 0.4) == [
        ActionEvent(kind="offset", label="wave", start_frame=0, start_ts=0.0, end_frame=2, end_ts=0.2,
                    score=pytest.approx(0.9))
    ]
    assert detector.flush(4, 0.4) == []


def test_event_detector_flush_without_action_is_empty():
    detector = EventDetector(hold=3)
    feed(detector, ["wave", "wave"])
    assert detector.flush(1, 0.1) == []


def test_event_detector_reset_returns_offset_and_forgets_candidate():
    detector = EventDetector(hold=2)
    feed(detector, ["wave", "wave", "clap"])
    assert [e.kind for e in detector.reset()] == ["offset"]
    # The half-seen "clap" was forgotten: it needs two fresh steps.
    assert feed(detector, ["clap"], start=3) == []
    assert [e.kind for _, e in feed(detector, ["clap"], start=4)] == ["onset"]


def test_action_event_is_frozen_and_knows_its_duration():
    offset = ActionEvent(kind="offset", label="wave", start_frame=3, start_ts=1.5, end_frame=9, end_ts=2.25,
                         score=0.8)
    assert offset.duration_s == pytest.approx(0.75)
    assert ActionEvent(kind="onset", label="wave", start_frame=3, start_ts=1.5, end_frame=None, end_ts=None,
                       score=0.8).duration_s is None
    with pytest.raises(AttributeError):
        offset.label = "clap"


@pytest.mark.parametrize(("kind", "end", "match"), [
    ("start", (None, None), "'onset' or 'offset', got 'start'"),
    ("offset", (9, None), "offset event needs end_frame and end_ts"),
    ("onset", (9, 2.0), "onset event has no end yet"),
])
def test_action_event_rejects_unknown_kind_and_wrong_end(kind, end, match):
    with pytest.raises(ValueError, match=match):
        ActionEvent(kind=kind, label="wave", start_frame=3, start_ts=1.5, end_frame=end[0], end_ts=end[1], score=0.8)


@pytest.mark.parametrize(("kwargs", "match"), [({"hold": 0}, "hold"), ({"threshold": float("nan")}, "threshold")])
def test_event_detector_invalid_options_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EventDetector(**kwargs)


@settings(max_examples=200, deadline=None)
@given(
    labels=st.lists(st.sampled_from(["a", "b", "bg"]), max_size=60),
    hold=st.integers(1, 4),
)
def test_event_detector_onsets_and_offsets_pair_up(labels, hold):
    detector = EventDetector(hold=hold, background={"bg"})
    events = [event for _, event in feed(detector, labels)] + detector.flush()
    assert [e.kind for e in events] == ["onset", "offset"] * (len(events) // 2)
    for onset, offset in zip(events[::2], events[1::2]):
        assert onset.label == offset.label != "bg"
        assert onset.start_frame == offset.start_frame <= offset.end_frame
        assert labels[offset.start_frame : offset.start_frame + hold] == [onset.label] * hold
        assert labels[offset.end_frame] == onset.label


# -- StreamPostprocessor -----------------------------------------------------------------------------------


def test_stream_postprocessor_smooths_logits_before_softmax():
    post = StreamPostprocessor(["a", "b", "c"], smooth=2, topk=2, hold=1)
    post.process(np.array([4.0, 0.0, 0.0]), 0, 0.0)
    ranked, events = post.process(np.array([0.0, 2.0, 0.0]), 1, 0.1)
    expected = softmax(np.array([2.0, 1.0, 0.0]))
    assert [label for label, _ in ranked] == ["a", "b"]
    np.testing.assert_allclose([score for _, score in ranked], expected[:2])
    assert events == []  # "a" stayed top-1 after smoothing


def test_stream_postprocessor_reports_events():
    post = StreamPostprocessor(["still", "wave"], hold=2, background=["still"])
    steps = [[5.0, 0.0], [0.0, 5.0], [0.0, 5.0], [5.0, 0.0], [5.0, 0.0]]
    kinds = [[e.kind for e in post.process(np.array(s), i, i * 0.1)[1]] for i, s in enumerate(steps)]
    assert kinds == [[], [], ["onset"], [], ["offset"]]


def test_stream_postprocessor_reset_clears_smoothing_and_returns_offset():
    post = StreamPostprocessor(["a", "b"], smooth=4, hold=1)
    post.process(np.array([9.0, 0.0]), 0, 0.0)
    assert [e.kind for e in post.reset()] == ["offset"]
    ranked, events = post.process(np.array([0.0, 1.0]), 1, 0.1)
    assert ranked[0][0] == "b" and [e.kind for e in events] == ["onset"]
    assert [e.label for e in post.flush(1, 0.1)] == ["b"]


def test_stream_postprocessor_label_count_mismatch_raises_config_error():
    post = StreamPostprocessor(["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"expected 3 logits.*\(400,\)"):
        post.process(np.zeros(400), 0, 0.0)
    with pytest.raises(ConfigError, match=r"\(1, 3\)"):
        post.process(np.zeros((1, 3)), 0, 0.0)


def test_stream_postprocessor_unknown_background_label_raises_config_error():
    with pytest.raises(ConfigError, match="No Gesture"):
        StreamPostprocessor(["No gesture", "swipe"], background={"No Gesture"})


# -- stats helpers -----------------------------------------------------------------------------------------


def test_latency_tracker_percentiles_over_bounded_window():
    tracker = LatencyTracker(window=100)
    assert tracker.percentile(50) is None and tracker.count == 0
    for ms in range(1000, 1100):
        tracker.add(ms)
    assert tracker.percentile(0) == 1000.0 and tracker.percentile(100) == 1099.0
    assert tracker.percentile(50) == pytest.approx(1049.5)
    for ms in range(50):
        tracker.add(float(ms))
    assert tracker.count == 100
    assert tracker.percentile(0) == 0.0 and tracker.percentile(100) == 1099.0
    assert tracker.percentiles((0, 50, 100)) == [tracker.percentile(0), tracker.percentile(50), 1099.0]
    assert LatencyTracker().percentiles((50, 99)) == [None, None]


@given(st.lists(st.floats(0, 1e5), min_size=1, max_size=60),
       st.lists(st.floats(0, 100), min_size=1, max_size=4))
def test_latency_tracker_percentiles_agree_with_numpys_linear_interpolation(samples, ps):
    tracker = LatencyTracker(window=len(samples))
    for ms in samples:
        tracker.add(ms)
    np.testing.assert_allclose(tracker.percentiles(ps), np.percentile(samples, ps), rtol=1e-12, atol=1e-9)


def test_latency_tracker_rejects_out_of_range_percentile():
    with pytest.raises(ValueError, match="0-100"):
        LatencyTracker().percentile(101)
    with pytest.raises(ValueError, match="0-100"):
        LatencyTracker().percentiles((50, -1))


def test_rate_meter_measures_steady_rate_and_decays_when_ticks_stop():
    meter = RateMeter(window_s=2.0)
    assert meter.rate(0.0) == 0.0
    for i in range(300):
        meter.tick(i / 30)
    assert meter.rate(299 / 30) == pytest.approx(30.0)
    assert meter.rate(299 / 30 + 1.0) < 30.0
    assert meter.rate(299 / 30 + 2.5) == 0.0
