"""The capture thread: owns one source, reads it, and feeds a FrameBuffer; reconnects live sources.

Hang detection. An OpenCV read cannot be interrupted from another thread, so a hung read is handled in three
layers:

1. Network streams are opened with FFmpeg's own open/read time-outs (``VideoSource(timeout=...)``), so the
   backend itself gives up and ``read`` returns None, which is an ordinary failure and triggers a reconnect.
2. ``CaptureThread.stalled`` (also in ``stats()``) is a watchdog anyone can poll: True while a read has been
   in progress for more than ``read_timeout`` seconds. Time spent waiting for room in a ``"wait"`` buffer or
   pacing a file does not count.
3. When a read of a live source finally returns after more than ``read_timeout`` seconds, the thread treats it as
   a failure: the frame is discarded and the source is reopened (a new generation), since the stream has a gap
   and the model state must be reset anyway.

A read that never returns keeps the thread blocked: ``stop()`` then cannot end it and ``join(timeout)`` returns
with the thread alive. It is a daemon thread, so it does not keep the process from exiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import cv2
import numpy as np

from streamtsm.capture.buffer import FrameBuffer
from streamtsm.capture.frame import Frame
from streamtsm.capture.sources import Source, to_bgr
from streamtsm.errors import ConfigError, SourceError

log = logging.getLogger(__name__)

STATUSES = ("starting", "connecting", "running", "reconnecting", "ended", "failed", "stopped")

_FPS_WINDOW_S = 2.0
_MAX_CATCH_UP_S = 1.0  # a paced file read more than this late re-anchors its clock instead of bursting


def opencv_on_calling_threads() -> None:
    """Makes OpenCV run each call on the thread that makes it (``cv2.setNumThreads(1)``; process-wide).

    A live process already runs one capture thread per stream, each decoding, resizing and converting its frames
    beside the model's threads. OpenCV's own pool would split each of those small calls over every core again, and
    the split costs more than it saves: 8 synthetic 320x240 cameras at 30 fps with their preprocessing, and nothing
    else, took 0.61 cores with OpenCV's pool of 2 threads and 0.51 without it on a 2-core machine (alternating
    windows of one run, tools/bench_streams.py). FFmpeg's decoding threads are its own and not affected.
    """
    cv2.setNumThreads(1)


class CaptureThread(threading.Thread):
    """Reads one source in a daemon thread and puts its frames in a FrameBuffer.

    The source is opened and released by this thread only. Every image read gets the next ``index``; images whose
    index is not a multiple of ``frame_stride`` are counted in ``skipped`` and not converted; images ``to_bgr``
    rejects are counted in ``bad_frames``; the rest go into the buffer as ``Frame``.

    At the end of a non-live source the status becomes ``"ended"``; what the source failed to deliver
    (``Source.losses``: a truncated file, a gap in an image sequence, a decode error) is logged as a warning, once
    per kind, and counted in ``missing_frames``. A live source that fails (read returns None,
    or a read hangs longer than ``read_timeout``) is released and reopened with exponential back-off; each
    successful reopen increments ``generation`` and ``reconnects``. A source that cannot be opened the first time
    (e.g. a camera that does not exist) fails at once: status ``"failed"``, the SourceError in ``error``; unless
    ``retry_open`` is set and it is live (a camera down now may come up later): then it is ``"connecting"``. Whenever
    the thread exits it closes the buffer, which wakes the consumer.

    Args:
        source: The source to read; not opened yet.
        stream_id: Id put in every frame.
        buffer: Where frames go.
        frame_stride: Keep one frame in this many (>= 1).
        realtime: Pace a non-live source to its native fps (ignored for live sources).
        reconnect: Reopen a live source that fails; if False a failure ends the thread with status ``"failed"``.
        backoff: (first, longest) wait in seconds between reopen attempts; the wait doubles after each attempt
            that does not bring a frame.
        max_reconnects: Most consecutive reopen attempts without a frame before giving up (``"failed"``);
            None for no limit.
        read_timeout: Seconds a read may block before the thread counts as stalled and, for a live source, before
            the read counts as a failure (see the module docstring).
        retry_open: A live source that cannot be opened the first time is retried with back-off (status
            ``"connecting"``, the reason in ``last_error``) until it opens or the thread is stopped; without it, it
            fails at once. A file always fails at once.
        preprocess: Turns a frame's BGR image into the model's input (``Frame.tensor``), here rather than in the
            consumer's thread. If it raises, the frame goes out without a tensor and the consumer preprocesses it
            itself, so a bad crop or image is reported where it was before.

    Raises:
        ConfigError: If an option is out of range.
    """

    def __init__(self, source: Source, stream_id: str, buffer: FrameBuffer, *, frame_stride: int = 1,
                 realtime: bool = False, reconnect: bool = True, backoff: tuple[float, float] = (0.5, 8.0),
                 max_reconnects: int | None = None, read_timeout: float = 5.0, retry_open: bool = False,
                 preprocess: Callable[[np.ndarray], np.ndarray] | None = None):
        if isinstance(frame_stride, bool) or not isinstance(frame_stride, int) or frame_stride < 1:
            raise ConfigError(f"frame_stride must be an integer >= 1, got {frame_stride!r}")
        if len(backoff) != 2 or not 0 < backoff[0] <= backoff[1]:
            raise ConfigError(f"backoff must be (first, longest) seconds with 0 < first <= longest, got {backoff!r}")
        if max_reconnects is not None and max_reconnects < 0:
            raise ConfigError(f"max_reconnects must be >= 0 or None, got {max_reconnects!r}")
        if read_timeout <= 0:
            raise ConfigError(f"read_timeout must be > 0 seconds, got {read_timeout!r}")
        super().__init__(name=f"capture-{stream_id}", daemon=True)
        self.source = source
        self.stream_id = stream_id
        self.buffer = buffer
        self.frame_stride = frame_stride
        self.realtime = realtime
        self.reconnect = reconnect
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self.max_reconnects = max_reconnects
        self.read_timeout = float(read_timeout)
        self.retry_open = retry_open
        self.preprocess = preprocess
        self.error: BaseException | None = None

        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._status = "starting"
        self._frames_read = 0
        self._skipped = 0
        self._bad_frames = 0
        self._missing_frames = 0
        self._warned: set[str] = set()  # kinds of loss already logged
        self._reconnects = 0
        self._generation = 0
        self._last_error: str | None = None
        self._read_started: float | None = None  # monotonic start of the read in progress, for the watchdog
        self._read_times: deque[float] = deque()
        self._failed_attempts = 0  # consecutive reopen attempts that have not yet brought a frame
        self._next_due = 0.0

    # -- control ------------------------------------------------------------------------------------------------

    def start(self) -> CaptureThread:
        """Starts the thread and returns it, so ``thread = CaptureThread(...).start()`` reads naturally."""
        super().start()
        return self

    def stop(self) -> None:
        """Asks the thread to exit; it does so within a fraction of a second unless blocked inside a read."""
        self._halt.set()

    @property
    def open_error(self) -> BaseException | None:
        """Alias of ``error``: the exception that made the thread fail, None otherwise."""
        return self.error

    # -- state --------------------------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """One of ``STATUSES``."""
        with self._lock:
            return self._status

    @property
    def generation(self) -> int:
        """Number of successful reopens so far; the ``generation`` of the frames now being produced."""
        with self._lock:
            return self._generation

    @property
    def stalled(self) -> bool:
        """True while a read has been blocked for more than ``read_timeout`` seconds."""
        with self._lock:
            return self._stalled_locked(time.monotonic())

    def _stalled_locked(self, now: float) -> bool:
        return self._read_started is not None and now - self._read_started > self.read_timeout

    def stats(self) -> dict:
        """A consistent snapshot of the thread's counters and state.

        Returns:
            Dict with stream_id, source, status, stalled, frames_read, skipped, bad_frames, missing_frames (frames
            a file or image sequence failed to deliver), dropped (by the buffer), reconnects, generation, fps
            (reads per second over the last ~2 s) and last_error (str or None).
        """
        now = time.monotonic()
        with self._lock:
            times = [t for t in self._read_times if now - t <= _FPS_WINDOW_S]
            fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
            return {
                "stream_id": self.stream_id,
                "source": self.source.name,
                "status": self._status,
                "stalled": self._stalled_locked(now),
                "frames_read": self._frames_read,
                "skipped": self._skipped,
                "bad_frames": self._bad_frames,
                "missing_frames": self._missing_frames,
                "dropped": self.buffer.dropped,
                "reconnects": self._reconnects,
                "generation": self._generation,
                "fps": fps,
                "last_error": self._last_error,
            }

    def _set_status(self, status: str, error: str | None = None) -> None:
        with self._lock:
            self._status = status
            if error is not None:
                self._last_error = error

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self._set_status("failed", str(exc))

    # -- the thread ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self._open_first():
                self._read_loop()
        except Exception as exc:  # a bug in a source: make it visible through status and error, not a dead thread
            self._fail(exc)
        finally:
            self.source.release()
            self.buffer.close()
            with self._lock:
                if self._status not in ("ended", "failed"):
                    self._status = "stopped"

    def _open_first(self) -> bool:
        try:
            self.source.open()
        except SourceError as exc:
            # A file that is not there is a typo: fail. A camera may just be down (power, network) and come up
            # later: with retry_open it is retried, and meanwhile the stream says "connecting".
            if not (self.retry_open and self.source.is_live):
                self._fail(exc)
                return False
            if not self._connect(str(exc)):
                return False
        self._set_status("running")
        self._next_due = time.monotonic()
        return True

    def _connect(self, reason: str) -> bool:
        """Retries a live source that has never opened, with back-off, until it opens (True) or the thread is
        stopped (False). Not a reconnect: the generation stays 0, since no frame came before."""
        self._set_status("connecting", reason)
        self.source.release()
        first, longest = self.backoff
        attempts = 0
        while True:
            delay = min(first * 2 ** min(attempts, 30), longest)
            attempts += 1
            if self._halt.wait(delay):
                return False
            try:
                self.source.open()
            except SourceError as exc:
                self._set_status("connecting", str(exc))
                self.source.release()
                continue
            return True

    def _read_loop(self) -> None:
        index = 0
        paced = self.realtime and not self.source.is_live
        while not self._halt.is_set():
            if paced and not self._wait_until_due():
                return
            started = time.monotonic()
            with self._lock:
                self._read_started = started
            try:
                image = self.source.read()
            finally:
                timestamp = time.time()
                now = time.monotonic()
                with self._lock:
                    self._read_started = None
            if self._halt.is_set():
                return
            if image is None:
                if not self.source.is_live:
                    self._report_losses()
                    self._set_status("ended")
                    return
                if not self._recover(f"lost {self.source.name}: read failed"):
                    return
                continue
            if self.source.is_live and now - started > self.read_timeout:
                if not self._recover(f"{self.source.name} hung: a read took {now - started:.1f} s "
                                     f"(read_timeout {self.read_timeout:g} s)"):
                    return
                continue
            frame_index, index = index, index + 1
            # The position in a file: every image decoded counts, as in ``index`` (a file is read by one thread
            # from its start; only live readers are ever replaced).
            media_ts = frame_index / self.source.fps if not self.source.is_live and self.source.fps else None
            with self._lock:
                self._frames_read += 1
                self._read_times.append(now)
                while self._read_times and now - self._read_times[0] > _FPS_WINDOW_S:
                    self._read_times.popleft()
            if frame_index % self.frame_stride:
                with self._lock:
                    self._skipped += 1
                continue
            bgr = to_bgr(image)
            if bgr is None:
                with self._lock:
                    self._bad_frames += 1
                continue
            self._failed_attempts = 0
            tensor = None
            if self.preprocess is not None:
                try:
                    tensor = self.preprocess(bgr)
                except Exception:  # noqa: BLE001 - the consumer preprocesses it again and reports the error
                    tensor = None
            frame = Frame(self.stream_id, frame_index, timestamp, bgr, self.generation, media_ts, tensor)
            if not self.buffer.put(frame, self._halt):
                return

    def _report_losses(self) -> None:
        """Counts and logs what the ended source failed to deliver, so that a short file is not a quiet end."""
        for loss in self.source.losses():
            with self._lock:
                self._missing_frames += loss.frames
                if loss.kind in self._warned:
                    continue
                self._warned.add(loss.kind)
                self._last_error = loss.message
            log.warning("stream %s: %s", self.stream_id, loss.message)

    def _wait_until_due(self) -> bool:
        """Paces a file to its fps; False if stopped while waiting."""
        fps = self.source.fps
        if not fps:
            return True
        now = time.monotonic()
        if self._next_due - now > 0 and self._halt.wait(self._next_due - now):
            return False
        if now - self._next_due > _MAX_CATCH_UP_S:
            self._next_due = now
        self._next_due += 1.0 / fps
        return True

    def _recover(self, reason: str) -> bool:
        """Reopens a failed live source with back-off; False if the thread must exit (stopped or given up)."""
        if not self.reconnect:
            self._fail(SourceError(reason))
            return False
        self._set_status("reconnecting", reason)
        self.source.release()
        first, longest = self.backoff
        while True:
            if self.max_reconnects is not None and self._failed_attempts >= self.max_reconnects:
                with self._lock:
                    last = self._last_error
                self._fail(SourceError(f"gave up on {self.source.name} after {self._failed_attempts} reconnect "
                                       f"attempts: {last}"))
                return False
            delay = min(first * 2 ** min(self._failed_attempts, 30), longest)
            self._failed_attempts += 1
            if self._halt.wait(delay):
                return False
            try:
                self.source.open()
            except SourceError as exc:
                self._set_status("reconnecting", str(exc))
                continue
            with self._lock:
                self._generation += 1
                self._reconnects += 1
                self._status = "running"
            return True
