"""What a person sees of a stream: its frame with the predictions drawn on, readable at any frame size.

Two parts, both free of threads and I/O so that every view (the ``--show`` window, the ``--output`` video, a web
page) draws the same picture from the same messages:

- :class:`ViewTracker` keeps, per stream, what the pipeline's messages (:mod:`streamtsm.publish.schema`) last said:
  the top-k and latency of the newest prediction, the action in progress (between its onset and its offset event),
  the fps and status of the newest stats. :meth:`ViewTracker.view` hands out a copy, a :class:`StreamView`.
- :func:`annotate` is a pure function ``(image, view) -> new image``::

      ┌──────────────────────────┐   a translucent panel in the top-left corner (alpha-blended, no shadow text):
      │ cam0                     │     the stream id
      │ 29.9 fps  38 ms          │     fps and capture-to-publish latency (and the status when not running)
      │▓▓▓ waving 0.84 ▓▓▓▓▓▓▓▓▓▓│     the action in progress, on a coloured banner (and a border round the frame)
      │ waving              0.91 │     the top-k, best first: label and score,
      │ ████████████████████░░░░ │       a bar as long as the score
      │ clapping            0.03 │
      │ █░░░░░░░░░░░░░░░░░░░░░░░ │
      └──────────────────────────┘

  Every size comes from the frame's smaller side (the height of a landscape frame), so the text is as readable on a
  96x96 crop as on a 4K camera; text is measured with ``cv2.getTextSize`` and a label that does not fit is cut
  short with ``...``; rows that do not fit in the frame are left out, the last bars first.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from streamtsm.errors import ConfigError

# Colours are BGR.
PANEL_COLOUR = (24, 24, 24)
PANEL_ALPHA = 0.6  # the panel's share of a panel pixel: the frame shows through, the text stands out
TEXT_COLOUR = (255, 255, 255)
BAR_COLOUR = (0, 170, 255)  # orange: a score bar
TRACK_COLOUR = (80, 80, 80)  # the rest of a bar's length, up to a score of 1
ACTION_COLOUR = (60, 200, 40)  # green: the banner and border of an action in progress
ACTION_TEXT_COLOUR = (0, 0, 0)

FONT = cv2.FONT_HERSHEY_SIMPLEX
MIN_TEXT_PX = 10  # the smallest text height (capitals ~8 px) that stays legible
TEXT_SHARE = 0.028  # text height as a share of the frame's smaller side: 30 px at 1080p, 60 px at 4K
PANEL_WIDTH_CHARS = 18  # the panel's width in text heights (a Hershey character is ~0.75 of one wide)
ELLIPSIS = "..."  # the Hershey fonts have ASCII only


@dataclass
class StreamView:
    """What the overlay shows of one stream (see :class:`ViewTracker`).

    Attributes:
        stream_id: The stream's id.
        topk: ``(label, score)`` of the newest prediction, best first (a score the model could not give, NaN).
        action: The label of the action in progress (between its onset and its offset event), else None.
        action_score: The action's score: its onset's, then its score in each newer prediction that lists it.
        fps: Frames processed per second, from the newest stats.
        latency_ms: Capture-to-publish latency of the newest prediction, in milliseconds.
        status: The stream's status from the newest stats (``streamtsm.capture.StreamStatus`` values).
        frame: Capture index of the newest prediction's frame.
        model: The model that made the newest prediction.
    """

    stream_id: str
    topk: list[tuple[str, float]] = field(default_factory=list)
    action: str | None = None
    action_score: float | None = None
    fps: float | None = None
    latency_ms: float | None = None
    status: str = "starting"
    frame: int | None = None
    model: str | None = None


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class ViewTracker:
    """Keeps each stream's :class:`StreamView` up to date from the pipeline's messages.

    ``pred`` sets the top-k, latency, frame and model; an ``event`` ``onset`` sets the action, its ``offset``
    clears it (when it is the action shown); ``stats`` sets each stream's fps and status. Other messages and
    fields are ignored, so a newer producer's additions do no harm. Feeding and reading may happen on different
    threads (a lock guards the views); nothing here blocks.
    """

    def __init__(self) -> None:
        self._views: dict[str, StreamView] = {}
        self._lock = threading.Lock()

    def on_message(self, topic: str, payload: dict) -> None:
        """Updates the views from one message (``topic`` is not needed: the payload names its stream)."""
        if not isinstance(payload, dict):
            return
        kind = payload.get("type")
        with self._lock:
            if kind == "stats":
                for sid, figures in (payload.get("streams") or {}).items():
                    if not isinstance(figures, dict):
                        continue
                    view = self._view(str(sid))
                    view.fps = _number(figures.get("fps"))
                    if isinstance(figures.get("status"), str):
                        view.status = figures["status"]
                return
            sid = payload.get("stream")
            if not isinstance(sid, str):
                return
            if kind == "pred":
                view = self._view(sid)
                topk = []
                for entry in payload.get("topk") or []:
                    if isinstance(entry, dict) and "label" in entry:
                        score = _number(entry.get("score"))
                        topk.append((str(entry["label"]), math.nan if score is None else score))
                view.topk = topk
                view.latency_ms = _number(payload.get("latency_ms"))
                view.frame = payload.get("frame") if isinstance(payload.get("frame"), int) else None
                view.model = payload.get("model") if isinstance(payload.get("model"), str) else None
                if view.action is not None:
                    score = dict(topk).get(view.action)
                    if score is not None:
                        view.action_score = score
            elif kind == "event":
                view = self._view(sid)
                label = payload.get("label")
                if payload.get("event") == "onset":
                    view.action = None if label is None else str(label)
                    view.action_score = _number(payload.get("score"))
                elif payload.get("event") == "offset" and (view.action is None or view.action == label):
                    view.action = None
                    view.action_score = None

    def view(self, stream_id: str) -> StreamView:
        """A copy of the stream's view (a fresh one, status ``starting``, for a stream not heard of)."""
        with self._lock:
            view = self._views.get(stream_id)
            if view is None:
                return StreamView(stream_id)
            return replace(view, topk=list(view.topk))

    def stream_ids(self) -> list[str]:
        """The streams heard of, in the order first heard."""
        with self._lock:
            return list(self._views)

    def _view(self, stream_id: str) -> StreamView:
        view = self._views.get(stream_id)
        if view is None:
            view = self._views[stream_id] = StreamView(stream_id)
        return view


# Height of the Hershey font's capitals and ascenders at scale 1 (getTextSize is linear in the scale).
_UNIT_TEXT_H = cv2.getTextSize("Ag", FONT, 1.0, 1)[0][1]


@dataclass(frozen=True)
class TextStyle:
    """The sizes of everything the overlay draws on a frame, derived from the frame's size (see :func:`style_for`).

    Attributes:
        text_h: Height of a capital letter in pixels.
        scale: The font scale giving that height.
        thickness: Stroke width of the text.
        pad: Space between rows and around the panel's contents.
        bar_h: Height of a score bar.
        border: Width of the border drawn round the frame during an action.
    """

    text_h: int
    scale: float
    thickness: int
    pad: int
    bar_h: int
    border: int

    @property
    def line_h(self) -> int:
        """Height of one row of text, descenders included, with its padding."""
        return self.text_h + math.ceil(self.text_h * 0.35) + self.pad


def style_for(height: int, width: int) -> TextStyle:
    """The overlay's sizes for a frame of ``height`` x ``width`` pixels: text height is a fixed share of the
    smaller side, never below :data:`MIN_TEXT_PX`."""
    text_h = max(MIN_TEXT_PX, round(min(height, width) * TEXT_SHARE))
    return TextStyle(text_h=text_h, scale=text_h / _UNIT_TEXT_H, thickness=max(1, round(text_h / 14)),
                     pad=max(2, round(text_h * 0.35)), bar_h=max(2, round(text_h * 0.4)),
                     border=max(2, round(text_h / 4)))


def text_width(text: str, style: TextStyle) -> int:
    """Width in pixels of ``text`` drawn in ``style``."""
    return cv2.getTextSize(text, FONT, style.scale, style.thickness)[0][0] if text else 0


def elide(text: str, max_width: int, style: TextStyle) -> str:
    """``text``, or its longest beginning followed by ``...``, that is at most ``max_width`` pixels wide in
    ``style``; ``""`` when not even ``...`` fits."""
    if text_width(text, style) <= max_width:
        return text
    low, high = 0, len(text) - 1  # the longest prefix that fits with the ellipsis: binary search on its length
    while low < high:
        mid = (low + high + 1) // 2
        if text_width(text[:mid].rstrip() + ELLIPSIS, style) <= max_width:
            low = mid
        else:
            high = mid - 1
    candidate = text[:low].rstrip() + ELLIPSIS
    return candidate if text_width(candidate, style) <= max_width else ""


def _as_bgr(image: np.ndarray) -> np.ndarray:
    """A BGR uint8 copy of ``image`` (grey and BGRA are converted); anything else is refused."""
    if not isinstance(image, np.ndarray):
        raise ConfigError(f"annotate needs an image as a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ConfigError(f"annotate needs a uint8 image, got dtype {image.dtype}")
    channels = image.shape[2] if image.ndim == 3 else 1 if image.ndim == 2 else None
    if channels not in (1, 3, 4):
        raise ConfigError(f"annotate needs a BGR, BGRA or grey image (H x W x 3, 4 or 1, or H x W), got shape "
                          f"{image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ConfigError(f"annotate needs an image of at least 1x1 pixels, got shape {image.shape}")
    if channels == 3:
        return image.copy()
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return cv2.cvtColor(np.ascontiguousarray(image.reshape(image.shape[:2])), cv2.COLOR_GRAY2BGR)


def _score_text(score: float | None) -> str:
    return "-" if score is None or not math.isfinite(score) else f"{score:.2f}"


def _info_text(view: StreamView) -> str:
    fps = "-" if view.fps is None or not math.isfinite(view.fps) else f"{view.fps:.1f}"
    latency = "-" if view.latency_ms is None or not math.isfinite(view.latency_ms) else f"{view.latency_ms:.0f}"
    text = f"{fps} fps  {latency} ms"
    return text if view.status in ("running", "starting") else f"{text}  {view.status}"


@dataclass(frozen=True)
class Layout:
    """Where :func:`annotate` draws on a frame: the panel's rectangle ``(x, y, w, h)`` in frame pixels, and the
    rows that fit in it, each ``(kind, y)`` with ``y`` relative to the panel's top (``kind``: ``id``, ``info``,
    ``action`` or ``bar``)."""

    style: TextStyle
    panel: tuple[int, int, int, int]
    rows: tuple[tuple[str, int], ...]


def layout_for(height: int, width: int, view: StreamView) -> Layout:
    """Where :func:`annotate` draws for ``view`` on a frame of ``height`` x ``width`` (public so that tests and
    other views can find the panel)."""
    style = style_for(height, width)
    margin = style.pad
    panel_w = min(width - 2 * margin, PANEL_WIDTH_CHARS * style.text_h)
    if panel_w < 4 * style.text_h:  # a tiny frame: the panel takes all of it
        margin, panel_w = 0, width
    bar_row_h = style.line_h + style.bar_h + style.pad
    wanted = [("id", style.line_h), ("info", style.line_h)]
    if view.action is not None:
        wanted.append(("action", style.line_h + style.pad))
    wanted += [("bar", bar_row_h)] * len(view.topk)
    room = height - 2 * margin
    rows, y = [], style.pad
    for kind, row_h in wanted:
        if y + row_h + style.pad > room:  # the rows below it would not fit either
            break
        rows.append((kind, y))
        y += row_h
    panel_h = y + style.pad if rows else 0
    return Layout(style, (margin, margin, max(0, panel_w), max(0, panel_h)), tuple(rows))


def annotate(image: np.ndarray, view: StreamView) -> np.ndarray:
    """The frame with the stream's view drawn on: a new BGR uint8 image, ``image`` untouched.

    Args:
        image: The frame: BGR (H x W x 3) uint8; grey (H x W or H x W x 1) and BGRA (H x W x 4) are converted to
            BGR; any size from 1x1.
        view: What to draw (see :class:`StreamView`).

    Returns:
        A new H x W x 3 uint8 image: outside the panel it is the frame as given, but for a border round the frame
        while an action is in progress.

    Raises:
        ConfigError: If ``image`` is not a uint8 array of 1, 3 or 4 channels with at least one pixel.
    """
    out = _as_bgr(image)
    height, width = out.shape[:2]
    layout = layout_for(height, width, view)
    style = layout.style
    if view.action is not None:
        cv2.rectangle(out, (0, 0), (width - 1, height - 1), ACTION_COLOUR, style.border)
    x0, y0, panel_w, panel_h = layout.panel
    if panel_w <= 0 or panel_h <= 0:
        return out
    # The panel is drawn on its own contiguous copy and written back: no stroke can spill past it.
    roi = out[y0:y0 + panel_h, x0:x0 + panel_w]
    panel = cv2.addWeighted(roi, 1.0 - PANEL_ALPHA, roi, 0.0, 0.0)
    # The colour's share added as a per-channel scalar: no full-size image of the colour is built (at 4K that
    # costs more than the rest of the overlay together).
    cv2.add(panel, tuple(c * PANEL_ALPHA for c in PANEL_COLOUR) + (0.0,), dst=panel)
    inner_w = panel_w - 2 * style.pad
    left = style.pad
    bars = iter(view.topk)
    for kind, y in layout.rows:
        baseline = y + style.text_h
        if kind == "id":
            _text(panel, elide(view.stream_id, inner_w, style), (left, baseline), style)
        elif kind == "info":
            _text(panel, elide(_info_text(view), inner_w, style), (left, baseline), style)
        elif kind == "action":
            cv2.rectangle(panel, (0, y), (panel_w - 1, y + style.line_h + style.pad - 1), ACTION_COLOUR, cv2.FILLED)
            text = f"{view.action} {_score_text(view.action_score)}" if view.action_score is not None \
                else str(view.action)
            _text(panel, elide(text, inner_w, style), (left, baseline + style.pad // 2), style, ACTION_TEXT_COLOUR)
        else:
            label, score = next(bars)
            score_text = _score_text(score)
            score_w = text_width(score_text, style)
            _text(panel, elide(label, inner_w - score_w - style.pad, style), (left, baseline), style)
            if score_w <= inner_w:
                _text(panel, score_text, (left + inner_w - score_w, baseline), style)
            bar_y = y + style.line_h
            cv2.rectangle(panel, (left, bar_y), (left + inner_w - 1, bar_y + style.bar_h - 1), TRACK_COLOUR,
                          cv2.FILLED)
            fill = 0.0 if not math.isfinite(score) else min(1.0, max(0.0, score))
            length = round(fill * inner_w)
            if length > 0:
                cv2.rectangle(panel, (left, bar_y), (left + length - 1, bar_y + style.bar_h - 1), BAR_COLOUR,
                              cv2.FILLED)
    out[y0:y0 + panel_h, x0:x0 + panel_w] = panel
    return out


def _text(panel: np.ndarray, text: str, origin: tuple[int, int], style: TextStyle,
          colour: tuple[int, int, int] = TEXT_COLOUR) -> None:
    if text:
        cv2.putText(panel, text, origin, FONT, style.scale, colour, style.thickness, cv2.LINE_AA)
