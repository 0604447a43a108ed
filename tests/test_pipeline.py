"""The live pipeline end to end: real clips and the synthetic scene, a real ZeroMQ subscriber checking every field
of every message, the drop policy under a slow model, reconnects, and faults confined to one stream."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from streamtsm.capture import Source
from streamtsm.engine.torch_engine import TorchOnlineEngine
from streamtsm.models import create
from streamtsm.pipeline import ModelGroup, Pipeline, PipelineOptions, StreamSpec
from streamtsm.publish import Publisher, Subscriber
from streamtsm.publish.schema import SCHEMA_VERSION
from streamtsm.sinks import CallbackSink

from .conftest import randomize_

LABELS = ["wave", "clap", "jump", "sit", "walk"]


@pytest.fixture(scope="module")
def engine():
    model = create("tsm_mobilenetv2_online", num_classes=5, width_mult=0.25, input_size=32, resize_size=36)
    return TorchOnlineEngine(randomize_(model, seed=7), labels=LABELS)


@pytest.fixture
def pubsub():
    pub = Publisher("tcp://127.0.0.1:*")
    sub = Subscriber(pub.endpoint, ["streamtsm"])
    # Slow joiner: a subscription takes a moment to reach the publisher; probe until one message gets through.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pub.send("streamtsm.probe", {"schema": SCHEMA_VERSION, "type": "probe"})
        if sub.recv(timeout=0.05) is not None:
            break
    else:
        pytest.fail("subscriber never connected")
    while sub.recv(timeout=0.05) is not None:
        pass
    yield pub, sub
    sub.close()
    pub.close()


def _drain(sub: Subscriber, quiet: float = 0.3) -> list[tuple[str, dict]]:
    out = []
    while (msg := sub.recv(timeout=quiet)) is not None:
        out.append(msg)
    return out


def _check_prediction(topic, p, model, streams):
    assert topic == f"streamtsm.pred.{p['stream']}" and p["stream"] in streams
    assert p["schema"] == SCHEMA_VERSION and p["type"] == "pred" and p["model"] == model
    assert isinstance(p["frame"], int) and p["frame"] >= 0 and p["generation"] == 0
    assert p["capture_ts"] <= p["publish_ts"] <= time.time()
    assert p["latency_ms"] == pytest.approx((p["publish_ts"] - p["capture_ts"]) * 1e3, abs=0.01)
    scores = [t["score"] for t in p["topk"]]
    assert len(p["topk"]) == 5 and {t["label"] for t in p["topk"]} == set(LABELS)
    assert scores == sorted(scores, reverse=True) and 0 <= scores[-1] and scores[0] <= 1
    assert sum(scores) == pytest.approx(1, abs=1e-4)
    assert (p["label"], p["score"]) == (p["topk"][0]["label"], p["topk"][0]["score"])


def _check_events(events, model):
    """Onsets and offsets alternate per stream, offsets close the open onset, fields are consistent."""
    open_: dict[str, dict] = {}
    for topic, e in events:
        assert topic == f"streamtsm.event.{e['stream']}" and e["schema"] == SCHEMA_VERSION
        assert e["type"] == "event" and e["model"] == model and e["label"] in LABELS and 0 <= e["score"] <= 1
        if e["event"] == "onset":
            assert e["stream"] not in open_
            assert e["end_frame"] is None and e["end_ts"] is None and e["duration_s"] is None
            assert e["start_frame"] <= e["frame"]
            open_[e["stream"]] = e
        else:
            onset = open_.pop(e["stream"])
            assert e["event"] == "offset" and e["label"] == onset["label"]
            assert (e["start_frame"], e["start_ts"]) == (onset["start_frame"], onset["start_ts"])
            assert e["start_frame"] <= e["end_frame"] <= e["frame"]
            # A file's actions last in media time (issue 16, item 7); a live source's in wall-clock time.
            if e["start_media_ts"] is None:
                assert e["end_media_ts"] is None
                assert e["duration_s"] == pytest.approx(e["end_ts"] - e["start_ts"], abs=1e-3)
            else:
                assert e["duration_s"] == pytest.approx(e["end_media_ts"] - e["start_media_ts"], abs=1e-3)
    assert not open_, "every onset gets its offset by the end of the run"


def _check_stats(topic, s, streams):
    assert topic == "streamtsm.stats" and s["type"] == "stats" and s["schema"] == SCHEMA_VERSION
    assert set(s["streams"]) == set(streams)
    for st in s["streams"].values():
        for key in ("fps", "frames", "captured", "dropped", "skipped", "bad_frames", "reconnects", "status",
                    "latency_p50_ms", "latency_p99_ms", "step_errors"):
            assert key in st
    assert s["published"] >= 0 and s["publish_dropped"] == 0
    assert s["models"]["tsm_mobilenetv2_online"]["backend"] == "torch"
    assert s["models"]["tsm_mobilenetv2_online"]["kind"] == "online"


def test_real_clip_and_synthetic_scene_publish_every_frame_and_well_formed_messages(engine, pubsub, shared_data):
    pub, sub = pubsub
    specs = [StreamSpec(str(shared_data / "videos" / "sample.avi")), StreamSpec("synthetic:96x72@60", "synth")]
    options = PipelineOptions(smooth=4, hold=2, max_frames=None, duration=None)
    synth_count = []

    def end_synth_after_20(result):
        if result.stream_id == "synth":
            synth_count.append(result.frame.index)
            if len(synth_count) == 20:
                pipeline.end_stream("synth")  # the live source would run forever

    pipeline = Pipeline(engine, specs, sinks=[pub, CallbackSink(results=end_synth_after_20)], options=options)
    pipeline.start()
    final = pipeline.run()
    messages = _drain(sub)
    preds = [(t, p) for t, p in messages if p["type"] == "pred"]
    for t, p in preds:
        _check_prediction(t, p, "tsm_mobilenetv2_online", {"sample", "synth"})
    file_frames = [p["frame"] for _, p in preds if p["stream"] == "sample"]
    assert file_frames == list(range(164)), "a file is processed whole, in order, with no drops"
    synth_frames = [p["frame"] for _, p in preds if p["stream"] == "synth"]
    assert len(synth_frames) >= 20 and synth_frames == sorted(set(synth_frames))
    _check_events([(t, p) for t, p in messages if p["type"] == "event"], "tsm_mobilenetv2_online")
    stats = [(t, p) for t, p in messages if p["type"] == "stats"]
    assert stats, "stats are published at least at the end"
    for t, s in stats:
        _check_stats(t, s, {"sample", "synth"})
    last = stats[-1][1]["streams"]
    assert last["sample"]["frames"] == 164 and last["sample"]["dropped"] == 0
    assert final["streams"]["synth"]["frames"] == len(synth_frames)
    assert final["published"] == pub.sent


class FakeLiveSource(Source):
    """A camera that delivers ``fail_after`` frames, fails once (read returns None), then works again."""

    is_live = True

    def __init__(self, fail_after: int | None = None, fps: float = 200.0):
        self.name, self.fps = "fake camera", fps
        self.fail_after, self.reads, self.opens, self.failed = fail_after, 0, 0, False
        self._next = 0.0

    def open(self):
        self.opens += 1
        self._next = time.monotonic()

    def read(self):
        self.reads += 1
        if self.fail_after is not None and not self.failed and self.reads > self.fail_after:
            self.failed = True
            return None
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next += 1 / self.fps
        return np.full((48, 64, 3), self.reads % 255, np.uint8)

    def release(self):
        pass


class SlowEngine:
    """Wraps an engine so every step takes at least ``delay`` seconds (a model slower than the camera)."""

    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, frames, state):
        time.sleep(self.delay)
        return self.inner.step(frames, state)


def test_slow_model_drops_oldest_frames_instead_of_building_lag(engine):
    source = FakeLiveSource(fps=200)
    seen = []  # (frame index, capture time, time its result came out)
    pipeline = Pipeline(SlowEngine(engine, 0.05), [StreamSpec(source, "cam")], options=PipelineOptions(max_frames=15),
                        sinks=[CallbackSink(results=lambda r: seen.append((r.frame.index, r.frame.timestamp,
                                                                           time.time())))])
    pipeline.start()
    final = pipeline.run()["streams"]["cam"]
    indices = [i for i, _, _ in seen]
    assert len(indices) == 15 and indices == sorted(indices)
    assert final["dropped"] > 15, "the 200 fps camera outran the 20 fps model: frames were dropped, not queued"
    assert final["captured"] >= final["frames"] + final["dropped"]
    # No backlog, whatever the machine's speed: the frame of step i was still the newest when step i-1 ended, so
    # it was captured after step i-2's result came out (50 ms allows for the gap between decode and put).
    for i in range(2, len(seen)):
        assert seen[i][1] > seen[i - 2][2] - 0.05


class GatedCamera(FakeLiveSource):
    """A live camera that delivers a frame each time the test opens its gate (``release``); ``reads`` counts the
    reads begun, so ``reads == k + 1`` means frame k is on its way into the buffer or in it."""

    def __init__(self):
        super().__init__(fps=1000)
        self.gate, self.closed = threading.Semaphore(0), False

    def read(self):
        self.reads += 1
        while not self.gate.acquire(timeout=0.05):
            if self.closed:
                return None
        return np.full((48, 64, 3), self.reads % 255, np.uint8)

    def open(self):
        super().open()
        self.closed = False

    def release(self):
        self.closed = True


class StallingEngine:
    """Wraps an engine so that its first step waits until ``go`` is set (a core taken away for a moment)."""

    def __init__(self, inner):
        self.inner, self.go, self.stalled, self.steps = inner, threading.Event(), threading.Event(), 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, frames, state):
        self.steps += 1
        if self.steps == 1:
            self.stalled.set()
            assert self.go.wait(10)
        return self.inner.step(frames, state)


@pytest.mark.parametrize("live_buffer, processed, dropped", [(1, [0, 2], 1), (2, [0, 1, 2], 0)])
def test_a_step_that_comes_late_catches_up_the_frames_the_live_buffer_holds_and_drops_the_rest(
        engine, live_buffer, processed, dropped):
    camera, model = GatedCamera(), StallingEngine(engine)
    stop, seen = threading.Event(), []

    def on_result(r):
        seen.append(r.frame.index)
        if r.frame.index == 2:
            stop.set()

    pipeline = Pipeline(model, [StreamSpec(camera, "cam", frame_stride=1)], sinks=[CallbackSink(results=on_result)],
                        options=PipelineOptions(live_buffer=live_buffer, lanes=1))
    pipeline.start()
    runner = threading.Thread(target=lambda: seen.append(pipeline.run(stop)))
    runner.start()
    camera.gate.release()  # frame 0: its step stalls
    assert model.stalled.wait(10)
    camera.gate.release(2)  # frames 1 and 2 arrive while the model is late
    deadline = time.monotonic() + 10
    while camera.reads < 4 and time.monotonic() < deadline:  # the 4th read waits at the gate: frame 2 is in
        time.sleep(0.005)
    model.go.set()
    runner.join(10)
    assert not runner.is_alive()
    *indices, final = seen
    assert indices == processed
    assert final["streams"]["cam"]["dropped"] == dropped


def test_source_that_fails_midway_reconnects_and_its_state_restarts(engine, pubsub):
    pub, sub = pubsub
    source = FakeLiveSource(fail_after=10, fps=100)
    options = PipelineOptions(max_frames=30, backoff=(0.5, 0.5))  # long enough for a status poll to see it
    pipeline = Pipeline(engine, [StreamSpec(source, "cam")], sinks=[pub], options=options)
    pipeline.start()
    final = pipeline.run()["streams"]["cam"]
    messages = _drain(sub)
    assert final["reconnects"] == 1 and final["generation"] == 1 and final["frames"] == 30
    assert source.opens == 2
    generations = [p["generation"] for _, p in messages if p["type"] == "pred"]
    assert generations[0] == 0 and generations[-1] == 1 and generations == sorted(generations)
    statuses = [p["streams"]["cam"]["status"] for _, p in messages if p["type"] == "stats"]
    assert "reconnecting" in statuses, "the reconnect is announced on the stats topic"


def test_failing_model_step_resets_streams_and_the_run_continues(engine):
    class FailOnce:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def step(self, frames, state):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("injected fault")
            return self.inner.step(frames, state)

    pipeline = Pipeline(FailOnce(engine), [StreamSpec(FakeLiveSource(fps=100), "cam")],
                        options=PipelineOptions(max_frames=10))
    pipeline.start()
    final = pipeline.run()["streams"]["cam"]
    assert final["frames"] == 10 and final["step_errors"] == 1


class DownCamera(Source):
    """A live source that refuses to open its first ``down_for`` times (a camera still booting, a link down)."""

    is_live = True
    fps = 100.0

    def __init__(self, down_for: int = 10**9) -> None:
        self.name = "camera down"
        self.down_for = down_for
        self.opens = 0

    def open(self):
        from streamtsm.errors import SourceError

        self.opens += 1
        if self.opens <= self.down_for:
            raise SourceError(f"cannot open {self.name} (attempt {self.opens})")

    def read(self):
        time.sleep(0.01)
        return np.zeros((32, 32, 3), np.uint8)

    def release(self):
        pass


FAST_RETRY = dict(backoff=(0.02, 0.05), startup_timeout=0.5)


def test_camera_down_at_start_is_retried_while_the_other_streams_run(engine):
    seen = []  # the door's entry of every stats message: what a site's dashboard sees while the run goes on
    sink = CallbackSink(messages=lambda topic, p: seen.append(p["streams"]["door"]) if p["type"] == "stats" else 0)
    pipeline = Pipeline(engine, [StreamSpec("synthetic:32x32@30", "ok"), StreamSpec(DownCamera(), "door")],
                        sinks=[sink], options=PipelineOptions(duration=1.0, stats_interval=0.2, **FAST_RETRY))
    pipeline.start()  # returns: one camera down does not stop a site
    final = pipeline.run()["streams"]
    assert final["ok"]["frames"] > 0 and final["door"]["frames"] == 0
    during = seen[:-1]  # the last is sent after the captures were stopped
    assert during and all(d["status"] == "connecting" for d in during)
    assert "cannot open camera down" in during[-1]["last_error"]


def test_camera_that_comes_up_later_joins_the_run(engine):
    late = DownCamera(down_for=3)
    pipeline = Pipeline(engine, [StreamSpec("synthetic:32x32@30", "ok"), StreamSpec(late, "door")],
                        options=PipelineOptions(duration=1.5, **FAST_RETRY))
    pipeline.start()
    final = pipeline.run()["streams"]
    assert late.opens == 4 and final["door"]["frames"] > 0
    assert final["door"]["reconnects"] == 0 and final["door"]["generation"] == 0  # it had never run: no reconnect


def test_single_source_that_never_opens_is_one_clear_error_after_the_startup_timeout(engine):
    from streamtsm.errors import SourceError

    pipeline = Pipeline(engine, [StreamSpec(DownCamera(), "door")], options=PipelineOptions(**FAST_RETRY))
    with pytest.raises(SourceError, match=r"cannot open camera down.*--keep-trying"):
        pipeline.start()
    assert all(not s.capture.is_alive() for s in pipeline._streams)


def test_single_source_with_keep_trying_waits_for_its_camera(engine):
    pipeline = Pipeline(engine, [StreamSpec(DownCamera(), "door")],
                        options=PipelineOptions(keep_trying=True, duration=0.6, **FAST_RETRY))
    pipeline.start()  # returns at once: the camera is being retried
    assert pipeline.stats()["streams"]["door"]["status"] == "connecting"
    assert pipeline.run()["streams"]["door"]["frames"] == 0  # and the run goes on until its duration


def test_file_that_does_not_open_is_still_an_error_at_start(engine, tmp_path):
    from streamtsm.errors import SourceError

    pipeline = Pipeline(engine, [StreamSpec("synthetic:32x32@30", "ok"), StreamSpec(str(tmp_path / "gone.mp4"), "f")],
                        options=PipelineOptions(**FAST_RETRY))
    with pytest.raises(SourceError, match="gone.mp4"):
        pipeline.start()


def test_run_without_start_starts_the_captures_itself(engine, tmp_path):
    from streamtsm.errors import SourceError

    final = Pipeline(engine, [StreamSpec("synthetic:32x32@60", "cam")], options=PipelineOptions(max_frames=3)).run()
    assert final["streams"]["cam"]["frames"] == 3
    with pytest.raises(SourceError, match="gone.mp4"):  # as start() says it
        Pipeline(engine, [StreamSpec(str(tmp_path / "gone.mp4"), "f")]).run()


def test_stop_event_ends_a_live_run_promptly(engine):
    pipeline = Pipeline(engine, [StreamSpec("synthetic:64x48@30", "s")])
    stop = threading.Event()
    pipeline.start()
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    pipeline.run(stop)
    assert time.monotonic() - t0 < 3.0
    assert not pipeline._streams[0].capture.is_alive()


class HangingSource(FakeLiveSource):
    """Delivers ``frames`` frames, then its read blocks (no frame, no error) until released."""

    def __init__(self, frames: int, release: threading.Event):
        super().__init__(fps=100)
        self.frames, self.release_event = frames, release

    def read(self):
        if self.reads >= self.frames:
            self.release_event.wait()
            return None
        return super().read()


def test_source_whose_read_hangs_is_replaced_and_the_stream_goes_on(engine):
    release = threading.Event()
    made = []

    def factory():
        # The first source hangs after 5 frames; the ones made after it work.
        made.append(HangingSource(5, release) if not made else FakeLiveSource(fps=100))
        return made[-1]

    options = PipelineOptions(max_frames=20, read_timeout=0.3)
    seen = []
    pipeline = Pipeline(engine, [StreamSpec(factory, "cam")], options=options,
                        sinks=[CallbackSink(results=lambda r: seen.append((r.frame.index, r.frame.generation)))])
    try:
        pipeline.start()
        final = pipeline.run()["streams"]["cam"]
    finally:
        release.set()
    assert len(made) == 2 and final["frames"] == 20 and final["reconnects"] == 1
    indices = [i for i, _ in seen]
    assert indices == sorted(set(indices)), "frame indices keep increasing across the replaced capture"
    assert seen[0][1] == 0 and seen[-1][1] == 1, "the new capture is a new generation (state reset)"


def test_online_model_trained_on_every_kth_frame_is_fed_every_kth_frame_unless_told(shared_data):
    model = create("tsm_mobilenetv2_online", num_classes=5, width_mult=0.25, input_size=32, resize_size=36,
                   frame_interval=3)
    strided = TorchOnlineEngine(randomize_(model, seed=3), labels=LABELS)
    clip = str(shared_data / "videos" / "sample.avi")
    seen: dict[str, list[int]] = {"default": [], "every": []}
    specs = [StreamSpec(clip, "default"), StreamSpec(clip, "every", frame_stride=1)]
    pipeline = Pipeline(strided, specs, options=PipelineOptions(max_frames=10),
                        sinks=[CallbackSink(results=lambda r: seen[r.stream_id].append(r.frame.index))])
    pipeline.start()
    pipeline.run()
    assert seen["default"] == list(range(0, 30, 3))
    assert seen["every"] == list(range(10))


class MarkedSource(FakeLiveSource):
    """Dark frames, except bright ones at the reads ``bright_at``: the frames the NaN model below goes wrong on."""

    is_live = False  # every frame reaches the model (a live source may drop the bright one)

    def __init__(self, bright_at: tuple[int, ...] = ()):
        super().__init__(fps=100)
        self.bright_at = bright_at

    def read(self):
        image = super().read()
        return np.full_like(image, 250 if self.reads in self.bright_at else 10)


class NanOnBrightEngine:
    """An online model gone wrong the way a real one does: a bright frame overflows it to NaN, and the NaN lives on
    in that stream's state, so every later output of the stream is NaN too unless its state is reset."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, frames, state):
        import torch

        logits, new_state = self.inner.step(frames, state)
        poisoned = np.array([bool(torch.isnan(state[n][b]).any()) for b in range(len(frames))
                             for n in self.inner.state_names]).reshape(len(frames), -1).any(1)
        bad = (frames.reshape(len(frames), -1).mean(1) > 0) | poisoned
        logits = logits.copy()
        logits[bad] = np.nan
        mask = torch.from_numpy(bad)
        new_state = {name: torch.where(mask.view(-1, *[1] * (t.dim() - 1)), torch.full_like(t, float("nan")), t)
                     for name, t in new_state.items()}
        return logits, new_state


def test_pipeline_nan_output_counts_resets_state_and_never_reaches_the_wire(engine, pubsub, caplog):
    from streamtsm.sinks.metrics import MetricsSink

    pub, sub = pubsub
    metrics = MetricsSink()
    specs = [StreamSpec(MarkedSource(bright_at=(5, 9)), "bad"), StreamSpec(MarkedSource(), "good")]
    pipeline = Pipeline(NanOnBrightEngine(engine), specs, sinks=[pub, metrics],
                        options=PipelineOptions(max_frames=20))
    pipeline.start()
    final = pipeline.run()["streams"]
    # The subscriber decodes strictly (json.loads refusing NaN/Infinity) and counts what it refuses.
    payloads = [p for _, p in _drain(sub)]
    assert sub.malformed == 0, "every published payload is valid JSON"
    preds = [p for p in payloads if p["type"] == "pred"]
    assert final["bad"]["nonfinite"] == 2, "the state was reset: the NaN did not live on in later frames"
    assert final["good"]["nonfinite"] == 0 and final["good"]["frames"] == 20
    assert final["bad"]["frames"] == 20 and final["bad"]["step_errors"] == 0
    assert sum(p["stream"] == "bad" for p in preds) == 18, "no prediction for the NaN frames"
    assert sum(p["stream"] == "good" for p in preds) == 20
    assert all(isinstance(t["score"], float) for p in preds for t in p["topk"])
    assert metrics.registry.get_sample_value("streamtsm_nonfinite_total", {"stream": "bad"}) == 2
    warnings = [r for r in caplog.records if "NaN or infinity" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("bad:"), "a warning once per stream"


class StillCamera(FakeLiveSource):
    """A live camera showing one textured image: every frame's model input is known."""

    def __init__(self, image):
        super().__init__(fps=100)
        self.image = image

    def read(self):
        super().read()
        return self.image


class RecordingEngine:
    """Keeps a copy of every batch the model is given."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, frames, state):
        self.batches.append(frames.copy())
        return self.inner.step(frames, state)


def test_pipeline_preprocesses_in_the_capture_threads_per_group_and_crop(engine, monkeypatch):
    from streamtsm.preprocess import Preprocessor

    threads = []
    real_call = Preprocessor.__call__

    def spy(self, image, out=None):
        threads.append(threading.current_thread().name)
        return real_call(self, image, out)

    monkeypatch.setattr(Preprocessor, "__call__", spy)
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)
    big = RecordingEngine(TorchOnlineEngine(randomize_(create("tsm_mobilenetv2_online", num_classes=5,
                                                              width_mult=0.25, input_size=40, resize_size=44),
                                                       seed=3), labels=LABELS))
    small = RecordingEngine(engine)
    crop = (10, 5, 50, 40)
    pipeline = Pipeline.from_groups([
        ModelGroup(small, [StreamSpec(StillCamera(image), "a", frame_stride=1),
                           StreamSpec(StillCamera(image), "b", frame_stride=1, crop=crop)]),
        ModelGroup(big, [StreamSpec(StillCamera(image), "c", frame_stride=1)]),
    ], options=PipelineOptions(max_frames=6))
    pipeline.start()
    stats = pipeline.run()
    during_run = list(threads)
    assert all(s["frames"] == 6 for s in stats["streams"].values())
    expected_small = {Preprocessor.for_config(engine.cfg)(image).tobytes(): "a",
                      Preprocessor.for_config(engine.cfg, crop=crop)(image).tobytes(): "b"}
    rows_small = [row.tobytes() for batch in small.batches for row in batch]
    assert sorted(expected_small[r] for r in rows_small) == ["a"] * 6 + ["b"] * 6
    expected_big = Preprocessor.for_config(big.cfg)(image)
    assert sum(len(b) for b in big.batches) == 6
    assert all(b.shape[1:] == (3, 40, 40) and (b == expected_big).all() for b in big.batches)
    # Every frame preprocessed by its stream's capture thread (those dropped too), none by the model's thread.
    assert {t.split("-", 1)[0] for t in during_run} == {"capture"}
    assert all(during_run.count(f"capture-{sid}") >= 6 for sid in "abc")


# -- lanes ----------------------------------------------------------------------------------------------------


def _still_cameras(n: int) -> list[StreamSpec]:
    """n live cameras, camera i showing a flat image of level 40 i + 20: its rows in a batch say whose they are."""
    return [StreamSpec(StillCamera(np.full((48, 64, 3), 40 * i + 20, np.uint8)), f"cam{i}", frame_stride=1)
            for i in range(n)]


class LaneRecordingEngine:
    """Records, per step, the thread that ran it and the streams in its batch (by their flat image's level); the
    first step of each of ``side_by_side`` threads waits for the others' at a barrier, so they overlap or it fails."""

    def __init__(self, inner, side_by_side: int = 1):
        self.inner, self.steps = inner, []
        self._first = threading.Barrier(side_by_side, timeout=10) if side_by_side > 1 else None
        self._seen: set[str] = set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, frames, state):
        thread = threading.current_thread().name
        if self._first is not None and thread not in self._seen:
            self._seen.add(thread)
            self._first.wait()
        levels = frozenset(int(round(float(v))) for v in frames[:, 0, 0, 0] * 1000)
        self.steps.append((thread, levels))
        return self.inner.step(frames, state)


def _scores_by_stream(sink_results):
    out: dict[str, list] = {}
    for r in sink_results:
        out.setdefault(r.stream_id, []).append([score for _, score in r.topk])
    return out


def test_lanes_deal_the_streams_in_turn_and_step_them_side_by_side_on_threads_of_their_own(engine):
    recorder = LaneRecordingEngine(engine, side_by_side=2)
    results, inside, overlaps = [], threading.Lock(), []

    def one_at_a_time(result):
        if not inside.acquire(blocking=False):
            overlaps.append(result.stream_id)
            return
        try:
            results.append(result)
            time.sleep(0.001)  # widen the window in which a second lane would enter
        finally:
            inside.release()

    pipeline = Pipeline(recorder, _still_cameras(4), sinks=[CallbackSink(results=one_at_a_time)],
                        options=PipelineOptions(max_frames=8, lanes=2))
    assert pipeline.lanes == 2
    stats = pipeline.run()
    assert all(s["frames"] == 8 for s in stats["streams"].values())
    assert not overlaps, "sinks are handed one result at a time, whichever lane it comes from"
    # Each stream's level (normalized) identifies it; the lanes got streams 0, 2 and 1, 3 and never mixed them.
    by_thread: dict[str, set] = {}
    for thread, levels in recorder.steps:
        by_thread.setdefault(thread, set()).update(levels)
    assert set(by_thread) == {"MainThread", "lane-2"}
    assert len(by_thread["MainThread"]) == 2 and len(by_thread["lane-2"]) == 2
    assert not by_thread["MainThread"] & by_thread["lane-2"]
    assert stats["models"][engine.model_name]["steps"] == len(recorder.steps)

    # The same streams in one lane: every stream's predictions are the same, frame for frame.
    alone = []
    one_lane = Pipeline(engine, _still_cameras(4), sinks=[CallbackSink(results=alone.append)],
                        options=PipelineOptions(max_frames=8, lanes=1))
    one_lane.run()
    two, one = _scores_by_stream(results), _scores_by_stream(alone)
    assert set(two) == set(one) == {f"cam{i}" for i in range(4)}
    for sid in one:
        np.testing.assert_allclose(two[sid], one[sid], atol=1e-5)


def test_a_lane_whose_model_keeps_failing_ends_the_run_with_its_error_and_stops_the_other_lane(engine):
    from streamtsm.engine.online import StepError

    class FailsForOddCameras:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def step(self, frames, state):
            if threading.current_thread().name == "lane-2":
                raise RuntimeError("injected fault")
            return self.inner.step(frames, state)

    stop, watchdog_fired = threading.Event(), threading.Event()

    def watchdog():
        if not stop.wait(30):
            watchdog_fired.set()
            stop.set()

    threading.Thread(target=watchdog, daemon=True).start()
    pipeline = Pipeline(FailsForOddCameras(engine), _still_cameras(2), options=PipelineOptions(lanes=2))
    try:
        with pytest.raises(StepError, match="injected fault"):
            pipeline.run(stop)  # live cameras, no duration: only the failing lane can end it
    finally:
        stop.set()
    assert not watchdog_fired.is_set(), "the failing lane did not end the run; the watchdog did"
    stats = pipeline.stats()["streams"]
    assert stats["cam1"]["step_errors"] >= 20 and stats["cam1"]["frames"] == 0
    assert stats["cam0"]["frames"] > 0 and stats["cam0"]["status"] == "stopped"


def test_lanes_default_to_the_machines_and_are_refused_for_a_model_that_computes_elsewhere(engine, monkeypatch):
    import streamtsm.pipeline as pipeline_module
    from streamtsm.errors import ConfigError

    class Remote:
        host_cpu = False

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

    specs = [StreamSpec("synthetic", f"s{i}") for i in range(3)]
    for cores, expected in ((1, 1), (2, 2), (4, 1), (None, 1)):
        monkeypatch.setattr(pipeline_module.os, "cpu_count", lambda cores=cores: cores)
        assert pipeline_module.default_lanes() == expected
        assert Pipeline(engine, specs).lanes == expected
    monkeypatch.setattr(pipeline_module.os, "cpu_count", lambda: 2)
    assert Pipeline(engine, specs[:1]).lanes == 1, "never more lanes than streams"
    assert Pipeline(engine, specs, options=PipelineOptions(lanes=8)).lanes == 3
    assert Pipeline(Remote(engine), specs).lanes == 1
    with pytest.raises(ConfigError, match="--lanes 2: lanes step models on this machine's CPU cores"):
        Pipeline(Remote(engine), specs, options=PipelineOptions(lanes=2))
    assert Pipeline(Remote(engine), specs, options=PipelineOptions(lanes=1)).lanes == 1
