"""The rolling-window runner for clip models (X3D, UniFormer, offline TSM, TIN, Non-local TSM).

Each stream keeps a ring buffer of its last preprocessed frames, so a frame is preprocessed once however many
windows it appears in. Every ``clip_stride`` frames a stream is due: its window (``clip_len`` frames spaced
``frame_interval`` apart, ending at the newest) is taken from the ring, and the windows of all due streams go
through one batched ``predict`` call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError
from .base import ClipEngine
from .online import StepError


class FrameRing:
    """The last ``capacity`` preprocessed frames ``[3, S, S]`` of one stream."""

    def __init__(self, capacity: int, frame_shape: tuple[int, ...]) -> None:
        self.frames = np.zeros((capacity, *frame_shape), np.float32)
        self.capacity = capacity
        self.count = 0  # frames pushed since the last reset

    def push(self, frame: np.ndarray) -> None:
        self.frames[self.count % self.capacity] = frame
        self.count += 1

    def window(self, clip_len: int, interval: int) -> np.ndarray:
        """The newest ``clip_len`` frames ``interval`` apart, oldest first: ``[clip_len, 3, S, S]``."""
        newest = self.count - 1
        idx = [(newest - interval * (clip_len - 1 - j)) % self.capacity for j in range(clip_len)]
        return self.frames[idx]

    def reset(self) -> None:
        self.count = 0


class ClipRunner:
    """Keeps a ring per stream for a :class:`ClipEngine` and predicts the streams that are due.

    Args:
        engine: the clip model.
        clip_stride: predict every this many frames per stream (1: every frame).
    """

    kind = "clip"  # the model kind it runs, as in ModelConfig.kind and the stats' "models"

    def __init__(self, engine: ClipEngine, clip_stride: int = 1) -> None:
        if clip_stride < 1:
            raise ConfigError(f"clip_stride must be >= 1, got {clip_stride}")
        self.engine = engine
        self.clip_len = engine.cfg.clip_len
        self.interval = engine.cfg.frame_interval
        self.clip_stride = clip_stride
        self.window_span = engine.cfg.window_span
        self._rings: dict[str, FrameRing] = {}
        self._generation: dict[str, int] = {}
        self._since: dict[str, int] = {}  # frames since the stream's last prediction

    def remove(self, stream_id: str) -> None:
        for d in (self._rings, self._generation, self._since):
            d.pop(stream_id, None)

    def reset(self, stream_id: str) -> None:
        if stream_id in self._rings:
            self._rings[stream_id].reset()
        self._since[stream_id] = 0

    def window_of(self, stream_id: str) -> np.ndarray | None:
        """The stream's newest window ``[clip_len, 3, S, S]`` (what its next prediction would classify), None until
        its ring holds a full window."""
        ring = self._rings.get(stream_id)
        if ring is None or ring.count < self.window_span:
            return None
        return ring.window(self.clip_len, self.interval)

    def process(self, stream_ids: Sequence[str], generations: Sequence[int],
                frames: np.ndarray) -> list[np.ndarray | None]:
        """Push one frame of each stream; return logits ``[K]`` for the streams predicted now, None for the others.

        A stream predicts once its ring holds a full window and ``clip_stride`` frames have passed since its last
        prediction (so its first prediction comes after ``window_span`` frames).
        """
        due = []
        for i, (sid, gen) in enumerate(zip(stream_ids, generations)):
            ring = self._rings.get(sid)
            if ring is None:
                ring = self._rings[sid] = FrameRing(self.window_span, frames.shape[1:])
                self._since[sid] = 0
            if self._generation.get(sid) != gen:
                self._generation[sid] = gen
                self.reset(sid)  # a reconnected source: do not mix frames from before and after the gap
            ring.push(frames[i])
            self._since[sid] += 1
            if ring.count >= self.window_span and self._since[sid] >= self.clip_stride:
                due.append(i)
        out: list[np.ndarray | None] = [None] * len(stream_ids)
        if not due:
            return out
        clips = np.stack([self.window_of(stream_ids[i]) for i in due])
        try:
            logits = self.engine.predict(clips)  # [D, K]
        except Exception as e:
            for i in due:
                self.reset(stream_ids[i])
            raise StepError([stream_ids[i] for i in due], e) from e
        for row, i in zip(logits, due):
            out[i] = row
            self._since[stream_ids[i]] = 0
        return out
