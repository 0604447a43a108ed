"""The live pipeline: sources -> capture threads -> preprocess -> batched model calls -> post-process -> ZeroMQ.

::

    source ──► StreamCapture (thread: read, Preprocessor; buffer) ─┐
    source ──► StreamCapture (thread: read, Preprocessor; buffer) ─┼─► its lane: the next frame of each stream
    ...                                                             ┘        │ (its tensor copied into the batch)
                                                                            ▼
            per model group: OnlineRunner (B frames, B states) or ClipRunner (ring buffers, due windows)
                                                         │                      (one batched call each)
            StreamPostprocessor (smoothing, top-k, typed events) ─► Fanout ─► sinks (Publisher, console, ...)

Streams are grouped by model: streams sharing a model are batched together, groups of different models run side by side
in the same loop. Each live source's capture thread preprocesses its frames for its stream's group (``Frame.tensor``),
so the per-frame resize and normalization run beside the model step rather than before it. Each stream's capture is a
:class:`~streamtsm.capture.StreamCapture`, which picks the buffer policy (live sources hold at most ``live_buffer``
frames and drop the oldest rather than build lag, files give every frame), replaces a hung reader and keeps the
stream's counters; its lane polls it once per loop.

The streams are dealt to ``lanes``: a lane is a thread that runs the loop above (collect, step, post-process, hand
to the sinks) for its own streams, with its own runners and batches, so the lanes' model steps run side by side on
the machine's cores and never wait for each other. The first lane runs in the caller's thread, which also publishes
the periodic stats; the lanes share the sinks and the figures under one lock, taken after each model step, never
during one. A Publisher made with ``background=True`` sends on a thread of its own.

Why lanes rather than one batch split in parts run at once: a split step ends when its slowest part does, and on a
2-core machine whose capture threads preempt the parts, a stretched step collects a larger next batch, which
stretches the next step again; lanes do not wait for each other (docs/benchmarks.md, "Live streams per process",
compares 8 streams in one lane and in two, and "Lanes against split steps" the step split in parts it replaced).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .capture import Frame, Source, StreamCapture, StreamStatus, stream_name
from .engine.base import Engine
from .engine.online import StepError
from .errors import ConfigError, SourceError
from .postprocess import ActionEvent, StreamPostprocessor
from .preprocess import Preprocessor
from .settings import PipelineOptions
from .sinks.base import Sink, StepReport, StreamResult
from .sinks.fanout import Fanout
from .streams import GroupLane, GroupState, ModelGroup, StreamSpec, StreamState, effective_frame_stride

__all__ = ["ModelGroup", "Pipeline", "PipelineOptions", "StreamSpec", "default_lanes", "effective_frame_stride"]

log = logging.getLogger(__name__)

_MAX_CONSECUTIVE_STEP_ERRORS = 20
# Seconds stop() waits for all capture threads together; one still alive then is blocked in a decoder.
STOP_WAIT_S = 0.5


def default_lanes() -> int:
    """2 on a 2-core machine, 1 elsewhere.

    On 2 cores a model gets one intra-op thread (``default_threads``: the other core is the capture threads'), so
    one lane's steps use one core however many streams wait; a second lane uses the other core whenever capture
    leaves it idle. With more cores the intra-op threads already have cores of their own.
    """
    return 2 if (os.cpu_count() or 1) == 2 else 1


class Lane:
    """Some of the pipeline's streams, stepped by one thread: their runners (one per model group) and the event
    their capture threads set when a frame arrives."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.notify = threading.Event()
        self.streams: list[StreamState] = []
        self.groups: dict[str, GroupLane] = {}  # group key -> its runner here
        self.consecutive_errors = 0
        self.done = threading.Event()  # its loop has ended

    def group_lane(self, group: GroupState) -> GroupLane:
        if group.key not in self.groups:
            self.groups[group.key] = GroupLane(group)
        return self.groups[group.key]


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
            With several lanes they are called from several threads, one call at a time.
        options: post-processing and run control; ``options.lanes`` threads step the streams (None:
            :func:`default_lanes`, 1 when a model does not compute on this machine's CPU).

    Raises:
        ConfigError: no source, two sources with one stream id, or lanes asked for a model that computes elsewhere.
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
        self._out = Fanout(sinks)
        self.sinks = self._out.sinks
        self._started = False
        # Sinks and figures are shared by the lanes: each takes this after its model step to hand out the results.
        self._lock = threading.RLock()
        self._groups: list[GroupState] = []
        self._streams: list[StreamState] = []
        lanes = self._lane_count(groups)
        self._lanes = [Lane(i) for i in range(lanes)]
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
            group = GroupState(g.engine, g.clip_stride, key)
            self._groups.append(group)
            for spec in g.streams:
                sid = spec.name or (stream_name(spec.source) if not isinstance(spec.source, Source) else None)
                if not sid:
                    raise ConfigError("a Source object needs a stream name (StreamSpec.name)")
                if sid in ids:
                    raise ConfigError(f"two sources have the stream id {sid!r}; give them distinct names")
                ids.add(sid)
                # Dealt in turn over every group's streams, so the lanes get as many streams each as can be.
                lane = self._lanes[len(self._streams) % lanes]
                stream = self._make_stream(sid, spec, group, lane)
                lane.streams.append(stream)
                self._streams.append(stream)

    def _lane_count(self, groups: list[ModelGroup]) -> int:
        streams = sum(len(g.streams) for g in groups)
        elsewhere = [g.engine for g in groups if g.streams and not g.engine.host_cpu]
        asked = self.options.lanes
        if asked is None:
            return 1 if elsewhere else min(default_lanes(), streams)
        if asked > 1 and elsewhere:
            where = elsewhere[0]
            raise ConfigError(f"--lanes {asked}: lanes step models on this machine's CPU cores side by side; "
                              f"{where.model_name} runs on {where.backend} elsewhere (a GPU or a server), which "
                              "takes each batch whole (drop --lanes)")
        return min(asked, streams)

    @property
    def lanes(self) -> int:
        """Threads stepping the streams (see the module doc)."""
        return len(self._lanes)

    def _make_stream(self, sid: str, spec: StreamSpec, group: GroupState, lane: Lane) -> StreamState:
        o = self.options
        labels = group.engine.labels
        post = StreamPostprocessor(labels, smooth=o.smooth, topk=o.topk, threshold=o.threshold, hold=o.hold,
                                   background=[b for b in o.background if b in labels])
        # The stream's group decides its preprocessing (input size, crop): the capture thread runs it on every frame
        # it keeps, so the model's thread only copies rows into the batch.
        preprocess = Preprocessor.for_config(group.engine.cfg, crop=spec.crop)
        # A live source that is down at start is retried (status "connecting"); start() decides how long to wait.
        capture = StreamCapture(spec.source, sid, frame_stride=effective_frame_stride(spec, group.engine),
                                realtime=o.realtime, read_timeout=o.read_timeout, backoff=o.backoff,
                                notify=lane.notify, retry_open=True, preprocess=preprocess,
                                live_buffer=o.live_buffer)
        return StreamState(sid, spec, lane.group_lane(group), capture, preprocess, post)

    @property
    def stream_ids(self) -> list[str]:
        return [s.id for s in self._streams]

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self, stop: threading.Event | None = None) -> Pipeline:
        """Start every capture thread and wait until each has opened its source, failed, or is being retried.

        A source that cannot be opened is an error when it is a file (a typo). A live one (a camera, a URL) may be
        down only for now: with several sources it is retried with back-off (status ``connecting``) while the
        others run, and joins when it comes up; a single source is waited for up to ``startup_timeout`` seconds,
        then it is an error, unless ``keep_trying``. ``stop`` (the run's stop event) ends the wait at once: a stop
        while a source opens is prompt, and :meth:`run` then ends at once and closes everything.

        Raises:
            SourceError: a source could not be opened (the other captures are stopped again).
        """
        self._started = True
        for s in self._streams:
            s.capture.start()
        deadline = time.monotonic() + self.options.startup_timeout
        alone = len(self._streams) == 1 and not self.options.keep_trying
        waiting = (StreamStatus.STARTING, StreamStatus.CONNECTING) if alone else (StreamStatus.STARTING,)
        for lane in self._lanes:
            for s in lane.streams:
                if not self._wait_open(s, lane, waiting, deadline, alone, stop):
                    return self
        return self

    def _wait_open(self, s: StreamState, lane: Lane, waiting: tuple[StreamStatus, ...], deadline: float, alone: bool,
                   stop: threading.Event | None) -> bool:
        """Wait for one stream's source (see :meth:`start`); False when ``stop`` was set meanwhile."""
        while s.capture.status in waiting and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return False
            lane.notify.wait(0.05)
        status = s.capture.status
        if status is StreamStatus.FAILED and s.capture.error is not None and s.processed == 0:
            self.stop()
            err = s.capture.error
            raise err if isinstance(err, SourceError) else SourceError(f"{s.id}: {err}")
        if status is StreamStatus.CONNECTING:
            reason = s.capture.stats()["last_error"]
            if alone:
                self.stop()
                raise SourceError(f"{reason} (still not open after {self.options.startup_timeout:g} s; "
                                  "--keep-trying waits for it)")
            log.warning("stream %s: cannot open its source yet (%s); retrying with back-off while the other "
                        "streams run", s.id, reason)
        return True

    @property
    def blocked_streams(self) -> list[str]:
        """Streams whose capture thread is still alive after :meth:`stop`: blocked inside a decoder call that
        cannot be interrupted (a stalled network camera). Their threads are daemons; a process should end without
        the interpreter's clean-up, which would tear the decoder down under them."""
        return [s.id for s in self._streams if s.capture.blocked()]

    def end_stream(self, stream_id: str) -> None:
        """Stop one stream's capture (e.g. a camera removed at run time); the frames already buffered are still
        processed, then the stream ends and its open action gets its offset. Thread-safe."""
        for s in self._streams:
            if s.id == stream_id:
                s.capture.stop()
                return
        raise ConfigError(f"no stream {stream_id!r}; streams: {', '.join(self.stream_ids)}")

    def stop(self) -> None:
        """Stop the captures and wait for their threads (each releases its own source), all of them together for at
        most ``STOP_WAIT_S``: a thread that is reading returns within a frame period, one blocked in a decoder may
        never return, and a stop must stay prompt however many streams there are."""
        for s in self._streams:
            s.capture.stop()
        deadline = time.monotonic() + STOP_WAIT_S
        for s in self._streams:
            s.capture.join(timeout=max(0.0, deadline - time.monotonic()))
            if s.capture.is_alive():
                log.warning("capture thread of %s did not stop (blocked in a read); leaving it as a daemon", s.id)

    def run(self, stop: threading.Event | None = None) -> dict:
        """Process frames until every stream is done, ``duration`` passes, or ``stop`` is set; starts the captures
        first (:meth:`start`) when they were not started.

        Returns:
            The final stats (as in the stats message).

        Raises:
            SourceError: as :meth:`start`, when it starts them.
        """
        stop = stop or threading.Event()
        if not self._started:
            self.start(stop)
        started = time.monotonic()
        until = None if self.options.duration is None else started + self.options.duration
        halt = threading.Event()  # ends the other lanes: this one ended, or one of them failed
        errors: list[BaseException] = []

        def lane_thread(lane: Lane) -> None:
            try:
                self._run_lane(lane, stop, halt, until)
            except BaseException as e:  # noqa: BLE001 (raised again by run(), in the caller's thread)
                errors.append(e)
                halt.set()

        others = [threading.Thread(target=lane_thread, args=(lane,), name=f"lane-{lane.index + 1}", daemon=True)
                  for lane in self._lanes[1:]]
        try:
            for t in others:
                t.start()
            self._run_lane(self._lanes[0], stop, halt, until, next_stats=started + self.options.stats_interval)
        finally:
            halt.set()
            for t in others:
                t.join()  # each ends within a step and a 50 ms wait
            self._finish()
        if errors:
            raise errors[0]
        return self.stats()

    # -- one lane -----------------------------------------------------------------------------------------------

    def _run_lane(self, lane: Lane, stop: threading.Event, halt: threading.Event, until: float | None,
                  next_stats: float | None = None) -> None:
        """The loop of one lane until ``until``, ``stop`` (the run's) or ``halt`` (the lanes'), or the end of its
        streams; with ``next_stats`` (the first lane) it also publishes the stats every interval, until every lane
        has ended."""
        try:
            while not (stop.is_set() or halt.is_set()):
                now = time.monotonic()
                if until is not None and now >= until:
                    break
                if next_stats is not None and now >= next_stats:
                    self.publish_stats()
                    next_stats = now + self.options.stats_interval
                self._check_status_changes(lane)
                # Clear before sweeping the buffers, so a frame arriving during the sweep wakes the next wait.
                lane.notify.clear()
                batch = self._collect(lane)
                if batch:
                    self._process(lane, batch)
                elif all(s.done for s in lane.streams):
                    if next_stats is None or all(other.done.is_set() for other in self._lanes[1:]):
                        break
                    stop.wait(0.05)  # the stats lane outlives its streams while other lanes run
                else:
                    lane.notify.wait(0.05)
        finally:
            lane.done.set()

    def _collect(self, lane: Lane) -> list[tuple[StreamState, Frame]]:
        batch = []
        for s in lane.streams:
            if s.done:
                continue
            frame = s.capture.pop()
            if frame is None:
                if s.capture.finished:
                    self._end_stream(s)
                continue
            batch.append((s, frame))
        return batch

    def _process(self, lane: Lane, batch: list[tuple[StreamState, Frame]]) -> None:
        for group_lane in lane.groups.values():
            items = [(s, f) for s, f in batch if s.group_lane is group_lane]
            if items:
                self._process_group(lane, group_lane, items)

    def _process_group(self, lane: Lane, group_lane: GroupLane, batch: list[tuple[StreamState, Frame]]) -> None:
        frames = group_lane.batch_rows(len(batch))  # [B, 3, S, S], reused from step to step
        single = batch[0][1].tensor
        if len(batch) == 1 and single is not None and single.shape == frames.shape[1:]:
            frames = single[None]  # [1, 3, S, S]: one frame is its own batch, a view, not a 600 kB copy
        else:
            for row, (s, f) in zip(frames, batch):
                if f.tensor is not None and f.tensor.shape == row.shape:
                    row[...] = f.tensor  # preprocessed by the capture thread
                else:
                    s.preprocess(f.image, out=row)
        for s, f in batch:
            if f.generation != s.generation:
                # The source reconnected: the runner resets the state; close any open action first.
                self._publish_events(s, s.post.reset(), (f.index, f.timestamp, f.media_ts))
                s.generation = f.generation
        t0 = time.perf_counter()
        try:
            results = group_lane.runner.process([s.id for s, _ in batch], [f.generation for _, f in batch], frames)
        except StepError as e:
            lane.consecutive_errors += 1
            log.error("%s (states reset; %d in a row)", e, lane.consecutive_errors)
            for s, f in batch:
                if s.id in e.stream_ids:
                    s.step_errors += 1
                    self._publish_events(s, s.post.reset(), (f.index, f.timestamp, f.media_ts))
            if lane.consecutive_errors >= _MAX_CONSECUTIVE_STEP_ERRORS:
                raise
            return
        lane.consecutive_errors = 0
        ms = (time.perf_counter() - t0) * 1e3
        with self._lock:
            self._hand_out(group_lane, batch, results, ms)

    def _hand_out(self, group_lane: GroupLane, batch: list[tuple[StreamState, Frame]], results: list,
                  ms: float) -> None:
        """A step's results to the streams' figures and post-processing, and on to the sinks (under the lock)."""
        group = group_lane.group
        predicted = sum(r is not None for r in results)
        if predicted:
            group.record_step(ms, predicted)
        reported: list[StreamResult] = []
        for (s, f), row in zip(batch, results):
            s.processed += 1
            s.rate.tick()
            s.last_seen = at = (f.index, f.timestamp, f.media_ts)
            if row is not None and not np.isfinite(row).all():
                # NaN or infinity (bad weights, fp16/int8 overflow): no prediction for this frame, smoothing and open
                # events left as they were, and the stream's model state restarts, since an online model's NaN would
                # otherwise live on in its cached folds and poison every later frame.
                s.nonfinite += 1
                if s.nonfinite == 1:
                    log.warning("%s: the model output NaN or infinity; the frame is skipped and the stream's model "
                                "state reset (counted in the stats' nonfinite; further ones are not logged)", s.id)
                group_lane.runner.reset(s.id)
            elif row is not None:
                topk, events = s.post.process(row, f.index, f.timestamp, f.media_ts)
                self._out.prediction(s.id, group.model_name, f, topk)
                self._publish_events(s, events, at)
                s.latency.add((time.time() - f.timestamp) * 1e3)
                if self._out.step_sinks:
                    # Without its model input (600 kB at 224): sinks queue frames (--output holds 16 per stream)
                    # and draw on the image; the tensor was only for this step.
                    reported.append(StreamResult(s.id, replace(f, tensor=None) if f.tensor is not None else f, topk))
            if self.options.max_frames is not None and s.processed >= self.options.max_frames:
                self._end_stream(s)
        if reported:
            self._out.step(StepReport(group.key, ms, tuple(reported)))

    def _publish_events(self, s: StreamState, events: list[ActionEvent], at: tuple[int, float, float | None]) -> None:
        """``at``: (index, capture time, media time) of the frame whose prediction decided the events."""
        if events:
            with self._lock:
                self._out.events(s.id, s.group.model_name, events, *at)

    def _end_stream(self, s: StreamState) -> None:
        if s.done:
            return
        s.done = True
        s.capture.finish()
        self._flush(s)
        s.group_lane.runner.remove(s.id)

    def _flush(self, s: StreamState) -> None:
        """Close a stream's open action (its offset refers to the newest processed frame)."""
        events = s.post.flush()
        if events and s.last_seen is not None:
            self._publish_events(s, events, s.last_seen)

    def _check_status_changes(self, lane: Lane) -> None:
        changed = False
        for s in lane.streams:
            if s.capture.poll():
                changed = True
                if s.capture.status is StreamStatus.FAILED:
                    self._end_stream(s)
        if changed:
            self.publish_stats()  # a stream going down or coming back is news; do not wait for the next tick

    # -- stats --------------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """The pipeline's figures, as in the stats message: per stream, per model group, and the publishers'."""
        with self._lock:
            return {
                "streams": {s.id: s.stats() for s in self._streams},
                "models": {g.key: g.stats() for g in self._groups},
                **self._out.publish_counts(),
            }

    def publish_stats(self) -> None:
        if self.sinks:  # no one to tell: skip gathering the figures
            with self._lock:
                self._out.stats(self.stats())

    def _finish(self) -> None:
        for s in self._streams:
            if not s.done:
                self._flush(s)
        self.stop()
        self.publish_stats()
