"""What a user of `streamtsm run` sees from the shipped demo model on the live synthetic scene.

    python tools/bench_demo_model.py [--seconds 180] [--seeds 0 1 2] [--write]

Runs the demo model as `run` does with no options: the engine `run` builds (the shipped checkpoint on torch), the
synthetic source's 320x240 frames (``MotionScene``, 60-frame segments at 30 fps), every ``frame_interval``-th frame
(the stride the checkpoint records), the pipeline's preprocessing, the state carried across segments, and `run`'s
default post-processing (``RUN_DEFAULTS``: smoothing, hold, threshold). The scene is rendered frame by frame, not
paced by the clock, so the figures do not depend on the machine's speed. Each prediction is compared with the
scene's ground truth (``MotionScene.motion_at``) and printed as:

- top-1 over EVERY step of the published (smoothed) predictions, what a viewer of the stream sees, and of the
  model's raw output; each also over the steps from ``--warmup`` frames into each segment (the figure
  docs/demo-model.md gives: an online model's cached state needs frames of a new motion before it reflects it);
- onset precision: the fraction of onset events whose label is the motion on screen at the onset frame;
- the delay from a segment's start to the first onset of its own motion (median and p90), and the fraction of
  segments that get one.

``--write`` also replaces this tool's section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import write_section  # noqa: E402

from streamtsm.engine.factory import build_engine  # noqa: E402
from streamtsm.postprocess import StreamPostprocessor  # noqa: E402
from streamtsm.preprocess import Preprocessor  # noqa: E402
from streamtsm.settings import RUN_DEFAULTS  # noqa: E402
from streamtsm.synthetic import MotionScene  # noqa: E402

FPS = 30.0  # the synthetic source's default rate
SIZE = (320, 240)  # the synthetic source's default frames


def measure(seconds: float, seeds: list[int], warmup: int) -> dict:
    """Step the demo model over ``seconds`` of the scene for each seed; the counts behind every figure."""
    engine = build_engine(threads=max(1, (os.cpu_count() or 2) - 1))
    labels = list(engine.labels)
    stride = max(1, int(engine.cfg.frame_interval))
    pre = Preprocessor.for_config(engine.cfg)
    total = int(round(seconds * FPS))
    steps = hits = late_steps = late_hits = shown_hits = late_shown_hits = 0
    onsets = right_onsets = segments = 0
    delays: list[float] = []
    for seed in seeds:
        scene = MotionScene(*SIZE, seed=seed)
        seg_len = scene.segment_frames
        post = StreamPostprocessor(labels, smooth=RUN_DEFAULTS["smooth"], topk=RUN_DEFAULTS["topk"],
                                   threshold=RUN_DEFAULTS["threshold"], hold=RUN_DEFAULTS["hold"])
        state = engine.zero_state(1)
        announced: set[int] = set()
        for t in range(0, total, stride):
            logits, state = engine.step(pre(scene.render(t))[None], state)
            truth = scene.motion_at(t)
            ok = labels[int(np.argmax(logits[0]))] == truth
            steps += 1
            hits += ok
            if t % seg_len >= warmup:
                late_steps += 1
                late_hits += ok
            topk, events = post.process(logits[0], t, t / FPS)
            shown = topk[0][0] == truth  # the published pred message's first label: the smoothed top-1
            shown_hits += shown
            late_shown_hits += shown and t % seg_len >= warmup
            for event in events:
                if event.kind != "onset":
                    continue
                onsets += 1
                right_onsets += event.label == truth
                segment = t // seg_len
                if event.label == truth and segment not in announced:
                    announced.add(segment)
                    delays.append((t - segment * seg_len) / FPS)
        segments += -(-total // seg_len)
    return {"steps": steps, "hits": hits, "late_steps": late_steps, "late_hits": late_hits,
            "shown_hits": shown_hits, "late_shown_hits": late_shown_hits, "onsets": onsets,
            "right_onsets": right_onsets, "segments": segments, "announced": len(delays), "delays": delays,
            "stride": stride, "model": engine.model_name, "backend": engine.backend}


def pct(n: int, d: int) -> str:
    return f"{100 * n / max(d, 1):.1f}%"


def report(r: dict, args: argparse.Namespace) -> str:
    d = sorted(r["delays"])
    p90 = d[min(len(d) - 1, int(round(0.9 * (len(d) - 1))))] if d else float("nan")
    median = statistics.median(d) if d else float("nan")
    return (
        f"Demo model `{r['model']}` ({r['backend']}), stepped on one frame in {r['stride']} of the synthetic scene "
        f"(320x240, 60-frame segments at 30 fps), seeds {args.seeds}, {args.seconds:g} s each, `run`'s default "
        f"post-processing (smooth {RUN_DEFAULTS['smooth']}, hold {RUN_DEFAULTS['hold']}).\n\n"
        "| figure | value |\n|---|---|\n"
        f"| top-1 of the published predictions (smoothed), every step | {pct(r['shown_hits'], r['steps'])} of "
        f"{r['steps']} steps |\n"
        f"| top-1 of the published predictions (smoothed), from {args.warmup} frames into each segment | "
        f"{pct(r['late_shown_hits'], r['late_steps'])} of {r['late_steps']} steps |\n"
        f"| top-1 of the model's raw output, every step | {pct(r['hits'], r['steps'])} |\n"
        f"| top-1 of the model's raw output, from {args.warmup} frames into each segment | "
        f"{pct(r['late_hits'], r['late_steps'])} |\n"
        f"| onset precision (onsets naming the motion on screen) | {pct(r['right_onsets'], r['onsets'])} of "
        f"{r['onsets']} onsets |\n"
        f"| segments announced by an onset of their motion | {pct(r['announced'], r['segments'])} of "
        f"{r['segments']} |\n"
        f"| delay from a segment's start to that onset, median / p90 | {median:.2f} s / {p90:.2f} s |\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="scene seconds per seed (default: 180)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="scene seeds (default: 0 1 2; run's "
                                                                            "synthetic source uses 0)")
    ap.add_argument("--warmup", type=int, default=24, help="frames into a segment for the second figure")
    ap.add_argument("--write", action="store_true", help="replace this tool's section of docs/benchmarks.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    r = measure(args.seconds, args.seeds, args.warmup)
    body = report(r, args)
    body += ("\nThe first row is what a viewer of the stream sees (the first label of each `pred` message). It is "
             "lower than the rows counted from a few frames into each segment because the motion changes every 2 s "
             "and the output follows it only after a delay: an online model carries its state from step to step, "
             "so after a change its cached features still hold the previous motion until a few frames of the new "
             f"one have gone through; and `run` averages the last {RUN_DEFAULTS['smooth']} outputs (0.8 s at 10 "
             "steps a second) before publishing. Onsets that name another motion are short-lived ones while the "
             "smoothed output crosses over from one motion to the next.\n"
             f"\nLoad average at the start {load:.2f}; took {time.perf_counter() - t0:.0f} s (frames are rendered, "
             "not paced by the clock, so the figures do not depend on the machine's speed).\n")
    print(body)
    if args.write:
        write_section("demo-model-live", "The demo model on the live synthetic scene: every step, onsets", body)


if __name__ == "__main__":
    main()
