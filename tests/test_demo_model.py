"""The shipped demo model: what `streamtsm run` uses by default recognizes the motions of the built-in synthetic
scene live, through the real pipeline (capture thread, frame stride from the checkpoint, batching, smoothing,
events)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamtsm.capture import Source
from streamtsm.engine.factory import DEMO_WEIGHTS, build_engine
from streamtsm.pipeline import Pipeline, PipelineOptions, StreamSpec
from streamtsm.sinks import CallbackSink
from streamtsm.synthetic import MOTIONS, MotionScene

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason=f"no demo model shipped at {DEMO_WEIGHTS}")]

WARMUP = 24  # scene frames into a segment before a prediction counts: the state still holds the last motion


class SceneReplay(Source):
    """The live synthetic scene's frames, read as a file is (every frame, in order, as fast as the model goes), so
    the test does not wait 2 s per motion on the wall clock."""

    name = "synthetic scene replay"
    is_live = False

    def __init__(self, seed: int, frames: int) -> None:
        self.scene = MotionScene(320, 240, seed=seed)
        self.frames = frames
        self.fps = 30.0
        self._t = 0

    def open(self) -> None:
        self._t = 0

    def read(self):
        if self._t >= self.frames:
            return None
        self._t += 1
        return self.scene.render(self._t - 1)

    def release(self) -> None:
        pass


def test_demo_model_is_the_default_and_says_how_it_was_made():
    engine = build_engine()
    assert engine.labels == list(MOTIONS) and engine.cfg.kind == "online"
    info = json.loads(DEMO_WEIGHTS.with_suffix(".json").read_text())
    assert info["model"] == engine.cfg.name and info["frame_stride"] == engine.cfg.frame_interval
    assert any(step.startswith("streamtsm train ") for step in info["steps"])


def test_default_run_names_the_motion_on_screen():
    engine = build_engine(threads=1)
    seeds = (11, 12)
    sources = {f"s{seed}": SceneReplay(seed, 2 * len(MOTIONS) * 60) for seed in seeds}
    hits: dict[str, list[bool]] = {sid: [] for sid in sources}
    onsets: list[tuple[str, int, str]] = []

    def check(result):
        scene = sources[result.stream_id].scene
        if result.frame.index % scene.segment_frames >= WARMUP:
            hits[result.stream_id].append(result.topk[0][0] == scene.motion_at(result.frame.index))

    def events(topic, payload):
        if payload.get("type") == "event" and payload["event"] == "onset":
            onsets.append((payload["stream"], payload["frame"], payload["label"]))

    specs = [StreamSpec(src, sid) for sid, src in sources.items()]
    pipeline = Pipeline(engine, specs, sinks=[CallbackSink(messages=events, results=check)], options=PipelineOptions())
    pipeline.start()
    final = pipeline.run()

    stride = engine.cfg.frame_interval
    for sid in sources:
        assert final["streams"][sid]["frames"] == 2 * len(MOTIONS) * 60 // stride, "every stride-th frame, no drop"
    accuracy = float(np.mean([h for v in hits.values() for h in v]))
    right = [sources[sid].scene.motion_at(frame) == label for sid, frame, label in onsets]
    recalled = {(sid, frame // 60) for (sid, frame, label), ok in zip(onsets, right) if ok}
    segments = len(sources) * 2 * len(MOTIONS)
    # Chance is 1/9. Measured when the model was built (docs/demo-model.md): 99.7% per step, every segment's motion
    # announced by an onset, 64% of onsets right (the others are brief, while one motion gives way to the next).
    assert accuracy >= 0.9, f"per-step top-1 {accuracy:.3f} on the live scene"
    assert len(recalled) >= 0.9 * segments, f"{len(recalled)} of {segments} segments got an onset of their motion"
    assert np.mean(right) >= 0.5, f"{sum(right)}/{len(right)} onsets name the motion on screen"


def test_demo_model_trained_with_streamtsm_train_scores_over_90_percent_on_unseen_scenes(tmp_path):
    """The temporal-modelling claim at full budget: the shipped model is a small online TSM trained by
    `streamtsm train` on the synthetic motions (tests/test_train_temporal.py shows, at a test's budget, that the
    same network without shift cannot tell the directions apart). Here it meets scenes rendered now, from another
    seed than its dataset's, in the layout its dataset had."""
    from streamtsm.models import load
    from streamtsm.train.annotations import read_annotations
    from streamtsm.train.synthdata import write_synthetic_dataset
    from streamtsm.train.evaluate import evaluate

    info = json.loads(DEMO_WEIGHTS.with_suffix(".json").read_text())
    synth = info["steps"][0].split()
    option = {synth[i][2:]: synth[i + 1] for i in range(2, len(synth) - 1) if synth[i].startswith("--")}
    assert option["seed"] != "7"
    write_synthetic_dataset(tmp_path, clips_per_class=30, frames=int(option["frames"]),
                            motion_frames=int(option["motion-frames"]), size=option["size"],
                            render_size=option["render-size"], seed=7, val_fraction=0.0)
    model = load(DEMO_WEIGHTS)
    result = evaluate(model, read_annotations(tmp_path / "train.txt"), num_clips=1, online=True, sampling="dense")
    online = result["online"]
    assert online["count"] == 30 * len(MOTIONS)
    assert online["top1"] >= 0.9, f"online top-1 {online['top1']:.3f} on unseen scenes"
