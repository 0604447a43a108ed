"""The one way results leave the pipeline: a sink.

A sink receives every message the pipeline builds (``on_message(topic, payload)``, the payloads of
``streamtsm.publish.schema``) and, if it defines ``on_step``, a :class:`StepReport` after every batched model call:
each stream's frame and top-k, the step's duration and its group's key. The pipeline calls both from its own
thread, between model steps, so a sink must return at once. One that can block (a disk, a network peer, a window)
goes behind :class:`QueuedSink`, which hands it everything on a thread of its own and counts what does not fit::

    Pipeline ──on_message / on_step──► Publisher, ConsoleSink, MetricsSink      (inline: they never block)
             └─────────────────────► QueuedSink ══ bounded queue ══► thread ──► Display, a file, a peer

Whoever makes a sink closes it (``close()``), after the pipeline's run: a publisher may outlive one run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from streamtsm.errors import ConfigError

if TYPE_CHECKING:
    from streamtsm.capture import Frame

log = logging.getLogger(__name__)

DROP_POLICIES = ("drop_oldest", "drop_newest", "block")
BLOCK_TIMEOUT = 10.0  # seconds ``block`` waits for room before it takes the sink for stuck (see QueuedSink)
STOP_POLL = 0.05  # seconds between looks at the stop event while ``block`` waits (the pipeline's own period)


@dataclass(frozen=True)
class StreamResult:
    """One stream's prediction in a model step.

    Attributes:
        stream_id: The stream's id.
        frame: The frame the prediction is for (its image as captured).
        topk: ``(label, probability)`` pairs of the smoothed prediction, best first.
    """

    stream_id: str
    frame: Frame
    topk: list[tuple[str, float]]


@dataclass(frozen=True)
class StepReport:
    """One batched model call of one model group, and what it predicted.

    Attributes:
        group: The group's key, as in the stats' ``models`` (``name``, ``name#2``, ...).
        step_ms: Duration of the batched call in milliseconds.
        results: The streams that got a prediction from it, in batch order.
    """

    group: str
    step_ms: float
    results: tuple[StreamResult, ...]


@runtime_checkable
class Sink(Protocol):
    """What the pipeline hands its results to.

    A sink may also define ``on_step(step: StepReport) -> None`` (see :class:`StepSink`); the pipeline calls it on
    the sinks that do, after every batched model call that predicted something.
    """

    def on_message(self, topic: str, payload: dict) -> None:
        """Receives one message (a prediction, an event or stats); must not block."""

    def close(self) -> None:
        """Releases what the sink holds; called once by whoever made it, after the run."""


@runtime_checkable
class StepSink(Sink, Protocol):
    """A sink that also wants each model step's frames and results."""

    def on_step(self, step: StepReport) -> None:
        """Receives one model step's report; must not block."""


def wants_steps(sink: Sink) -> bool:
    """Whether ``sink`` defines ``on_step``."""
    return callable(getattr(sink, "on_step", None))


class CallbackSink:
    """A sink made of plain functions, for using results in the same process (tests, tools, notebooks).

    Args:
        messages: called with ``(topic, payload)`` for every message.
        results: called with each :class:`StreamResult` of every step.
    """

    def __init__(self, messages: Callable[[str, dict], object] | None = None,
                 results: Callable[[StreamResult], object] | None = None) -> None:
        self.messages = messages
        self.results = results

    def on_message(self, topic: str, payload: dict) -> None:
        if self.messages is not None:
            self.messages(topic, payload)

    def on_step(self, step: StepReport) -> None:
        if self.results is not None:
            for result in step.results:
                self.results(result)

    def close(self) -> None:
        pass


class QueuedSink:
    """Runs a sink that can block on a thread of its own, behind a bounded queue, so it never delays a model step.

    The pipeline's calls only append to the queue. When the queue is full, the policy decides what is lost:
    ``drop_oldest`` discards the oldest waiting item (a live view wants the newest frame), ``drop_newest``
    discards the item arriving (a recorder keeps what it has, in order), and ``block`` loses nothing: the caller
    waits for room. That suits a source that waits too (a file: a writer slower than the model slows the run down
    instead of losing frames), never a live one. The wait is bounded: it ends when the sink takes an item, when
    ``close()`` is called (from another thread), when ``stop`` is set (a SIGTERM: the run must end within a second),
    when the sink raised (raised to the caller, never a deadlock), or after ``block_timeout`` seconds (a sink that
    takes that long for one item is stuck: until it takes one again, further items are dropped at once, so a run
    is delayed once, not once per item). An item not queued is counted in ``dropped``; what is queued reaches the
    sink in the order it was given. Messages and steps share the one queue, so their relative order holds too.

    ``close()`` lets the thread deliver what is queued and close the sink (in its own thread: a window is destroyed
    by the thread that drew it), waiting at most ``close_timeout`` seconds; a sink still blocked then is left to its
    daemon thread and what it had not taken is counted as dropped. The drops are logged once, at close.

    An exception raised by the sink stops delivery; it is raised again, once, from the next ``on_message``,
    ``on_step`` or ``close``, so it ends the run in the caller's thread as it would have inline (e.g. ``--show``
    without a display).

    Args:
        sink: the sink to run.
        maxsize: items the queue holds.
        policy: ``drop_oldest``, ``drop_newest`` or ``block``.
        messages: False to pass on only steps (a window has no use for messages; they would crowd its queue).
        close_timeout: seconds ``close()`` waits for the thread.
        name: names the thread and the log lines (the sink's class name when None).
        stop: ``block`` only: the run's stop event; a wait for room ends when it is set.
        block_timeout: ``block`` only: seconds one wait for room lasts at most.

    Attributes:
        dropped: items given to this sink that it never received.

    Raises:
        ConfigError: If ``maxsize`` is below 1, ``policy`` is not one of ``DROP_POLICIES`` or ``block_timeout`` is
            not above 0.
    """

    def __init__(self, sink: Sink, *, maxsize: int = 64, policy: str = "drop_oldest", messages: bool = True,
                 close_timeout: float = 2.0, name: str | None = None, stop: threading.Event | None = None,
                 block_timeout: float = BLOCK_TIMEOUT) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigError(f"a sink's queue must hold at least 1 item, got maxsize={maxsize!r}")
        if policy not in DROP_POLICIES:
            raise ConfigError(f"a sink's drop policy must be one of {', '.join(DROP_POLICIES)}, got {policy!r}")
        if not isinstance(block_timeout, (int, float)) or not block_timeout > 0:
            raise ConfigError(f"a sink's block_timeout must be a number of seconds > 0, got {block_timeout!r}")
        self.sink = sink
        self.maxsize = maxsize
        self.policy = policy
        self.messages = messages
        self.close_timeout = close_timeout
        self.name = name or type(sink).__name__
        self.stop = stop
        self.block_timeout = block_timeout
        self.dropped = 0
        self._steps = wants_steps(sink)
        self._items: deque[tuple[str, tuple]] = deque()
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the thread waits on it for items
        self._room = threading.Condition(lock)  # block: the caller waits on it for room
        self._stuck = False  # block: a wait for room timed out, and the sink has not taken an item since
        self._closing = False
        self._error: BaseException | None = None
        self._error_raised = False
        self._thread = threading.Thread(target=self._deliver_all, name=f"sink-{self.name}", daemon=True)
        self._thread.start()

    def on_message(self, topic: str, payload: dict) -> None:
        if self.messages:
            self._put(("on_message", (topic, payload)))

    def on_step(self, step: StepReport) -> None:
        if self._steps:
            self._put(("on_step", (step,)))

    def _put(self, item: tuple[str, tuple]) -> None:
        with self._cond:
            self._raise_pending()
            if self._closing or self._error is not None:
                self.dropped += 1
                return
            if len(self._items) >= self.maxsize and self.policy == "block" and not self._stuck:
                self._wait_for_room()
                self._raise_pending()  # the sink died while we waited
                if self._closing or self._error is not None:
                    self.dropped += 1
                    return
            if len(self._items) >= self.maxsize:
                self.dropped += 1
                if self.policy != "drop_oldest":
                    return
                self._items.popleft()
            self._items.append(item)
            self._cond.notify()

    def _raise_pending(self) -> None:
        """Raises, once, what the sink raised (the lock held)."""
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error

    def _wait_for_room(self) -> None:
        """block: waits (the lock held) until there is room, a close, a stop, a sink error or ``block_timeout``."""
        deadline = time.monotonic() + self.block_timeout
        while len(self._items) >= self.maxsize and not self._closing and self._error is None:
            if self.stop is not None and self.stop.is_set():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self._stuck = True
                log.warning("sink %s took more than %.1f s to take one item; dropping what does not fit until it "
                            "takes one again", self.name, self.block_timeout)
                return
            # A stop event cannot wake a Condition, so it is looked at every STOP_POLL while waiting.
            self._room.wait(min(left, STOP_POLL) if self.stop is not None else left)

    def _deliver_all(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items:
                    break  # closing, and everything queued was delivered
                method, args = self._items.popleft()
                self._stuck = False
                self._room.notify()
            try:
                getattr(self.sink, method)(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the pipeline's thread, which raises it
                with self._cond:
                    self._error = e
                    self.dropped += len(self._items)
                    self._items.clear()
                    self._room.notify_all()  # a caller waiting for room raises it instead
                break
        try:
            self.sink.close()
        except Exception:
            log.exception("sink %s: close failed", self.name)

    def close(self) -> None:
        """Delivers what is queued, closes the sink and ends the thread, waiting at most ``close_timeout``.

        Raises:
            Exception: what the sink raised, if no call has raised it yet.
        """
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
            self._room.notify_all()  # a caller waiting for room (block) returns, its item dropped
        self._thread.join(self.close_timeout)
        if self._thread.is_alive():
            with self._cond:
                self.dropped += len(self._items)
                self._items.clear()
            log.warning("sink %s did not finish within %.1f s (blocked); leaving its thread behind",
                        self.name, self.close_timeout)
        if self.dropped:
            log.warning("sink %s dropped %d items it could not keep up with (%s)", self.name, self.dropped,
                        self.policy)
        with self._cond:
            error, self._error_raised = (self._error if not self._error_raised else None), True
        if error is not None:
            raise error
