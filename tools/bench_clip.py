"""Clip models on the rolling-window path: per-prediction latency, torch vs onnxruntime, and the cost of the
ring buffer (each frame preprocessed once) vs re-preprocessing the whole window for every prediction.

    python tools/bench_clip.py [--models x3d_xs,x3d_s,uniformer_s] [--iterations 10]

Batch 1, each model at its registered clip settings and input size, random weights, CPU. Cases of one model are
measured interleaved (round-robin) in one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import interleaved, summary, write_section  # noqa: E402

from streamtsm.engine.clip import ClipRunner  # noqa: E402
from streamtsm.engine.onnxruntime_engine import load_onnx_engine  # noqa: E402
from streamtsm.engine.torch_engine import TorchClipEngine  # noqa: E402
from streamtsm.export.onnx import export_onnx  # noqa: E402
from streamtsm.models import create  # noqa: E402
from streamtsm.preprocess import Preprocessor  # noqa: E402
from streamtsm.synthetic import MotionScene  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="x3d_xs,x3d_s,uniformer_s")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    scene = MotionScene(320, 240, seed=0)
    raw = [scene.render(t) for t in range(256)]
    rows = ["| model | clip | torch p50 ms | onnxruntime p50 ms | ort / torch | ring: data per prediction ms | "
            "re-preprocess window ms | re-preprocess / ring |", "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = create(name)
            cfg = model.cfg
            torch_engine = TorchClipEngine(model)
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, path, verify=False)
            ort_engine = load_onnx_engine(path, providers=["cpu"], threads=torch.get_num_threads())
            pre = Preprocessor.for_config(cfg)
            ring = ClipRunner(_NoModel(cfg), clip_stride=1)
            span = cfg.window_span
            for t in range(span):  # fill the ring once
                ring.process(["cam"], [0], pre(raw[t])[None])
            clip = ring.window_of("cam")[None]
            counter = [span]

            def ring_step():
                # A new frame: preprocess it once, push it, take the window.
                counter[0] += 1
                ring.process(["cam"], [0], pre(raw[counter[0] % len(raw)])[None])

            def repreprocess_window():
                # Without a ring: preprocess every frame of the window again for this prediction.
                idx = [(counter[0] - cfg.frame_interval * j) % len(raw) for j in range(cfg.clip_len)]
                np.stack([pre(raw[i]) for i in idx])[None]

            cases = {
                "torch": lambda: torch_engine.predict(clip),
                "ort": lambda: ort_engine.predict(clip),
                "ring": ring_step,
                "window": repreprocess_window,
            }
            times = interleaved(cases, args.iterations, warmup=2)
            p = {k: summary(v)[0] for k, v in times.items()}
            rows.append(f"| {name} | {cfg.clip_len}x{cfg.frame_interval} @{cfg.input_size} | {p['torch']:.1f} | "
                        f"{p['ort']:.1f} | {p['ort'] / p['torch']:.2f}x | {p['ring']:.2f} | {p['window']:.2f} | "
                        f"{p['window'] / p['ring']:.1f}x |")
            print(rows[-1], flush=True)
    body = "\n".join(rows) + (
        f"\n\nBatch 1, {args.iterations} interleaved iterations per case after 2 warm-up runs; torch "
        f"{torch.__version__} eager with {torch.get_num_threads()} threads, onnxruntime CPU EP. The data columns "
        "exclude the model: 'ring' is what the live path does per prediction at clip stride 1 (preprocess the new "
        "320x240 frame, push it, gather the window); 're-preprocess' preprocesses all clip_len frames again.")
    if not args.no_write:
        write_section("clip", "Clip models on rolling windows (CPU)", body)


class _NoModel:
    """A ClipEngine stand-in whose prediction is free, so only the data path is timed."""

    backend = "none"

    def __init__(self, cfg):
        self.cfg = cfg

    def predict(self, clips):
        return np.zeros((len(clips), 1), np.float32)


if __name__ == "__main__":
    main()
