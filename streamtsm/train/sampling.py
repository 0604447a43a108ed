"""Which frames of a video make a clip (:class:`SegmentSampler`, TSN/TSM; :class:`DenseSampler`, clip models such as
X3D)::

    segments, train    |--x-----|-----x--|---x----|   one frame at a random offset in each of T segments
    segments, test     |---x----|---x----|---x----|   the centre of each segment (twice_sample: and its start)
    dense              ....x.x.x.x.x.x.x.x.......     clip_len frames every frame_interval, random start when
                                                      training, centred when testing
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import window_span
from ..errors import ConfigError

SHORT_VIDEO_POLICIES = ("loop", "repeat_last")


def _fit_short(indices: np.ndarray, num_frames: int, policy: str) -> np.ndarray:
    if policy == "loop":
        return indices % num_frames
    return np.minimum(indices, num_frames - 1)


@dataclass(frozen=True)
class SegmentSampler:
    """TSN/TSM sampling: one frame from each of ``num_segments`` equal segments of the video.

    Training takes a random offset within each segment; testing takes the centre (with ``num_clips`` > 1, the
    offsets ``(k + 0.5) / num_clips`` of each segment, k = 0..num_clips-1), and ``twice_sample`` adds the start of
    each segment (TSM's twice sampling: 2x the clips). A video shorter than ``num_segments`` frames is looped or
    its last frame repeated (``short``).
    """

    num_segments: int
    num_clips: int = 1
    twice_sample: bool = False
    short: str = "loop"

    def __post_init__(self) -> None:
        if self.num_segments < 1 or self.num_clips < 1:
            raise ConfigError(f"num_segments and num_clips must be >= 1, got {self.num_segments}, {self.num_clips}")
        if self.short not in SHORT_VIDEO_POLICIES:
            raise ConfigError(f"short-video policy must be one of {SHORT_VIDEO_POLICIES}, got {self.short!r}")

    @property
    def frames_per_clip(self) -> int:
        return self.num_segments

    def describe(self) -> dict:
        """The sampling, as reports and checkpoints record it."""
        return {"kind": "segments", "num_segments": self.num_segments}

    def views(self, test: bool) -> int:
        return self.num_clips * (2 if self.twice_sample else 1) if test else 1

    def __call__(self, num_frames: int, train: bool, rng: np.random.Generator) -> list[np.ndarray]:
        """Frame indices of each temporal view: one array of ``num_segments`` indices per clip."""
        t = self.num_segments
        if num_frames < t:
            return [_fit_short(np.arange(t), num_frames, self.short)] * self.views(not train)
        tick = num_frames / t
        if train:
            starts = (np.arange(t) * tick).astype(np.int64)
            ends = (np.arange(1, t + 1) * tick).astype(np.int64)
            return [starts + rng.integers(0, np.maximum(ends - starts, 1))]
        offsets = [(k + 0.5) / self.num_clips for k in range(self.num_clips)]
        if self.twice_sample:
            offsets += [k / self.num_clips for k in range(self.num_clips)]
        return [np.minimum((tick * (np.arange(t) + o)).astype(np.int64), num_frames - 1) for o in offsets]


@dataclass(frozen=True)
class DenseSampler:
    """Dense clips for clip models: ``clip_len`` frames every ``frame_interval`` frames.

    Training starts at a random frame; testing centres the clip (``num_clips`` > 1: clips spread evenly over the
    video, as mmaction2's SampleFrames test mode). Clips running past the end loop or repeat the last frame.
    """

    clip_len: int
    frame_interval: int = 1
    num_clips: int = 1
    short: str = "loop"

    def __post_init__(self) -> None:
        if self.clip_len < 1 or self.frame_interval < 1 or self.num_clips < 1:
            raise ConfigError("clip_len, frame_interval and num_clips must be >= 1, got "
                              f"{self.clip_len}, {self.frame_interval}, {self.num_clips}")
        if self.short not in SHORT_VIDEO_POLICIES:
            raise ConfigError(f"short-video policy must be one of {SHORT_VIDEO_POLICIES}, got {self.short!r}")

    @property
    def frames_per_clip(self) -> int:
        return self.clip_len

    def describe(self) -> dict:
        """The sampling, as reports and checkpoints record it."""
        return {"kind": "dense", "clip_len": self.clip_len, "frame_interval": self.frame_interval}

    def views(self, test: bool) -> int:
        return self.num_clips if test else 1

    def __call__(self, num_frames: int, train: bool, rng: np.random.Generator) -> list[np.ndarray]:
        span = window_span(self.clip_len, self.frame_interval)
        steps = np.arange(self.clip_len) * self.frame_interval
        room = max(num_frames - span, 0)
        if train:
            starts = [int(rng.integers(0, room + 1))]
        elif self.num_clips == 1:
            starts = [room // 2]
        else:
            interval = (room + 1) / self.num_clips
            starts = [int(interval / 2 + interval * k) for k in range(self.num_clips)]
        return [_fit_short(s + steps, num_frames, self.short) for s in starts]


Sampler = SegmentSampler | DenseSampler


def sampler_for(model, *, train: bool = True, num_clips: int = 1, twice_sample: bool = False,
                short: str = "loop", sampling: str = "auto", clip_len: int | None = None,
                frame_interval: int | None = None) -> Sampler:
    """The sampler a model was built for.

    ``sampling="auto"``: dense clips for clip models without segments (X3D, UniFormer: ``cfg.kind == "clip"`` and
    no ``num_segments`` attribute), TSN segments otherwise. ``"dense"`` on a TSM model takes ``num_segments``
    consecutive frames (every ``frame_interval``-th), the frames a live camera feeds the online model.
    """
    cfg = model.cfg
    segments = getattr(model, "num_segments", None)
    if sampling == "auto":
        sampling = "dense" if cfg.kind == "clip" and segments is None else "segments"
    if sampling == "segments":
        if segments is None:
            raise ConfigError(f"{cfg.name} has no num_segments; sample it with dense clips")
        return SegmentSampler(segments, num_clips if not train else 1, twice_sample and not train, short)
    if sampling == "dense":
        length = clip_len or segments or cfg.clip_len
        if segments is not None and clip_len is not None and clip_len != segments:
            raise ConfigError(f"{cfg.name} takes clips of num_segments={segments} frames, got clip_len={clip_len}")
        return DenseSampler(length, frame_interval or cfg.frame_interval, num_clips if not train else 1, short)
    raise ConfigError(f"sampling must be auto, segments or dense, got {sampling!r}")
