"""Per-frame latency of the online TSM step vs the same network without shift vs recomputing an 8-frame clip.

Side by side in one run (interleaved), torch eager on CPU, batch 1, 224x224, writes docs/benchmarks.md.

    python tools/bench_tsm_step.py [--iterations 200] [--size 224]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import interleaved, summary, write_section  # noqa: E402

from streamtsm.models import create  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    torch.manual_seed(0)
    s = args.size

    online = create("tsm_mobilenetv2_online", num_classes=27)
    noshift = create("tsn_mobilenetv2", num_classes=27)
    noshift.load_state_dict(online.state_dict())
    clip_model = create("tsm_mobilenetv2_online", num_classes=27, num_segments=8)
    clip_model.load_state_dict(online.state_dict())

    frame = torch.randn(1, 3, s, s)
    window = torch.randn(1, 8, 3, s, s)
    state = [online.init_state(1, s, s)]

    def step_online():
        logits, state[0] = online.step(frame, state[0])

    cases = {
        "online TSM step (MobileNetV2, cached folds)": step_online,
        "same network without shift (TSN step)": lambda: noshift.step(frame, ()),
        "offline clip recompute per frame (8 frames)": lambda: clip_model(window),
    }
    with torch.inference_mode():
        times = interleaved(cases, args.iterations)

    base = summary(times["same network without shift (TSN step)"])[0]
    online_p50 = summary(times["online TSM step (MobileNetV2, cached folds)"])[0]
    clip_p50 = summary(times["offline clip recompute per frame (8 frames)"])[0]
    lines = ["| path | p50 ms | p99 ms | mean ms | p50 vs no-shift |", "|---|---|---|---|---|"]
    for name, samples in times.items():
        p50, p99, mean = summary(samples)
        lines.append(f"| {name} | {p50:.2f} | {p99:.2f} | {mean:.2f} | {p50 / base:.3f}x |")
    lines += [
        "",
        f"Online step overhead over the no-shift network: {100 * (online_p50 / base - 1):+.1f}% (target <= 5%).  ",
        f"Clip recompute / online step: {clip_p50 / online_p50:.1f}x (target >= 8x).",
        f"\nBatch 1, {s}x{s}, torch {torch.__version__} eager, {torch.get_num_threads()} threads, "
        f"{args.iterations} interleaved iterations after 5 warm-up runs each.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("tsm_step", "Online TSM step vs no shift vs clip recompute (CPU, torch eager)", body)


if __name__ == "__main__":
    main()
