"""What the pipeline is given (a :class:`StreamSpec` per source, a :class:`ModelGroup` per model) and what it keeps
while it runs (a :class:`StreamState` per stream, a :class:`GroupState` per model, each with its own figures for the
stats message, and a :class:`GroupLane` per model and lane: the runner of the group's streams in that lane)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .capture import Source, StreamCapture
from .engine.base import Engine
from .engine.clip import ClipRunner
from .engine.online import OnlineRunner
from .postprocess import LatencyTracker, RateMeter, StreamPostprocessor
from .preprocess import Preprocessor


@dataclass
class StreamSpec:
    """One source of the pipeline.

    Attributes:
        source: camera index, path, URL, image-sequence pattern, ``"synthetic[:WxH@FPS]"``, a
            :class:`~streamtsm.capture.Source` object (not opened yet), or a function returning a new one. A
            source given as an object cannot be replaced when its read hangs; the others can (see
            :class:`~streamtsm.capture.StreamCapture`).
        name: stream id (derived from the source when None); used in topics.
        frame_stride: process every k-th frame; None takes the model's: an online model trained on every k-th frame
            (``cfg.frame_interval`` = k) must be fed every k-th frame live too, or every motion looks k times slower
            to it. Clip models sample their windows with ``frame_interval`` from every frame, so they default to 1.
        crop: optional ``(x, y, w, h)`` region of the frame to look at.
    """

    source: str | int | Source | Callable[[], Source]
    name: str | None = None
    frame_stride: int | None = None
    crop: tuple[int, int, int, int] | None = None


def effective_frame_stride(spec: StreamSpec, engine: Engine) -> int:
    """The stride a stream is captured with: its own, else its online model's ``frame_interval``, else 1."""
    if spec.frame_stride is not None:
        return spec.frame_stride
    return 1 if engine.cfg.kind == "clip" else max(1, int(engine.cfg.frame_interval))


@dataclass
class ModelGroup:
    """Streams that share one model (and so one batched call per step).

    Attributes:
        engine: an online engine (a prediction per frame) or a clip engine (rolling windows).
        streams: the group's sources.
        clip_stride: for clip engines, predict every this many frames per stream.
    """

    engine: Engine
    streams: list[StreamSpec]
    clip_stride: int = 1


class GroupState:
    """A model group at run time: its model and its step figures (over every lane that runs its streams).

    Args:
        engine: the group's model.
        clip_stride: for a clip model, predict every this many frames per stream.
        key: unique among the pipeline's groups: names its stats entry and its step metric.
    """

    def __init__(self, engine: Engine, clip_stride: int, key: str) -> None:
        self.engine = engine
        self.clip_stride = clip_stride
        self.key = key
        self.kind = engine.cfg.kind  # "online" or "clip", as the stats' "models" say
        self.model_name = engine.model_name
        self.step_latency = LatencyTracker()
        self.steps = 0
        self.batched_frames = 0

    def record_step(self, ms: float, predicted: int) -> None:
        """Count a batched call that predicted ``predicted`` streams and took ``ms`` milliseconds."""
        self.step_latency.add(ms)
        self.steps += 1
        self.batched_frames += predicted

    def stats(self) -> dict:
        """The group's entry in the stats message's ``models``."""
        p50, p99 = self.step_latency.percentiles((50, 99))
        return {
            "model": self.model_name,
            "backend": self.engine.backend,
            "kind": self.kind,
            "steps": self.steps,
            "step_p50_ms": rounded(p50),
            "step_p99_ms": rounded(p99),
            "batch_mean": rounded(self.batched_frames / self.steps) if self.steps else None,
        }


class GroupLane:
    """A model group's streams in one lane (see :mod:`streamtsm.pipeline`): the runner that keeps their states
    (online) or frame rings (clip) and steps them in one batched call, and that call's input array."""

    def __init__(self, group: GroupState) -> None:
        self.group = group
        # Clip models get rolling windows; online ones are stepped frame by frame with their state.
        if group.kind == "clip":
            self.runner: OnlineRunner | ClipRunner = ClipRunner(group.engine, group.clip_stride)
        else:
            self.runner = OnlineRunner(group.engine)
        self._rows: np.ndarray | None = None

    def batch_rows(self, batch: int) -> np.ndarray:
        """The first ``batch`` rows of the input array ``[B, 3, S, S]`` float32, kept between steps: a fresh array of
        a few megabytes per step would be new pages for the system to map every time. The runners copy what they
        keep (the clip rings), so reusing it is safe."""
        if self._rows is None or len(self._rows) < batch:
            size = self.group.engine.cfg.input_size
            self._rows = np.empty((batch, 3, size, size), np.float32)
        return self._rows[:batch]


class StreamState:
    """Everything the pipeline keeps for one stream: its capture, preprocessing, post-processing and figures."""

    def __init__(self, stream_id: str, spec: StreamSpec, group_lane: GroupLane, capture: StreamCapture,
                 preprocess: Preprocessor, post: StreamPostprocessor) -> None:
        self.id = stream_id
        self.group_lane = group_lane  # its group's runner in the lane that steps it
        self.group = group_lane.group
        self.spec = spec
        self.capture = capture
        self.preprocess = preprocess
        self.post = post
        self.generation = 0
        self.processed = 0
        self.step_errors = 0
        self.nonfinite = 0  # model outputs holding NaN or infinity (skipped, state reset)
        self.latency = LatencyTracker()
        self.rate = RateMeter()
        self.done = False  # reached max_frames, or its source ended and its buffer is drained
        # (index, capture time, media time) of the newest processed frame: end-of-stream events refer to it. Not
        # the frame itself, whose image would stay alive between steps for nothing.
        self.last_seen: tuple[int, float, float | None] | None = None

    def stats(self) -> dict:
        """The stream's entry in the stats message's ``streams``."""
        c = self.capture.stats()  # cumulative over the stream's replaced readers
        p50, p99 = self.latency.percentiles((50, 99))
        return {
            "source": c["source"],
            "model": self.group.model_name,
            "group": self.group.key,  # its entry in "models" (differs from "model" for the 2nd group of a name)
            "status": c["status"],
            "fps": round(self.rate.rate(), 2),
            "capture_fps": round(c["fps"], 2),
            "frames": self.processed,
            "captured": c["frames_read"],
            **{key: c[key] for key in ("dropped", "skipped", "bad_frames", "reconnects", "generation", "stalled")},
            "step_errors": self.step_errors,
            "missing_frames": c["missing_frames"],  # frames a file or image sequence failed to deliver
            "nonfinite": self.nonfinite,
            "latency_p50_ms": rounded(p50),
            "latency_p99_ms": rounded(p99),
            "last_error": c["last_error"],
        }


def rounded(value: float | None, digits: int = 2) -> float | None:
    """``value`` rounded for a stats message; None stays None (nothing measured yet)."""
    return None if value is None else round(value, digits)
