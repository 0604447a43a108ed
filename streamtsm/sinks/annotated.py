"""The front of every sink that shows or keeps annotated frames (the ``--show`` window, the ``--output`` video).

Drawing a frame (a copy, a blend, text) and showing or encoding it take milliseconds, so they run behind a
:class:`~streamtsm.sinks.base.QueuedSink`. What the overlay draws, though, comes from the messages, and a message
lost to a full queue would be a lasting error (a lost offset leaves an action highlighted forever). So the messages
never enter the queue: :class:`AnnotatingSink` keeps a :class:`~streamtsm.overlay.ViewTracker` in the pipeline's
thread (a few dictionary updates per message) and queues each predicted frame together with a copy of its stream's
view taken at that moment; the frame is then drawn exactly as things stood when it was predicted, however far
behind the queue's thread runs::

    Pipeline ─on_message─► ViewTracker (inline)
             ─on_step────► one ViewedFrame per stream (frame + its view) ══ bounded queue ══► thread ──► target
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from streamtsm.overlay import StreamView, ViewTracker
from streamtsm.sinks.base import QueuedSink, StepReport, StreamResult


@dataclass(frozen=True)
class ViewedFrame:
    """One stream's predicted frame and its view when it was predicted: what a drawing sink receives.

    Attributes:
        result: The stream's prediction in its model step (its ``frame`` holds the image as captured).
        view: The stream's view right after that prediction's messages.
    """

    result: StreamResult
    view: StreamView


class AnnotatingSink:
    """Hands each predicted frame, with its stream's view, to ``target`` on a thread of its own.

    ``target`` defines ``on_step(item: ViewedFrame)`` and ``close()``; it runs behind a ``QueuedSink`` of
    ``maxsize`` frames (each stream's frame is one item) whose ``policy`` says what is lost when it is full.

    Args:
        target: the drawing sink.
        maxsize: frames the queue holds.
        policy: ``drop_oldest`` (a live view wants the newest frame), ``drop_newest`` (a file keeps order) or
            ``block`` (nothing lost: the caller waits; for file sources).
        close_timeout: seconds ``close()`` waits for the target to finish what is queued.
        name: names the thread and the log lines.
        stop: the run's stop event (``block``: a wait for room ends when it is set).

    Attributes:
        tracker: the views, fed by every message.
    """

    def __init__(self, target, *, maxsize: int, policy: str, close_timeout: float = 2.0, name: str,
                 stop: threading.Event | None = None) -> None:
        self.tracker = ViewTracker()
        self.target = target
        self._queue = QueuedSink(target, maxsize=maxsize, policy=policy, messages=False, close_timeout=close_timeout,
                                 name=name, stop=stop)

    @property
    def policy(self) -> str:
        """What the queue does when it is full (see :class:`~streamtsm.sinks.base.QueuedSink`)."""
        return self._queue.policy

    @property
    def dropped(self) -> int:
        """Frames given to this sink that the target never received."""
        return self._queue.dropped

    def on_message(self, topic: str, payload: dict) -> None:
        self.tracker.on_message(topic, payload)

    def on_step(self, step: StepReport) -> None:
        for result in step.results:
            # QueuedSink hands on what it is given: here a ViewedFrame, which the target's on_step expects.
            self._queue.on_step(ViewedFrame(result, self.tracker.view(result.stream_id)))

    def close(self) -> None:
        """Lets the target finish what is queued and close (see ``QueuedSink.close``)."""
        self._queue.close()
