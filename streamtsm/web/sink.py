"""The recognizer's side of the web view: a sink that keeps, in memory, what the pages show.

The pipeline's calls (``on_step``, ``on_message``) only update state under one lock and wake whoever waits: the
newest frame of each stream, the overlay's view of it, the recent events, and each page's queue of messages. The
work that costs (drawing the overlay, JPEG encoding, writing to sockets) happens on other threads::

    Pipeline ─on_step/on_message─► WebSink state (lock) ─► encoder thread: overlay + JPEG, at most max_fps per
                                        │                  stream, only while someone watches it
                                        └─ bounded queue per page (drop_oldest) ─► its server thread ─► SSE

A browser that reads slowly, or not at all, blocks only its own server thread in a socket write: the frames it
misses and the messages its queue cannot hold are counted (``frames_dropped``, ``messages_dropped``), and the
pipeline never waits for it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from streamtsm.overlay import StreamView, ViewTracker, annotate
from streamtsm.publish import encode
from streamtsm.sinks.base import StepReport
from streamtsm.web.health import Readiness

log = logging.getLogger(__name__)

# How long a waiting server thread sleeps before it looks again at whether the server is closing.
_POLL_S = 0.2
# A page's event stream gets a comment line this often when idle, so that a dead peer is noticed.
_KEEPALIVE_S = 10.0


@dataclass
class _Viewer:
    """One MJPEG response: the edition of its stream's JPEG it took last, and how many it missed."""

    last: int
    dropped: int = 0


@dataclass
class _Page:
    """One event stream (a page): its bounded queue of SSE records, and how many did not fit."""

    queue: deque = field(default_factory=deque)
    dropped: int = 0


@dataclass
class _Slot:
    """One stream: its newest frame (``seq`` counts them) and its newest JPEG (``edition`` counts them)."""

    image: np.ndarray | None = None
    seq: int = 0
    encoded_seq: int = 0
    jpeg: bytes | None = None
    edition: int = 0
    next_due: float = 0.0
    viewers: list[_Viewer] = field(default_factory=list)


class WebSink:
    """Keeps what the web view shows and hands it to the server's threads; never blocks the pipeline.

    Args:
        max_fps: the most JPEGs encoded per second and stream (and predictions passed on to pages per stream).
        queue_size: SSE records a page's queue holds; beyond it the oldest are dropped (and counted).
        recent_events: event messages kept to replay to a page that connects.
        max_width: frames wider than this are scaled down before the overlay and encoding.
        jpeg_quality: OpenCV's JPEG quality, 1 to 100.

    Attributes:
        readiness: the streams' statuses from the stats, for ``/readyz``.
    """

    def __init__(self, *, max_fps: float = 10.0, queue_size: int = 256, recent_events: int = 50,
                 max_width: int = 960, jpeg_quality: int = 80) -> None:
        self.max_fps = max_fps
        self.queue_size = queue_size
        self.max_width = max_width
        self.jpeg_quality = jpeg_quality
        self.readiness = Readiness()
        self._lock = threading.Lock()
        self._new_step = threading.Condition(self._lock)  # the encoder waits on it
        self._new_jpeg = threading.Condition(self._lock)  # MJPEG responses wait on it
        self._new_message = threading.Condition(self._lock)  # SSE responses wait on it
        self._tracker = ViewTracker()
        self._slots: dict[str, _Slot] = {}
        self._pages: list[_Page] = []
        self._events: deque[dict] = deque(maxlen=recent_events)
        self._preds: dict[str, dict] = {}
        self._stats: dict | None = None
        self._pred_sent: dict[str, float] = {}
        self._closed = False
        self.frames_encoded = 0
        self.frames_dropped = 0
        self.messages_dropped = 0
        self._encode_errors = 0
        self._encoder = threading.Thread(target=self._encode_loop, name="web-encoder", daemon=True)
        self._encoder.start()

    # -- the pipeline's side: state updates only -------------------------------------------------------------------

    def on_step(self, step: StepReport) -> None:
        with self._lock:
            watched = False
            for result in step.results:
                slot = self._slot(result.stream_id)
                slot.image = result.frame.image  # a reference: the capture hands out a new array per frame
                slot.seq += 1
                watched = watched or bool(slot.viewers)
            if watched:
                self._new_step.notify()

    def on_message(self, topic: str, payload: dict) -> None:
        self.readiness.on_message(topic, payload)
        self._tracker.on_message(topic, payload)  # it has a lock of its own
        kind = payload.get("type")
        forward = True
        with self._lock:
            if kind == "pred":
                sid = payload["stream"]
                self._slot(sid)
                self._preds[sid] = payload
                # Predictions come at the model's rate; a page needs no more than it can show.
                now = time.monotonic()
                forward = now - self._pred_sent.get(sid, -math.inf) >= 1.0 / self.max_fps
                if forward:
                    self._pred_sent[sid] = now
            elif kind == "event":
                self._events.append(payload)
            elif kind == "stats":
                self._stats = payload
                for sid in payload.get("streams", {}):
                    self._slot(sid)
            forward = forward and bool(self._pages)
        if not forward:
            return
        record = _sse(encode(topic, payload)[1])  # NaN-safe JSON, as on ZeroMQ; outside the lock
        extra = _sse(_json(self.stats()), event="web") if kind == "stats" else None
        with self._lock:
            for page in self._pages:
                for item in (record, extra):
                    if item is None:
                        continue
                    if len(page.queue) >= self.queue_size:
                        page.queue.popleft()
                        page.dropped += 1
                        self.messages_dropped += 1
                    page.queue.append(item)
            self._new_message.notify_all()

    def close(self) -> None:
        """Ends the encoder and wakes every waiting response, which then ends (the server closes the sockets)."""
        with self._lock:
            self._closed = True
            for cond in (self._new_step, self._new_jpeg, self._new_message):
                cond.notify_all()
        self._encoder.join(1.0)

    # -- the server's side ---------------------------------------------------------------------------------------

    def stream_ids(self) -> list[str]:
        """The streams seen so far, in order of appearance."""
        with self._lock:
            return list(self._slots)

    def stats(self) -> dict:
        """The web view's own figures: viewers, pages, JPEGs encoded and what slow clients missed."""
        with self._lock:
            return {"viewers": sum(len(s.viewers) for s in self._slots.values()), "pages": len(self._pages),
                    "frames_encoded": self.frames_encoded, "frames_dropped": self.frames_dropped,
                    "messages_dropped": self.messages_dropped}

    def frames(self, stream_id: str, stop: threading.Event) -> Iterator[bytes]:
        """The stream's annotated JPEGs as they are encoded, the newest only (a reader that falls behind skips
        frames, counted in ``frames_dropped``); ends when ``stop`` is set or the sink closes.

        Raises:
            KeyError: the stream is not known (yet).
        """
        with self._lock:
            slot = self._slots[stream_id]  # raised here, not at the first frame: a generator would wait for it
        return self._frames(slot, stop)

    def _frames(self, slot: _Slot, stop: threading.Event) -> Iterator[bytes]:
        with self._lock:
            viewer = _Viewer(last=slot.edition - 1 if slot.jpeg is not None else slot.edition)
            slot.viewers.append(viewer)
            self._new_step.notify()  # the encoder starts on this stream
        try:
            while True:
                with self._lock:
                    while viewer.last >= slot.edition and not self._closed and not stop.is_set():
                        self._new_jpeg.wait(_POLL_S)
                    if self._closed or stop.is_set():
                        return
                    jpeg, viewer.last = slot.jpeg, slot.edition
                yield jpeg
        finally:
            with self._lock:
                slot.viewers.remove(viewer)

    def messages(self, stop: threading.Event) -> Iterator[bytes]:
        """A page's Server-Sent Events: first the newest stats, each stream's newest prediction and the recent
        events, then every message as it comes (predictions at most ``max_fps`` per stream), and ``web`` records
        with :meth:`stats`; a comment line when idle. Ends when ``stop`` is set or the sink closes."""
        page = _Page()
        with self._lock:
            replay = [p for p in (self._stats, *self._preds.values(), *self._events) if p is not None]
            self._pages.append(page)
        try:
            yield b"retry: 1000\n\n" + b"".join(_sse(encode("", p)[1]) for p in replay)
            idle_since = time.monotonic()
            while True:
                with self._lock:
                    while not page.queue and not self._closed and not stop.is_set():
                        if time.monotonic() - idle_since >= _KEEPALIVE_S:
                            break
                        self._new_message.wait(_POLL_S)
                    if self._closed or stop.is_set():
                        return
                    items = list(page.queue)
                    page.queue.clear()
                idle_since = time.monotonic()
                yield b"".join(items) if items else b": keepalive\n\n"
        finally:
            with self._lock:
                self._pages.remove(page)

    # -- the encoder thread ----------------------------------------------------------------------------------------

    def _encode_loop(self) -> None:
        period = 1.0 / self.max_fps
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                due, wait = [], 1.0
                for sid, slot in self._slots.items():
                    if not slot.viewers or slot.image is None or slot.seq == slot.encoded_seq:
                        continue
                    if now >= slot.next_due:
                        due.append((slot, slot.image, slot.seq, self._tracker.view(sid)))
                    else:
                        wait = min(wait, slot.next_due - now)
                if not due:
                    self._new_step.wait(wait)
                    continue
            for slot, image, seq, view in due:
                started = time.monotonic()
                jpeg = self._encode(image, view)
                with self._lock:
                    slot.encoded_seq, slot.next_due = seq, started + period
                    if jpeg is None:
                        continue
                    if slot.jpeg is not None:
                        for viewer in slot.viewers:  # the JPEG being replaced never reached these viewers
                            if viewer.last < slot.edition:
                                viewer.dropped += 1
                                self.frames_dropped += 1
                    slot.jpeg = jpeg
                    slot.edition += 1
                    self.frames_encoded += 1
                    self._new_jpeg.notify_all()

    def _encode(self, image: np.ndarray, view: StreamView) -> bytes | None:
        try:
            h, w = image.shape[:2]
            if w > self.max_width:
                image = cv2.resize(image, (self.max_width, round(h * self.max_width / w)),
                                   interpolation=cv2.INTER_AREA)
            image = annotate(image, view)
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            if not ok:
                raise ValueError(f"OpenCV could not encode a {image.shape} image as JPEG")
            return buf.tobytes()
        except Exception:
            self._encode_errors += 1
            if self._encode_errors == 1:  # once: an overlay bug must not flood the log at 10 fps
                log.exception("web view: a frame could not be drawn or encoded (further failures not logged)")
            return None

    def _slot(self, stream_id: str) -> _Slot:
        slot = self._slots.get(stream_id)
        if slot is None:
            slot = self._slots[stream_id] = _Slot()
        return slot


def _sse(data: bytes, event: str | None = None) -> bytes:
    # One record; the JSON is compact (no raw newlines), so one data line holds it.
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + data + b"\n\n"


def _json(value) -> bytes:
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
