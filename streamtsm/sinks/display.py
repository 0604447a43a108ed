"""The ``--show`` window: each stream's frames with its top predictions drawn on; q or Esc quits the run.

A window can block (a compositor that stalls, a window being dragged), so :func:`display_sink` runs it behind a
:class:`~streamtsm.sinks.base.QueuedSink`: OpenCV's window calls all happen on that sink's thread, and a window that
falls behind loses its oldest frames, never a model step.
"""

from __future__ import annotations

import threading

import cv2

from streamtsm.errors import ConfigError
from streamtsm.sinks.base import QueuedSink, StepReport


class Display:
    """Draws each stream's newest frame with its top-k into a window of its own; q or Esc sets ``stop``.

    Args:
        stop: the run's stop event.
        lines: how many of the top-k to draw.
    """

    def __init__(self, stop: threading.Event, lines: int = 3) -> None:
        self.stop = stop
        self.lines = lines

    def on_message(self, topic: str, payload: dict) -> None:
        pass

    def on_step(self, step: StepReport) -> None:
        for result in step.results:
            self.show(result.stream_id, result.frame.image, result.topk)

    def show(self, stream_id: str, image, topk: list[tuple[str, float]]) -> None:
        """Draws ``topk`` on a copy of ``image`` (BGR) and shows it in the stream's window.

        Raises:
            ConfigError: If OpenCV cannot open a window (no display).
        """
        image = image.copy()
        for i, (label, score) in enumerate(topk[: self.lines]):
            text = f"{label} {score:.2f}"
            y = 24 + 22 * i
            cv2.putText(image, text, (9, y + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(image, text, (8, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
        try:
            cv2.imshow(f"streamtsm {stream_id}", image)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error as e:
            raise ConfigError(f"--show needs a display OpenCV can open windows on ({str(e).strip()[:80]})") from None
        if key in (ord("q"), 27):
            self.stop.set()

    def close(self) -> None:
        try:
            cv2.destroyAllWindows()
        except cv2.error:
            pass


def display_sink(stop: threading.Event, maxsize: int = 2) -> QueuedSink:
    """The ``--show`` window as a sink: a :class:`Display` on its own thread, keeping the newest ``maxsize`` steps
    (``drop_oldest``) and no messages."""
    return QueuedSink(Display(stop), maxsize=maxsize, policy="drop_oldest", messages=False, name="display")
