"""The rolling-window runner: each frame preprocessed once into a ring, windows sampled with the model's clip
settings, due streams batched; and pipelines that run an online and a clip model side by side."""

from __future__ import annotations

import numpy as np
import pytest

from streamtsm.config import ModelConfig
from streamtsm.engine.base import ClipEngine
from streamtsm.engine.clip import ClipRunner, FrameRing
from streamtsm.engine.torch_engine import TorchClipEngine, TorchOnlineEngine
from streamtsm.models import create
from streamtsm.pipeline import ModelGroup, Pipeline, PipelineOptions, StreamSpec
from streamtsm.sinks import CallbackSink

from .conftest import randomize_


class RecordingEngine(ClipEngine):
    """Returns, as 'logits', the frame ids found in each clip (frame t is filled with value t)."""

    backend = "fake"

    def __init__(self, clip_len, frame_interval):
        self.cfg = ModelConfig(name="fake_clip", kind="clip", num_classes=clip_len, clip_len=clip_len,
                               frame_interval=frame_interval)
        self.labels = [str(i) for i in range(clip_len)]
        self.batches = []

    def predict(self, clips):
        self.batches.append(len(clips))
        return clips[:, :, 0, 0, 0].copy()  # [B, T]: the frame id of each window position


def _frame(t):
    return np.full((1, 3, 2, 2), t, np.float32)


def test_ring_window_takes_frames_interval_apart_ending_at_the_newest():
    ring = FrameRing(capacity=7, frame_shape=(3, 2, 2))
    for t in range(20):
        ring.push(_frame(t)[0])
    np.testing.assert_array_equal(ring.window(4, 2)[:, 0, 0, 0], [13, 15, 17, 19])


def test_clip_runner_predicts_every_stride_after_a_full_window():
    engine = RecordingEngine(clip_len=3, frame_interval=2)  # span 5 frames
    runner = ClipRunner(engine, clip_stride=2)
    predicted = {}
    for t in range(12):
        out = runner.process(["a"], [0], _frame(t))
        if out[0] is not None:
            predicted[t] = list(out[0])
    assert predicted == {4: [0, 2, 4], 6: [2, 4, 6], 8: [4, 6, 8], 10: [6, 8, 10]}


def test_clip_runner_batches_due_streams_and_restarts_a_reconnected_one():
    engine = RecordingEngine(clip_len=2, frame_interval=1)
    runner = ClipRunner(engine)
    runner.process(["a", "b"], [0, 0], np.concatenate([_frame(0), _frame(100)]))
    out = runner.process(["a", "b"], [0, 0], np.concatenate([_frame(1), _frame(101)]))
    assert [list(o) for o in out] == [[0, 1], [100, 101]] and engine.batches == [2]
    out = runner.process(["a", "b"], [0, 1], np.concatenate([_frame(2), _frame(200)]))
    assert list(out[0]) == [1, 2] and out[1] is None, "b reconnected: its window restarts"
    out = runner.process(["b"], [1], _frame(201))
    assert list(out[0]) == [200, 201]


def test_clip_runner_window_of_is_the_window_the_next_prediction_classifies():
    runner = ClipRunner(RecordingEngine(clip_len=3, frame_interval=2), clip_stride=100)
    for t in range(4):
        runner.process(["a"], [0], _frame(t))
        assert runner.window_of("a") is None  # not a full window yet (span 5)
    for t in range(4, 7):
        runner.process(["a"], [0], _frame(t))
    assert list(runner.window_of("a")[:, 0, 0, 0]) == [2, 4, 6] and runner.window_of("b") is None


def test_torch_clip_engine_rejects_clips_of_another_layout_or_dtype():
    engine = TorchClipEngine(create("tsm_r18", num_classes=3, width=8, input_size=32, resize_size=32))
    with pytest.raises(ValueError, match=r"clips must be a float32 \[B, T, 3, H, W\] array with H = W = 32, got "
                                         r"float32 \(8, 3, 32, 32\)"):
        engine.predict(np.zeros((8, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="got float64"):
        engine.predict(np.zeros((1, 8, 3, 32, 32)))


def test_clip_runner_rejects_a_bad_stride():
    with pytest.raises(ValueError, match="clip_stride"):
        ClipRunner(RecordingEngine(2, 1), clip_stride=0)


def test_online_and_clip_models_run_side_by_side_in_one_pipeline():
    online = TorchOnlineEngine(randomize_(create("tsm_mobilenetv2_online", num_classes=4, width_mult=0.25,
                                                 input_size=32, resize_size=36), seed=1))
    clip_model = create("tsm_r18", num_classes=3, width=8, num_segments=4, clip_len=4, frame_interval=2,
                        input_size=32, resize_size=36)
    clip = TorchClipEngine(randomize_(clip_model, seed=2))
    seen: dict[str, list[int]] = {"live": [], "window": []}
    pipeline = Pipeline.from_groups(
        [ModelGroup(online, [StreamSpec("synthetic:64x48@60", "live")]),
         ModelGroup(clip, [StreamSpec("synthetic:64x48@60", "window")], clip_stride=3)],
        options=PipelineOptions(max_frames=16),
        sinks=[CallbackSink(results=lambda r: seen[r.stream_id].append(len(r.topk)))])
    pipeline.start()
    stats = pipeline.run()
    assert len(seen["live"]) == 16 and set(seen["live"]) == {4}
    # 16 frames, first window after 7 frames (4 frames 2 apart), then every 3rd frame: frames 7, 10, 13, 16.
    assert len(seen["window"]) == 4 and set(seen["window"]) == {3}
    assert stats["models"]["tsm_r18"]["kind"] == "clip" and stats["models"]["tsm_mobilenetv2_online"]["steps"] == 16
    assert stats["streams"]["window"]["model"] == "tsm_r18"
