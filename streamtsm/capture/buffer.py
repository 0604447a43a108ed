"""A bounded queue between one capture thread and the inference loop, with a named drop policy."""

from __future__ import annotations

import threading
from collections import deque

from streamtsm.capture.frame import Frame
from streamtsm.errors import ConfigError

POLICIES = ("drop_oldest", "wait")

# How often a blocked ``put`` looks at its stop event: an Event cannot be waited on together with a Condition.
_STOP_POLL_S = 0.05


class FrameBuffer:
    """Bounded, thread-safe FIFO of frames from one producer to one consumer.

    Two policies:

    - ``"drop_oldest"`` (live sources): ``put`` never blocks; when the buffer is full the oldest frame is
      discarded and counted in ``dropped``, so the consumer always sees the newest frames.
    - ``"wait"`` (files): ``put`` blocks until there is room or the stop event is set; nothing is ever dropped.

    ``notify`` lets one consumer wait for many buffers on a single Event: it is set after every ``put`` and on
    ``close``. The consumer should ``clear()`` it *before* popping from all its buffers, so that a put landing
    during the sweep sets it again and is not missed.

    Invariants: frames come out in the order they went in; at most ``capacity`` frames are held;
    ``put_count == popped + dropped + len(buffer)``.

    Args:
        capacity: Most frames held at once (>= 1).
        policy: ``"drop_oldest"`` or ``"wait"``.
        notify: Event to set after every put and on close.

    Raises:
        ConfigError: If the policy or capacity is not valid.
    """

    def __init__(self, capacity: int = 1, policy: str = "drop_oldest", notify: threading.Event | None = None):
        if policy not in POLICIES:
            raise ConfigError(f"buffer policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"buffer capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self.policy = policy
        self._notify = notify
        self._frames: deque[Frame] = deque()
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._put_count = 0
        self._dropped = 0
        self._popped = 0

    def put(self, frame: Frame, stop: threading.Event | None = None) -> bool:
        """Adds a frame, applying the policy when the buffer is full.

        Args:
            frame: The frame to add.
            stop: With the ``"wait"`` policy, give up waiting for room once this event is set.

        Returns:
            True if the frame was added, False only if the put gave up because ``stop`` was set.

        Raises:
            RuntimeError: If the buffer was already closed (a producer bug).
        """
        with self._not_full:
            if self._closed:
                raise RuntimeError("put() on a closed FrameBuffer")
            if self.policy == "wait":
                while len(self._frames) >= self.capacity:
                    if stop is not None and stop.is_set():
                        return False
                    self._not_full.wait(_STOP_POLL_S if stop is not None else None)
            elif len(self._frames) >= self.capacity:
                self._frames.popleft()
                self._dropped += 1
            self._frames.append(frame)
            self._put_count += 1
        if self._notify is not None:
            self._notify.set()
        return True

    def pop(self) -> Frame | None:
        """Removes and returns the oldest frame without blocking, or None if the buffer is empty."""
        with self._not_full:
            if not self._frames:
                return None
            frame = self._frames.popleft()
            self._popped += 1
            self._not_full.notify()
        return frame

    def close(self) -> None:
        """Marks the producer as done (idempotent); frames still held can be popped."""
        with self._lock:
            self._closed = True
        if self._notify is not None:
            self._notify.set()

    @property
    def closed(self) -> bool:
        """True once the producer has closed the buffer."""
        with self._lock:
            return self._closed

    @property
    def finished(self) -> bool:
        """True when the buffer is closed and empty: no frame will ever come out again."""
        with self._lock:
            return self._closed and not self._frames

    @property
    def put_count(self) -> int:
        """Frames added so far (including those dropped since)."""
        with self._lock:
            return self._put_count

    @property
    def dropped(self) -> int:
        """Frames discarded by the ``drop_oldest`` policy."""
        with self._lock:
            return self._dropped

    @property
    def popped(self) -> int:
        """Frames handed to the consumer."""
        with self._lock:
            return self._popped

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    def __repr__(self) -> str:
        with self._lock:
            return (f"FrameBuffer(capacity={self.capacity}, policy={self.policy!r}, held={len(self._frames)}, "
                    f"put={self._put_count}, dropped={self._dropped}, popped={self._popped}, closed={self._closed})")
