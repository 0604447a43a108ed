"""The live pipeline: sources -> capture threads -> preprocess -> one batched model call -> post-process -> ZeroMQ.

::

    source ──► CaptureThread ──► FrameBuffer ─┐
    source ──► CaptureThread ──► FrameBuffer ─┼─► newest frame of each ready stream ─► Preprocessor (once each)
    ...                                        ┘        │
                                                       ▼
            per model group: OnlineRunner (B frames, B states) or ClipRunner (ring buffers, due windows)
                                                       │                        (one batched call each)
                          StreamPostprocessor (smoothing, top-k, events) ─► sinks (Publisher, console, ...)

Streams are grouped by model: streams sharing a model are batched together, groups of different models run side by
side in the same loop. Everything after the buffers runs in the caller's thread. Each stream's capture is a
:class:`~streamtsm.capture.StreamCapture`, which picks the buffer policy (live sources skip frames rather than build
lag, files give every frame), replaces a hung reader and keeps the stream's counters; the pipeline polls it once per
loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .capture import Frame, Source, StreamCapture, StreamStatus, stream_name
from .engine.base import Engine
from .engine.clip import ClipRunner
from .engine.online import OnlineRunner, StepError
from .errors import ConfigError, SourceError
from .postprocess import ActionEvent, LatencyTracker, RateMeter, StreamPostprocessor
from .preprocess import Preprocessor
from .publish import Publisher
from .publish.schema import (
    TOPIC_EVENT,
    TOPIC_PRED,
    TOPIC_STATS,
    event_message,
    prediction_message,
    stats_message,
    topic_for,
)
from .settings import PipelineOptions
from .sinks.base import Sink, StepReport, StreamResult, wants_steps

log = logging.getLogger(__name__)

_MAX_CONSECUTIVE_STEP_ERRORS = 20


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


class _Group:
    def __init__(self, engine: Engine, clip_stride: int, key: str) -> None:
        self.engine = engine
        self.key = key  # unique among the pipeline's groups: names its stats entry and its step metric
        # Clip models get rolling windows; online ones are stepped frame by frame with their state.
        if engine.cfg.kind == "clip":
            self.runner: OnlineRunner | ClipRunner = ClipRunner(engine, clip_stride)
        else:
            self.runner = OnlineRunner(engine)
        self.model_name = engine.model_name
        self.step_latency = LatencyTracker()
        self.steps = 0
        self.batched_frames = 0

    def stats(self) -> dict:
        return {
            "model": self.model_name,
            "backend": self.engine.backend,
            "kind": self.runner.kind,
            "steps": self.steps,
            "step_p50_ms": _round(self.step_latency.percentile(50)),
            "step_p99_ms": _round(self.step_latency.percentile(99)),
            "batch_mean": _round(self.batched_frames / self.steps) if self.steps else None,
        }


class _Stream:
    """Everything the pipeline keeps for one stream."""

    def __init__(self, stream_id: str, spec: StreamSpec, group: _Group, capture: StreamCapture,
                 preprocess: Preprocessor, post: StreamPostprocessor) -> None:
        self.id = stream_id
        self.group = group
        self.spec = spec
        self.capture = capture
        self.preprocess = preprocess
        self.post = post
        self.generation = 0
        self.processed = 0
        self.step_errors = 0
        self.latency = LatencyTracker()
        self.rate = RateMeter()
        self.done = False  # reached max_frames, or its source ended and its buffer is drained
        # (index, capture time) of the newest processed frame: end-of-stream events refer to it. Not the frame
        # itself, whose image would stay alive between steps for nothing.
        self.last_seen: tuple[int, float] | None = None


class Pipeline:
    """Runs models over several sources and hands the results to sinks.

    Args:
        engine: the model backend (torch or onnxruntime) for ``streams``; for several models use
            :meth:`from_groups`.
        streams: the sources.
        sinks: where results go (see :mod:`streamtsm.sinks`): each gets every message, and each that defines
            ``on_step`` a report of every model step. A :class:`~streamtsm.publish.Publisher` among them publishes
            over ZeroMQ and its counts are the stats' ``published`` and ``publish_dropped``. With none, results are
            computed and dropped (benchmarks). The pipeline does not close them: their maker does, after the run.
        options: post-processing and run control.
    """

    def __init__(self, engine: Engine, streams: list[StreamSpec], *, sinks: Sequence[Sink] = (),
                 options: PipelineOptions | None = None) -> None:
        self._setup([ModelGroup(engine, streams)], sinks, options)

    @classmethod
    def from_groups(cls, groups: list[ModelGroup], *, sinks: Sequence[Sink] = (),
                    options: PipelineOptions | None = None) -> Pipeline:
        """A pipeline of several models, each with its streams."""
        self = cls.__new__(cls)
        self._setup(groups, sinks, options)
        return self

    def _setup(self, groups: list[ModelGroup], sinks: Sequence[Sink], options: PipelineOptions | None) -> None:
        if not any(g.streams for g in groups):
            raise ConfigError("no source given")
        self.options = options or PipelineOptions()
        self.sinks = tuple(sinks)
        self._step_sinks = [s for s in self.sinks if wants_steps(s)]
        self._publishers = [s for s in self.sinks if isinstance(s, Publisher)]
        self._notify = threading.Event()
        self._consecutive_errors = 0
        self._groups: list[_Group] = []
        self._streams: list[_Stream] = []
        ids = set()
        keys: set[str] = set()
        for g in groups:
            # Groups of one model (other weights, device or clip_stride) need distinct keys in the stats and
            # metrics: the first keeps the model's name, the later ones get "#2", "#3", ... in group order.
            key, n = g.engine.model_name, 1
            while key in keys:
                n += 1
                key = f"{g.engine.model_name}#{n}"
            keys.add(key)
            group = _Group(g.engine, g.clip_stride, key)
            self._groups.append(group)
            for spec in g.streams:
                sid = spec.name or (stream_name(spec.source) if not isinstance(spec.source, Source) else None)
                if not sid:
                    raise ConfigError("a Source object needs a stream name (StreamSpec.name)")
                if sid in ids:
                    raise ConfigError(f"two sources have the stream id {sid!r}; give them distinct names")
                ids.add(sid)
                self._streams.append(self._make_stream(sid, spec, group))

    def _make_stream(self, sid: str, spec: StreamSpec, group: _Group) -> _Stream:
        o = self.options
        capture = StreamCapture(spec.source, sid, frame_stride=effective_frame_stride(spec, group.engine),
                                realtime=o.realtime, read_timeout=o.read_timeout, backoff=o.backoff,
                                notify=self._notify)
        labels = group.engine.labels
        post = StreamPostprocessor(labels, smooth=o.smooth, topk=o.topk, threshold=o.threshold, hold=o.hold,
                                   background=[b for b in o.background if b in labels])
        preprocess = Preprocessor.for_config(group.engine.cfg, crop=spec.crop)
        return _Stream(sid, spec, group, capture, preprocess, post)

    @property
    def stream_ids(self) -> list[str]:
        return [s.id for s in self._streams]

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> Pipeline:
        """Start every capture thread and wait until each has opened its source or failed.

        Raises:
            SourceError: a source could not be opened (the other captures are stopped again).
        """
        for s in self._streams:
            s.capture.start()
        deadline = time.monotonic() + self.options.startup_timeout
        for s in self._streams:
            while s.capture.status is StreamStatus.STARTING and time.monotonic() < deadline:
                self._notify.wait(0.05)
            if s.capture.status is StreamStatus.FAILED and s.capture.error is not None and s.processed == 0:
                self.stop()
                err = s.capture.error
                raise err if isinstance(err, SourceError) else SourceError(f"{s.id}: {err}")
        return self

    def end_stream(self, stream_id: str) -> None:
        """Stop one stream's capture (e.g. a camera removed at run time); the frames already buffered are still
        processed, then the stream ends and its open action gets its offset. Thread-safe."""
        for s in self._streams:
            if s.id == stream_id:
                s.capture.stop()
                return
        raise ConfigError(f"no stream {stream_id!r}; streams: {', '.join(self.stream_ids)}")

    def stop(self) -> None:
        """Stop the captures and wait for their threads (each releases its own source)."""
        for s in self._streams:
            s.capture.stop()
        for s in self._streams:
            s.capture.join(timeout=2.0)
            if s.capture.is_alive():
                log.warning("capture thread of %s did not stop (blocked in a read); leaving it as a daemon", s.id)

    def run(self, stop: threading.Event | None = None) -> dict:
        """Process frames until every stream is done, ``duration`` passes, or ``stop`` is set.

        Returns:
            The final stats (as in the stats message).
        """
        stop = stop or threading.Event()
        started = time.monotonic()
        next_stats = started + self.options.stats_interval
        try:
            while not stop.is_set():
                now = time.monotonic()
                if self.options.duration is not None and now - started >= self.options.duration:
                    break
                if now >= next_stats:
                    self.publish_stats()
                    next_stats = now + self.options.stats_interval
                self._check_status_changes()
                # Clear before sweeping the buffers, so a frame arriving during the sweep wakes the next wait.
                self._notify.clear()
                batch = self._collect()
                if batch:
                    self._process(batch)
                elif all(s.done for s in self._streams):
                    break
                else:
                    self._notify.wait(0.05)
        finally:
            self._finish()
        return self.stats()

    # -- one iteration ------------------------------------------------------------------------------------------

    def _collect(self) -> list[tuple[_Stream, Frame]]:
        batch = []
        for s in self._streams:
            if s.done:
                continue
            frame = s.capture.pop()
            if frame is None:
                if s.capture.finished:
                    self._end_stream(s)
                continue
            batch.append((s, frame))
        return batch

    def _process(self, batch: list[tuple[_Stream, Frame]]) -> None:
        for group in self._groups:
            items = [(s, f) for s, f in batch if s.group is group]
            if items:
                self._process_group(group, items)

    def _process_group(self, group: _Group, batch: list[tuple[_Stream, Frame]]) -> None:
        size = group.engine.cfg.input_size
        frames = np.empty((len(batch), 3, size, size), np.float32)  # [B, 3, S, S]: each frame preprocessed once,
        for row, (s, f) in zip(frames, batch):  # straight into its row
            s.preprocess(f.image, out=row)
        for s, f in batch:
            if f.generation != s.generation:
                # The source reconnected: the runner resets the state; close any open action first.
                self._publish_events(s, s.post.reset(), f.index, f.timestamp)
                s.generation = f.generation
        t0 = time.perf_counter()
        try:
            results = group.runner.process([s.id for s, _ in batch], [f.generation for _, f in batch], frames)
        except StepError as e:
            self._consecutive_errors += 1
            log.error("%s (states reset; %d in a row)", e, self._consecutive_errors)
            for s, f in batch:
                if s.id in e.stream_ids:
                    s.step_errors += 1
                    self._publish_events(s, s.post.reset(), f.index, f.timestamp)
            if self._consecutive_errors >= _MAX_CONSECUTIVE_STEP_ERRORS:
                raise
            return
        self._consecutive_errors = 0
        predicted = sum(r is not None for r in results)
        ms = (time.perf_counter() - t0) * 1e3
        if predicted:
            group.step_latency.add(ms)
            group.steps += 1
            group.batched_frames += predicted
        reported: list[StreamResult] = []
        for (s, f), row in zip(batch, results):
            s.processed += 1
            s.rate.tick()
            s.last_seen = (f.index, f.timestamp)
            if row is not None:
                topk, events = s.post.process(row, f.index, f.timestamp)
                if self.sinks:
                    self._emit(topic_for(TOPIC_PRED, s.id), prediction_message(
                        stream_id=s.id, frame_index=f.index, capture_ts=f.timestamp, model=group.model_name,
                        topk=topk, generation=f.generation))
                self._publish_events(s, events, f.index, f.timestamp)
                s.latency.add((time.time() - f.timestamp) * 1e3)
                if self._step_sinks:
                    reported.append(StreamResult(s.id, f, topk))
            if self.options.max_frames is not None and s.processed >= self.options.max_frames:
                self._end_stream(s)
        if reported:
            step = StepReport(group.key, ms, tuple(reported))
            for sink in self._step_sinks:
                sink.on_step(step)

    def _emit(self, topic: str, payload: dict) -> None:
        for sink in self.sinks:
            sink.on_message(topic, payload)

    def _publish_events(self, s: _Stream, events: list[ActionEvent], frame_index: int, capture_ts: float) -> None:
        for event in events:
            self._emit(topic_for(TOPIC_EVENT, s.id), event_message(
                stream_id=s.id, model=s.group.model_name, event=event, frame_index=frame_index, capture_ts=capture_ts))

    def _end_stream(self, s: _Stream) -> None:
        if s.done:
            return
        s.done = True
        s.capture.finish()
        self._flush(s)
        s.group.runner.remove(s.id)

    def _flush(self, s: _Stream) -> None:
        """Close a stream's open action (its offset refers to the newest processed frame)."""
        events = s.post.flush()
        if events and s.last_seen is not None:
            self._publish_events(s, events, *s.last_seen)

    def _check_status_changes(self) -> None:
        changed = False
        for s in self._streams:
            if s.capture.poll():
                changed = True
                if s.capture.status is StreamStatus.FAILED:
                    self._end_stream(s)
        if changed:
            self.publish_stats()  # a stream going down or coming back is news; do not wait for the next tick

    # -- stats --------------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        streams = {}
        for s in self._streams:
            c = s.capture.stats()  # cumulative over the stream's replaced readers
            streams[s.id] = {
                "source": c["source"],
                "model": s.group.model_name,
                "group": s.group.key,  # its entry in "models" (differs from "model" for the 2nd group of a name)
                "status": c["status"],
                "fps": round(s.rate.rate(), 2),
                "capture_fps": round(c["fps"], 2),
                "frames": s.processed,
                "captured": c["frames_read"],
                **{key: c[key] for key in ("dropped", "skipped", "bad_frames", "reconnects", "generation", "stalled")},
                "step_errors": s.step_errors,
                "latency_p50_ms": _round(s.latency.percentile(50)),
                "latency_p99_ms": _round(s.latency.percentile(99)),
                "last_error": c["last_error"],
            }
        return {
            "streams": streams,
            "models": {g.key: g.stats() for g in self._groups},
            "published": sum(p.sent for p in self._publishers),
            "publish_dropped": sum(p.dropped for p in self._publishers),
        }

    def publish_stats(self) -> None:
        if not self.sinks:
            return
        st = self.stats()
        streams = st.pop("streams")
        self._emit(TOPIC_STATS, stats_message(streams=streams, extra=st))

    def _finish(self) -> None:
        for s in self._streams:
            if not s.done:
                self._flush(s)
        self.stop()
        self.publish_stats()


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)
