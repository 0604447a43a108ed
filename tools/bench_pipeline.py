"""Pipeline overhead over the bare model step, and capture->publish latency of a live stream.

    python tools/bench_pipeline.py [--rounds 5] [--frames 150]

Side by side in one run, alternating rounds:
- bare step: the online MobileNetV2-TSM step on a preprocessed 224x224 frame, batch 1 (TorchOnlineEngine);
- pipeline, saturated: the whole pipeline on a video file (320x240, made from the synthetic scene), which the
  capture thread decodes only as fast as the model consumes, so a frame is always waiting (capture thread,
  decoding, preprocessing, batching, post-processing, publishing to a connected ZeroMQ subscriber);
  time per processed frame = wall time / frames.
Then a live run at 30 fps (the synthetic scene paced like a camera) measures capture->publish latency at a
subscriber.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import pct, write_section  # noqa: E402

from streamtsm.engine.factory import default_threads  # noqa: E402
from streamtsm.engine.torch_engine import TorchOnlineEngine  # noqa: E402
from streamtsm.models import create  # noqa: E402
from streamtsm.pipeline import Pipeline, PipelineOptions, StreamSpec  # noqa: E402
from streamtsm.preprocess import Preprocessor  # noqa: E402
from streamtsm.publish import Publisher, Subscriber  # noqa: E402
from streamtsm.synthetic import MotionScene  # noqa: E402


def subscriber_thread(endpoint: str, stop: threading.Event, latencies: list[float]) -> threading.Thread:
    """A daemon thread subscribed to ``endpoint``'s predictions until ``stop``, appending each one's
    capture->receipt latency (ms) to ``latencies``."""
    def run():
        with Subscriber(endpoint, ["streamtsm.pred"]) as sub:
            while not stop.is_set():
                msg = sub.recv(timeout=0.1)
                if msg is not None:
                    latencies.append((time.time() - msg[1]["capture_ts"]) * 1e3)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def bare_round(engine, frame, frames: int) -> float:
    state = engine.zero_state(1)
    t0 = time.perf_counter()
    for _ in range(frames):
        _, state = engine.step(frame, state)
    return (time.perf_counter() - t0) / frames * 1e3


def make_video(path: Path, frames: int) -> None:
    scene = MotionScene(320, 240, seed=0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (320, 240))
    for t in range(frames):
        writer.write(scene.render(t))
    writer.release()


def pipeline_round(engine, publisher, frames: int, source: str) -> tuple[float, dict]:
    pipeline = Pipeline(engine, [StreamSpec(source, "cam")], sinks=[publisher],
                        options=PipelineOptions(max_frames=frames, stats_interval=1.0))
    pipeline.start()
    t0 = time.perf_counter()
    stats = pipeline.run()
    return (time.perf_counter() - t0) / frames * 1e3, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--live-seconds", type=float, default=20)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    # The thread count `streamtsm run` uses (all cores but one), for both the bare step and the pipeline.
    torch.set_num_threads(default_threads())
    engine = TorchOnlineEngine(create("tsm_mobilenetv2_online", num_classes=27))
    pre = Preprocessor.for_config(engine.cfg)
    frame = pre(np.random.default_rng(0).integers(0, 255, (240, 320, 3), np.uint8))[None]
    publisher = Publisher("tcp://127.0.0.1:*")
    stop, latencies = threading.Event(), []
    sub = subscriber_thread(publisher.endpoint, stop, latencies)
    time.sleep(0.5)  # let the subscription reach the publisher before measuring (benchmark only)

    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "scene.avi"
        make_video(video, args.frames)
        bare_round(engine, frame, 20)  # warm-up
        bare, piped = [], []
        for _ in range(args.rounds):
            bare.append(bare_round(engine, frame, args.frames))
            per_frame, stats = pipeline_round(engine, publisher, args.frames, str(video))
            piped.append(per_frame)
    bare_ms, pipe_ms = statistics.median(bare), statistics.median(piped)

    latencies.clear()
    _, live = pipeline_round(engine, publisher, int(args.live_seconds * 30), "synthetic:320x240@30")
    stop.set()
    sub.join(2)
    publisher.close()
    cam = live["streams"]["cam"]
    lines = [
        "| measure | value |", "|---|---|",
        f"| bare online step (MobileNetV2-TSM, 224, batch 1), ms per frame, median of {args.rounds} rounds | "
        f"{bare_ms:.2f} |",
        f"| whole pipeline, saturated source, ms per processed frame, median of {args.rounds} rounds | "
        f"{pipe_ms:.2f} |",
        f"| **pipeline overhead over the bare step** (target <= 15%) | **{100 * (pipe_ms / bare_ms - 1):+.1f}%** |",
        f"| live 30 fps stream: capture->subscriber latency p50 / p99, ms ({len(latencies)} messages) | "
        f"{pct(latencies, 50):.1f} / {pct(latencies, 99):.1f} |",
        f"| live 30 fps stream: frames processed / captured / dropped | {cam['frames']} / {cam['captured']} / "
        f"{cam['dropped']} |",
        "",
        f"Rounds per mode: {', '.join(f'{b:.2f}' for b in bare)} ms (bare) vs "
        f"{', '.join(f'{p:.2f}' for p in piped)} ms (pipeline). The saturated source is an MJPG file of the "
        "synthetic scene at 320x240; its decoding runs in the capture thread on the same 2 cores. "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, random weights.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("pipeline", "Live pipeline: overhead over the bare step, capture->publish latency (CPU)", body)


if __name__ == "__main__":
    main()
