"""One supervised stream: its capture thread and buffer, the replacement of a hung reader, and its status.

A :class:`StreamCapture` is what a consumer (the pipeline) holds per stream. It picks the buffer policy from the
source (a live source ``drop_oldest`` with room for one frame, so a slow consumer skips frames instead of building
lag; a file ``wait`` with room for four, so every frame is processed in order), and it survives a reader that hangs:

::

    poll() ──► reader stalled past read_timeout, live source, re-makeable? ──► abandon it; new source,
                                                                               new thread and buffer
    pop()  ──► frame of the current thread, its index and generation shifted by the abandoned threads' totals

An OpenCV read cannot be interrupted, so the hung thread is left behind (a daemon; it exits if its read ever
returns). The frame indices, generations and counters of ``pop()`` and ``stats()`` are cumulative over every
thread the stream has had, so a consumer sees one stream whose generation went up by one (its model state resets).

The stream's status is a :class:`StreamStatus`. It follows the capture thread's status as sampled by the
consumer, so it may skip states the thread passed through between two samples; :data:`TRANSITIONS` is written for
that, and a step outside it is a bug (:class:`StatusTransitionError`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from enum import Enum

import numpy as np

from streamtsm.capture.buffer import FrameBuffer
from streamtsm.capture.frame import Frame
from streamtsm.capture.sources import Source, open_source
from streamtsm.capture.thread import CaptureThread
from streamtsm.settings import RUN_DEFAULTS

log = logging.getLogger(__name__)


class StreamStatus(str, Enum):
    """Where a stream stands. The values are the ``status`` strings of the stats message."""

    STARTING = "starting"  # the first source is being opened
    CONNECTING = "connecting"  # a live source that has never opened is retried with back-off (see ``last_error``)
    RUNNING = "running"  # frames are coming
    RECONNECTING = "reconnecting"  # a live source is being reopened (a failed read, or a hung reader replaced)
    ENDED = "ended"  # a file reached its end; buffered frames may still come out
    STOPPED = "stopped"  # the capture was stopped; buffered frames may still come out
    FAILED = "failed"  # the source could not be opened, or reconnecting gave up (see ``error``)
    DONE = "done"  # the consumer has finished the stream, and its capture ended or stopped

    def __str__(self) -> str:
        return self.value


_S = StreamStatus
# The steps a stream's status may take. A status is sampled, not pushed, so a step may skip states in between
# (a short file can go from starting to ended between two samples); what no sample can ever see is a stream coming
# back from failed or done, or a file that ended starting to run again.
TRANSITIONS: dict[StreamStatus, frozenset[StreamStatus]] = {
    _S.STARTING: frozenset({_S.CONNECTING, _S.RUNNING, _S.RECONNECTING, _S.ENDED, _S.STOPPED, _S.FAILED, _S.DONE}),
    _S.CONNECTING: frozenset({_S.RUNNING, _S.RECONNECTING, _S.STOPPED, _S.FAILED, _S.DONE}),
    _S.RUNNING: frozenset({_S.RECONNECTING, _S.ENDED, _S.STOPPED, _S.FAILED, _S.DONE}),
    _S.RECONNECTING: frozenset({_S.RUNNING, _S.ENDED, _S.STOPPED, _S.FAILED, _S.DONE}),
    _S.ENDED: frozenset({_S.DONE}),
    _S.STOPPED: frozenset({_S.DONE}),
    _S.FAILED: frozenset(),
    _S.DONE: frozenset(),
}


class StatusTransitionError(RuntimeError):
    """A stream's status took a step :data:`TRANSITIONS` does not allow: a bug in the capture, not bad input."""


def check_transition(old: StreamStatus, new: StreamStatus) -> None:
    """Raise unless a stream may go from ``old`` to ``new`` (staying put is always allowed).

    Raises:
        StatusTransitionError: naming both statuses and the steps allowed from ``old``.
    """
    if new is not old and new not in TRANSITIONS[old]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[old])) or "none (it is final)"
        raise StatusTransitionError(f"stream status cannot go from {old.value!r} to {new.value!r}; "
                                    f"allowed from {old.value!r}: {allowed}")


_COUNTERS = ("frames_read", "dropped", "skipped", "bad_frames", "missing_frames", "reconnects")


class StreamCapture:
    """A stream's capture, supervised: owns its CaptureThread and FrameBuffer and replaces a hung reader.

    Args:
        source: camera index, path, URL, image-sequence pattern or ``"synthetic[...]"`` (opened with
            :func:`open_source`), a :class:`Source` object (not opened yet), or a function returning a new one. A
            source given as an object cannot be re-made, so its hung reader is not replaced.
        stream_id: id put in every frame.
        frame_stride: keep one frame in this many.
        realtime: pace a file to its native fps.
        read_timeout: seconds a read may block before the reader counts as hung (see :class:`CaptureThread`).
        backoff: (first, longest) seconds between reopen attempts of a live source.
        notify: event set whenever a frame arrives or the capture closes its buffer (one event for many streams).
        retry_open: a live source that cannot be opened at first is retried with back-off (``connecting``) instead
            of failing (see :class:`CaptureThread`).
        preprocess: the model's preprocessing, run by a live source's capture thread on every frame it keeps
            (``Frame.tensor``; see :class:`CaptureThread`); a file's frames come without it.
        live_buffer: frames a live source's buffer holds for the consumer (oldest first); a frame arriving when it
            is full drops the oldest (counted in ``dropped``). 1 hands over only the newest frame; 2 lets a consumer
            that came late by up to a frame period take the frame it missed, then the next, without a drop, and
            never more than one frame behind.

    Raises:
        SourceError: the source string names nothing that can be opened.
        ConfigError: an option is out of range.
    """

    def __init__(self, source: str | int | Source | Callable[[], Source], stream_id: str, *, frame_stride: int = 1,
                 realtime: bool = False, read_timeout: float = 5.0, backoff: tuple[float, float] = (0.5, 8.0),
                 notify: threading.Event | None = None, retry_open: bool = False,
                 preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
                 live_buffer: int = RUN_DEFAULTS["live_buffer"]) -> None:
        self.stream_id = stream_id
        self.live_buffer = live_buffer
        self.retry_open = retry_open
        self.frame_stride = frame_stride
        self.realtime = realtime
        self.read_timeout = read_timeout
        self.backoff = backoff
        self.preprocess = preprocess
        self._make_source = _source_maker(source)
        self._replaceable = not isinstance(source, Source)
        self._notify = notify
        self._lock = threading.Lock()  # guards the thread swap against a stop() from another thread
        self._stopping = False
        self._consumer_done = False
        # Totals of the abandoned threads, added to the current one's so the stream's figures keep increasing.
        self._index_base = 0
        self._generation_base = 0
        self._totals_base = dict.fromkeys(_COUNTERS, 0)
        self._status = StreamStatus.STARTING
        self._reported = StreamStatus.STARTING
        # Readers abandoned while hung: still blocked in a decoder, perhaps for good (see blocked()).
        self._abandoned: list[CaptureThread] = []
        self._thread, self._buffer = self._new_capture()

    def _new_capture(self) -> tuple[CaptureThread, FrameBuffer]:
        source = self._make_source()
        if source.is_live:
            buffer = FrameBuffer(self.live_buffer, "drop_oldest", self._notify)
        else:
            buffer = FrameBuffer(4, "wait", self._notify)
        # Only a live source's reader preprocesses: there the model is the bottleneck and the work is worth moving
        # off its thread. A file's reader waits for the consumer anyway, and frames preprocessed there would reach
        # the buffers at other moments, changing which streams' frames meet in a batch: files keep the batches
        # (and so the exact outputs) they had.
        thread = CaptureThread(source, self.stream_id, buffer, frame_stride=self.frame_stride,
                               realtime=self.realtime, read_timeout=self.read_timeout, backoff=self.backoff,
                               retry_open=self.retry_open, preprocess=self.preprocess if source.is_live else None)
        return thread, buffer

    # -- control ------------------------------------------------------------------------------------------------

    def start(self) -> StreamCapture:
        """Start the capture thread; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the capture to stop (thread-safe); frames already buffered can still be popped. A stopped stream's
        hung reader is not replaced."""
        with self._lock:
            self._stopping = True
            self._thread.stop()

    def finish(self) -> None:
        """The consumer is done with the stream (its frame budget is spent, or it drained the buffer): stop the
        capture; once it has stopped or ended, the status is ``done``."""
        self._consumer_done = True
        self.stop()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the current capture thread (an abandoned hung one is left alone)."""
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        """True while the current capture thread runs."""
        return self._thread.is_alive()

    def blocked(self) -> bool:
        """True while any of this stream's capture threads, the current one or one abandoned as hung, is alive:
        after :meth:`stop` and a join, such a thread is blocked inside a decoder call."""
        return self._thread.is_alive() or any(t.is_alive() for t in self._abandoned)

    # -- frames -------------------------------------------------------------------------------------------------

    def pop(self) -> Frame | None:
        """The oldest buffered frame, its index and generation counted over every capture the stream has had; None
        when nothing is buffered."""
        frame = self._buffer.pop()
        if frame is not None and (self._index_base or self._generation_base):
            frame = replace(frame, index=frame.index + self._index_base,
                            generation=frame.generation + self._generation_base)
        return frame

    @property
    def finished(self) -> bool:
        """True when no frame will ever come out again: the capture closed its buffer and it is empty."""
        return self._buffer.finished

    # -- supervision --------------------------------------------------------------------------------------------

    @property
    def status(self) -> StreamStatus:
        """The stream's status now (sampled from its capture thread)."""
        return self._sync()

    @property
    def error(self) -> BaseException | None:
        """The exception that made the current capture fail, None otherwise."""
        return self._thread.error

    def poll(self) -> bool:
        """Supervise once: replace a hung reader, then sample the status.

        Returns:
            True when the status changed since the last poll, or a reader was replaced (news for the stats).
        """
        replaced = self._replace_if_hung()
        status = self._sync()
        changed = status is not self._reported
        if changed:
            log.info("stream %s: %s -> %s%s", self.stream_id, self._reported.value, status.value,
                     f" ({self._thread.stats()['last_error']})"
                     if status in (StreamStatus.RECONNECTING, StreamStatus.FAILED) else "")
            self._reported = status
        return replaced or changed

    def _sync(self) -> StreamStatus:
        """Move the status to what the capture thread says now (checked against :data:`TRANSITIONS`)."""
        new = self._from_thread(self._thread.status)
        check_transition(self._status, new)
        self._status = new
        return new

    def _from_thread(self, thread_status: str) -> StreamStatus:
        status = StreamStatus(thread_status)
        if status in (StreamStatus.STARTING, StreamStatus.CONNECTING) and self._generation_base:
            return StreamStatus.RECONNECTING  # a replacement reader opening its source
        if status in (StreamStatus.ENDED, StreamStatus.STOPPED) and self._consumer_done:
            return StreamStatus.DONE
        return status

    def _replace_if_hung(self) -> bool:
        """Replace the reader of a live stream whose read has hung past ``read_timeout``; True when replaced.

        Only a live source is replaced (a file has no gap to skip), and only one that can be re-made (a source
        given as an object cannot be opened twice at once). The new reader is a new generation: the stream's model
        state resets.
        """
        with self._lock:
            old = self._thread
            if self._stopping or not self._replaceable or not old.stalled or not old.source.is_live:
                return False
            stats = old.stats()
            log.warning("stream %s: a read hung for more than %.1f s; abandoning that capture and reopening %s",
                        self.stream_id, self.read_timeout, old.source.name)
            old.stop()
            self._abandoned = [t for t in self._abandoned if t.is_alive()] + [old]
            for key in _COUNTERS:
                self._totals_base[key] += stats[key]
            self._totals_base["reconnects"] += 1
            self._index_base += stats["frames_read"]
            self._generation_base += stats["generation"] + 1
            self._thread, self._buffer = self._new_capture()
            self._thread.start()
        check_transition(self._status, StreamStatus.RECONNECTING)
        self._status = StreamStatus.RECONNECTING
        return True

    def stats(self) -> dict:
        """The stream's capture figures, cumulative over every reader it has had.

        Returns:
            Dict with source, status (a stats-message string), stalled, frames_read, dropped, skipped, bad_frames,
            missing_frames, reconnects, generation, fps (of the current reader) and last_error.
        """
        status = self._sync()
        c = self._thread.stats()
        return {
            "source": c["source"],
            "status": status.value,
            "stalled": c["stalled"],
            **{key: c[key] + self._totals_base[key] for key in _COUNTERS},
            "generation": c["generation"] + self._generation_base,
            "fps": c["fps"],
            "last_error": c["last_error"],
        }


def _source_maker(source: str | int | Source | Callable[[], Source]) -> Callable[[], Source]:
    if isinstance(source, Source):
        return lambda: source
    if callable(source):
        return source
    return lambda: open_source(source)
