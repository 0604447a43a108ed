"""What `streamtsm run` prints while it runs: events as they happen, each stream's top-1 about once a second."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from streamtsm.publish.subscriber import format_message


class ConsoleSink:
    """A sink that prints messages as readable lines, throttling predictions per stream.

    Printing to a terminal or a pipe that is read keeps up, so it runs inline in the pipeline's thread.
    """

    def __init__(self, out: TextIO | None = None, prediction_interval: float = 1.0, quiet: bool = False) -> None:
        self.out = out  # None: whatever sys.stdout is at print time
        self.interval = prediction_interval
        self.quiet = quiet
        self._last: dict[str, float] = {}

    def on_message(self, topic: str, payload: dict) -> None:
        if self.quiet:
            return
        kind = payload.get("type")
        if kind == "pred":
            now = time.monotonic()
            if now - self._last.get(payload["stream"], -1e9) < self.interval:
                return
            self._last[payload["stream"]] = now
        elif kind == "stats":
            return
        print(format_message(topic, payload), file=self.out or sys.stdout, flush=True)

    def close(self) -> None:
        pass
