"""The ``--show`` window: each stream's frames with its top predictions drawn on; q or Esc quits."""

from __future__ import annotations

import threading

import cv2

from .capture import Frame
from .errors import ConfigError


class Display:
    """An ``on_result`` callback for :class:`streamtsm.pipeline.Pipeline` (runs in the pipeline's thread)."""

    def __init__(self, stop: threading.Event, lines: int = 3) -> None:
        self.stop = stop
        self.lines = lines

    def __call__(self, stream_id: str, frame: Frame, topk: list[tuple[str, float]]) -> None:
        image = frame.image.copy()
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
