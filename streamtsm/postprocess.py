"""Per-stream post-processing of model outputs: softmax, temporal smoothing, top-k, action events and stats.

Everything here is numpy and plain Python, runs once per frame per stream, and keeps its state in the
object, so each stream gets its own instances::

    logits -> TemporalSmoother (mean of the last `smooth` logits) -> softmax -> topk -> EventDetector

``EventDetector`` reports :class:`ActionEvent` values; ``LatencyTracker`` and ``RateMeter`` feed the periodic
stats message.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from streamtsm.errors import ConfigError


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax.

    Args:
        logits: Scores of any shape.
        axis: The class axis.

    Returns:
        Probabilities (float64) of the same shape, summing to 1 along ``axis``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    # Subtracting the max keeps exp() from overflowing for large logits; the result is unchanged.
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


class TemporalSmoother:
    """Averages the logits of the last ``window`` steps, to steady per-frame predictions.

    Before ``window`` steps have been seen, the average is over those seen so far.
    """

    def __init__(self, window: int) -> None:
        """Creates an empty smoother.

        Args:
            window: Steps to average; 1 passes logits through unchanged.

        Raises:
            ConfigError: If ``window`` is below 1.
        """
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"smoothing window must be an integer >= 1, got {window!r}")
        self.window = window
        self._history: np.ndarray | None = None  # [window, K], a ring buffer
        self._next = 0
        self._filled = 0

    def update(self, logits: np.ndarray) -> np.ndarray:
        """Adds one step's logits and returns the current average.

        Args:
            logits: Shape ``[K]``.

        Returns:
            The mean of the last ``window`` logits, shape ``[K]``, float64.

        Raises:
            ConfigError: If the number of classes differs from earlier steps.
        """
        logits = np.asarray(logits, dtype=np.float64)
        if self.window == 1:
            return logits.copy()
        if self._history is None:
            self._history = np.empty((self.window,) + logits.shape, dtype=np.float64)
        elif self._history.shape[1:] != logits.shape:
            raise ConfigError(
                f"logits changed shape between steps: expected {self._history.shape[1:]}, got {logits.shape}"
            )
        self._history[self._next] = logits
        self._next = (self._next + 1) % self.window
        self._filled = min(self._filled + 1, self.window)
        return self._history[: self._filled].mean(axis=0)

    def reset(self) -> None:
        """Forgets all steps (e.g. after the stream's source reconnected)."""
        self._history = None
        self._next = 0
        self._filled = 0


def topk(probs: np.ndarray, k: int, labels: list[str]) -> list[tuple[str, float]]:
    """The ``k`` most probable classes.

    Args:
        probs: Shape ``[K]``.
        k: How many to return; more than ``K`` returns all ``K``.
        labels: ``K`` class names.

    Returns:
        ``(label, probability)`` pairs, most probable first; equal probabilities keep class order.

    Raises:
        ConfigError: If ``k`` is below 1 or ``labels`` does not have one name per class.
    """
    probs = np.asarray(probs)
    if probs.ndim != 1 or len(labels) != probs.shape[0]:
        raise ConfigError(f"expected one label per class: {probs.shape} scores, got {len(labels)} labels")
    if k < 1:
        raise ConfigError(f"top-k must be at least 1, got {k}")
    # A stable sort of the negated scores keeps ties in class order.
    order = np.argsort(-probs, kind="stable")[: min(k, probs.shape[0])]
    return [(labels[i], float(probs[i])) for i in order]


EVENT_KINDS = ("onset", "offset")


@dataclass(frozen=True, kw_only=True)
class ActionEvent:
    """An action starting (``onset``) or ending (``offset``) on one stream, as ``EventDetector`` decided it.

    Attributes:
        kind: ``"onset"`` or ``"offset"``.
        label: The action.
        start_frame: First frame where the action qualified (top-1, above the threshold, not background).
        start_ts: Capture time of ``start_frame``.
        end_frame: Last frame where it qualified; None for an onset, whose end is not known yet.
        end_ts: Capture time of ``end_frame``; None for an onset.
        score: Mean top-1 score over the steps where the action qualified: the ``hold`` steps for an onset, the
            whole action for an offset.
        start_media_ts: Position of ``start_frame`` in its file in seconds; None for live sources.
        end_media_ts: Position of ``end_frame`` in its file; None for an onset and for live sources.

    Raises:
        ValueError: If ``kind`` is neither ``"onset"`` nor ``"offset"``, an offset lacks its end, or an onset
            has one.
    """

    kind: str
    label: str
    start_frame: int
    start_ts: float
    end_frame: int | None
    end_ts: float | None
    score: float
    start_media_ts: float | None = None
    end_media_ts: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"event kind must be 'onset' or 'offset', got {self.kind!r}")
        ends = (self.end_frame, self.end_ts)
        if self.kind == "offset" and None in ends:
            raise ValueError(f"an offset event needs end_frame and end_ts, got {ends}")
        if self.kind == "onset" and ends != (None, None):
            raise ValueError(f"an onset event has no end yet: expected end_frame and end_ts None, got {ends}")

    @property
    def duration_s(self) -> float | None:
        """How long the action lasted, in seconds; None for an onset.

        In media time when both ends have one (a file is read as fast as the model goes, so its capture times
        measure the processing, not the action), else from ``start_ts`` to ``end_ts``.
        """
        if self.end_ts is None:
            return None
        if self.start_media_ts is not None and self.end_media_ts is not None:
            return self.end_media_ts - self.start_media_ts
        return self.end_ts - self.start_ts


class _Run:
    """A class that is (or may become) the active action: where it started and how it has scored."""

    __slots__ = ("label", "start_frame", "start_ts", "start_media_ts", "last_frame", "last_ts", "last_media_ts",
                 "steps", "score_sum")

    def __init__(self, label: str, frame_index: int, timestamp: float, score: float,
                 media_ts: float | None = None) -> None:
        self.label = label
        self.start_frame = frame_index
        self.start_ts = timestamp
        self.start_media_ts = media_ts
        self.last_frame = frame_index
        self.last_ts = timestamp
        self.last_media_ts = media_ts
        self.steps = 1
        self.score_sum = score

    def extend(self, frame_index: int, timestamp: float, score: float, media_ts: float | None = None) -> None:
        self.last_frame = frame_index
        self.last_ts = timestamp
        self.last_media_ts = media_ts
        self.steps += 1
        self.score_sum += score

    def event(self, kind: str) -> ActionEvent:
        offset = kind == "offset"
        return ActionEvent(kind=kind, label=self.label, start_frame=self.start_frame, start_ts=self.start_ts,
                           end_frame=self.last_frame if offset else None, end_ts=self.last_ts if offset else None,
                           score=self.score_sum / self.steps, start_media_ts=self.start_media_ts,
                           end_media_ts=self.last_media_ts if offset else None)


class EventDetector:
    """Turns the per-step top-1 class into action onsets and offsets, with hysteresis.

    A step *qualifies* a class when that class is the top-1 with ``score >= threshold`` and is not a
    background label. Then:

    - **onset**: a class qualifying on ``hold`` consecutive steps becomes the active action. The onset is
      reported on the ``hold``-th step, with ``start_frame``/``start_ts`` of the first of those steps.
    - **offset**: the active action ends when it fails to qualify on ``hold`` consecutive steps, so that one
      noisy step does not split it. The offset is reported on the ``hold``-th such step, with
      ``end_frame``/``end_ts`` of the last step where the action still qualified.
    - **switch**: when another class becomes active, the old action's offset comes first, then the new
      onset, in the same ``update``.

    ``score`` is the mean top-1 score over the steps where the action qualified: over the ``hold`` steps
    for an onset, over the whole action for an offset. Every onset is eventually followed by exactly one
    offset: ``flush`` and ``reset`` report the pending one.
    """

    def __init__(self, hold: int = 3, threshold: float = 0.0, background: Iterable[str] | None = None) -> None:
        """Creates a detector with no active action.

        Args:
            hold: Consecutive steps needed to start and to end an action.
            threshold: Minimum top-1 score for a step to qualify.
            background: Labels that never become actions (e.g. ``"No gesture"``, ``"Doing other things"``).

        Raises:
            ConfigError: If ``hold`` is below 1 or ``threshold`` is not a finite number.
        """
        if isinstance(hold, bool) or not isinstance(hold, int) or hold < 1:
            raise ConfigError(f"event hold must be an integer >= 1 steps, got {hold!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ConfigError(f"event threshold must be a finite number, got {threshold!r}")
        self.hold = hold
        self.threshold = float(threshold)
        self.background = frozenset(background or ())
        self._active: _Run | None = None
        self._misses = 0
        self._candidate: _Run | None = None

    @property
    def active(self) -> str | None:
        """The label of the action in progress, or None."""
        return self._active.label if self._active else None

    def update(self, label: str, score: float, frame_index: int, timestamp: float,
               media_ts: float | None = None) -> list[ActionEvent]:
        """Feeds one step's (smoothed) top-1 prediction.

        Args:
            label: The top-1 class.
            score: Its probability.
            frame_index: The step's frame index.
            timestamp: The step's capture time.
            media_ts: The step's position in its file in seconds; None for a live source.

        Returns:
            The events this step decided: none, an onset, an offset, or an offset then an onset.
        """
        score = float(score)
        # NaN compares False, so a broken score never qualifies.
        qualifies = score >= self.threshold and label not in self.background
        observed = label if qualifies else None
        events: list[ActionEvent] = []
        active = self._active

        if active is not None and observed == active.label:
            active.extend(frame_index, timestamp, score, media_ts)
            self._misses = 0
            self._candidate = None
            return events

        if active is not None:
            self._misses += 1
        if observed is None:
            self._candidate = None
        elif self._candidate is not None and self._candidate.label == observed:
            self._candidate.extend(frame_index, timestamp, score, media_ts)
        else:
            self._candidate = _Run(observed, frame_index, timestamp, score, media_ts)

        if self._candidate is not None and self._candidate.steps >= self.hold:
            if active is not None:
                events.append(active.event("offset"))
            events.append(self._candidate.event("onset"))
            self._active = self._candidate
            self._candidate = None
            self._misses = 0
        elif active is not None and self._misses >= self.hold:
            events.append(active.event("offset"))
            self._active = None
            self._misses = 0
        return events

    def flush(self, frame_index: int | None = None, timestamp: float | None = None) -> list[ActionEvent]:
        """Ends the stream: reports the active action's offset, if any, and forgets everything.

        Args:
            frame_index: The last step's frame index. Accepted so callers can pass the end of the stream;
                the offset always ends at the last step where the action qualified, which is no later.
            timestamp: The last step's capture time (see ``frame_index``).

        Returns:
            The pending offset, or nothing.
        """
        events = [self._active.event("offset")] if self._active is not None else []
        self._active = None
        self._candidate = None
        self._misses = 0
        return events

    def reset(self) -> list[ActionEvent]:
        """Starts over, e.g. after the stream's source reconnected.

        The action in progress cannot be followed across the gap, so it is ended rather than dropped:
        subscribers that saw its onset get its offset, and can rely on onsets and offsets pairing up.

        Returns:
            The pending offset, or nothing.
        """
        return self.flush()


class StreamPostprocessor:
    """Everything between one stream's logits and what is published: smoothing, softmax, top-k, events."""

    def __init__(
        self,
        labels: list[str],
        *,
        smooth: int = 1,
        topk: int = 5,
        threshold: float = 0.0,
        hold: int = 3,
        background: Iterable[str] | None = None,
    ) -> None:
        """Creates the stream's post-processing state.

        Args:
            labels: Class names, one per logit.
            smooth: Steps of logits averaged before the softmax (1: none).
            topk: Classes reported per step.
            threshold: Minimum smoothed probability for a top-1 class to count toward an event.
            hold: Consecutive steps needed to start and to end an action.
            background: Labels that never become actions; each must be in ``labels``.

        Raises:
            ConfigError: If an option is out of range, ``labels`` is empty, or a background label is not
                one of ``labels``.
        """
        self.labels = list(labels)
        if not self.labels:
            raise ConfigError("expected at least one class label, got none")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ConfigError(f"top-k must be an integer >= 1, got {topk!r}")
        background = frozenset(background or ())
        unknown = sorted(background - set(self.labels))
        if unknown:
            # Most likely a spelling or case mismatch with the label file; silently never matching is worse.
            raise ConfigError(f"background labels must be class labels, got unknown {unknown}")
        self.k = topk
        self.smoother = TemporalSmoother(smooth)
        self.detector = EventDetector(hold=hold, threshold=threshold, background=background)

    def process(
        self, logits: np.ndarray, frame_index: int, timestamp: float, media_ts: float | None = None
    ) -> tuple[list[tuple[str, float]], list[ActionEvent]]:
        """Post-processes one step.

        Args:
            logits: The model's output for this step, shape ``[K]``.
            frame_index: The step's frame index.
            timestamp: The step's capture time.
            media_ts: The step's position in its file in seconds (``Frame.media_ts``); None for a live source.

        Returns:
            ``(top-k of the smoothed probabilities, events)``; see ``EventDetector.update`` for events.

        Raises:
            ConfigError: If ``logits`` is not one value per label.
        """
        logits = np.asarray(logits)
        if logits.shape != (len(self.labels),):
            raise ConfigError(
                f"expected {len(self.labels)} logits (one per label), got shape {tuple(logits.shape)}"
            )
        probs = softmax(self.smoother.update(logits))
        ranked = topk(probs, self.k, self.labels)
        label, score = ranked[0]
        return ranked, self.detector.update(label, score, frame_index, timestamp, media_ts)

    def flush(self, frame_index: int | None = None, timestamp: float | None = None) -> list[ActionEvent]:
        """Ends the stream; returns the pending offset, if any (see ``EventDetector.flush``)."""
        return self.detector.flush(frame_index, timestamp)

    def reset(self) -> list[ActionEvent]:
        """Starts over after a reconnect: clears smoothing and returns the pending offset, if any."""
        self.smoother.reset()
        return self.detector.reset()


class LatencyTracker:
    """Percentiles of the most recent latency samples (a bounded window, O(1) per sample)."""

    def __init__(self, window: int = 1000) -> None:
        """Creates an empty tracker.

        Args:
            window: Most recent samples kept.

        Raises:
            ConfigError: If ``window`` is below 1.
        """
        if window < 1:
            raise ConfigError(f"latency window must be at least 1 sample, got {window}")
        self._samples: deque[float] = deque(maxlen=window)

    def add(self, ms: float) -> None:
        """Records one latency in milliseconds."""
        self._samples.append(float(ms))

    @property
    def count(self) -> int:
        """Samples in the window."""
        return len(self._samples)

    def percentile(self, p: float) -> float | None:
        """The ``p``-th percentile (linear interpolation) of the window, or None when it is empty.

        Raises:
            ValueError: If ``p`` is outside 0-100.
        """
        return self.percentiles((p,))[0]

    def percentiles(self, ps: Sequence[float]) -> list[float | None]:
        """:meth:`percentile` of each of ``ps``, from one pass over the window (a stats message asks for two per
        stream every second, on the pipeline's thread)."""
        for p in ps:
            if not 0 <= p <= 100:
                raise ValueError(f"percentile must be within 0-100, got {p}")
        if not self._samples:
            return [None] * len(ps)
        # Sorted once, then numpy's default (linear) interpolation by hand: np.percentile costs ~0.3 ms for 1000
        # samples, mostly overhead, and a stats message asks for it for every stream while holding the GIL.
        ordered = sorted(self._samples)
        last = len(ordered) - 1
        out = []
        for p in ps:
            rank = p / 100 * last
            lo = int(rank)
            hi = min(lo + 1, last)
            out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo))
        return out

    def reset(self) -> None:
        """Forgets all samples."""
        self._samples.clear()


class RateMeter:
    """Events per second over a sliding time window (e.g. a stream's processed fps)."""

    def __init__(self, window_s: float = 2.0) -> None:
        """Creates a meter with no ticks.

        Args:
            window_s: Seconds of history the rate is measured over.

        Raises:
            ConfigError: If ``window_s`` is not positive.
        """
        if not window_s > 0:
            raise ConfigError(f"rate window must be a positive number of seconds, got {window_s}")
        self.window_s = float(window_s)
        self._ticks: deque[float] = deque()

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._ticks and self._ticks[0] < horizon:
            self._ticks.popleft()

    def tick(self, now: float | None = None) -> None:
        """Records one event at ``now`` (``time.monotonic()`` when None)."""
        now = time.monotonic() if now is None else now
        self._ticks.append(now)
        self._expire(now)

    def rate(self, now: float | None = None) -> float:
        """Events per second in the window ending at ``now`` (``time.monotonic()`` when None).

        Measured from the oldest tick in the window to ``now``, so the rate falls while events stop
        arriving and reaches 0 once a whole window passes without one.
        """
        now = time.monotonic() if now is None else now
        self._expire(now)
        if len(self._ticks) < 2 or now <= self._ticks[0]:
            return 0.0
        return (len(self._ticks) - 1) / (now - self._ticks[0])
