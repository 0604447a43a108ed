"""Online MobileNetV2-TSM step on CPU: torch eager vs onnxruntime fp32 vs int8, and the no-shift network (TSN)
exported the same way; per-step latency at batch 1 and 8 and frames/s at batch 1/4/8/16, interleaved in one run.
Also the int8 top-1 agreement with fp32 on held-out synthetic sequences stepped frame by frame.

    python tools/bench_onnx.py [--size 224] [--iterations 200] [--budget 40] [--threads 2] [--calib-frames 192]
                               [--no-write]

No trained 224 checkpoint ships with streamtsm, so the 224 network's weights are random: convolutions as
initialized, BN statistics measured on synthetic frames (so activations have the scale of a trained network), a
classifier with unit-scale random weights. The int8 agreement is also measured on the shipped demo model (trained,
at its own input size) on held-out live-scene sequences: the figure for a trained network.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import interleaved, summary, write_section  # noqa: E402

from streamtsm.engine.onnxruntime_engine import OrtOnlineEngine  # noqa: E402
from streamtsm.engine.torch_engine import TorchOnlineEngine  # noqa: E402
from streamtsm.export import calibration_frames, export_onnx, quantize_int8  # noqa: E402
from streamtsm.models import create  # noqa: E402

BATCHES = (1, 4, 8, 16)
LATENCY_BATCHES = (1, 8)


def step_cases(engines: dict, frames: np.ndarray) -> dict:
    """One timed case per engine: a step on ``frames`` ([B, 3, S, S]) with that engine's state fed back."""
    cases = {}
    for name, engine in engines.items():
        state = [engine.zero_state(len(frames))]

        def step(engine=engine, state=state):
            _, state[0] = engine.step(frames, state[0])

        cases[name] = step
    return cases


def random_but_calibrated(model: nn.Module, sequences: np.ndarray, seed: int = 0) -> nn.Module:
    """BN statistics measured on ``sequences`` [N, 8, 3, S, S] (the offline uni-directional form), a random
    unit-scale classifier: a network whose logits depend on the input, as a trained one's do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over all batches
        model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=g) / model.fc.weight.shape[1] ** 0.5)
        model.fc.bias.zero_()
        model.train()
        for i in range(0, len(sequences), 2):
            model(torch.from_numpy(sequences[i : i + 2]))
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1
    return model


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run(args: argparse.Namespace, work: Path) -> str:
    """Build, export, quantize and time; returns the section body."""
    torch.manual_seed(0)
    threads = args.threads
    torch.set_num_threads(threads)
    s = args.size
    load_before = load_average()
    # The previous benchmark of a series leaves about one core's worth in the 1-minute average; more than that
    # means something else was running.
    busy = os.getloadavg()[0] > 0.75 * (os.cpu_count() or 1)

    online = create("tsm_mobilenetv2_online", num_classes=27, input_size=s)
    bn_frames = calibration_frames(online.cfg, "synthetic", num_frames=64, sequence_length=8, seed=7)
    random_but_calibrated(online, bn_frames)
    noshift = create("tsn_mobilenetv2", num_classes=27, input_size=s)
    noshift.load_state_dict(online.state_dict())

    fp32 = export_onnx(online, work / "tsm.onnx")
    tsn = export_onnx(noshift, work / "tsn.onnx")
    calib = calibration_frames(online.cfg, "synthetic", num_frames=args.calib_frames, sequence_length=32, seed=0)
    holdout = calibration_frames(online.cfg, "synthetic", num_frames=192, sequence_length=48, seed=1)
    q = quantize_int8(fp32.path, work / "tsm.int8.onnx", calib, holdout_frames=holdout, threads=threads)
    # Control: the same weights without shift, quantized the same way: tells int8 error of the network from the
    # state path's.
    q_tsn = quantize_int8(tsn.path, work / "tsn.int8.onnx", calib, holdout_frames=holdout, threads=threads)
    print(f"exported: fp32 max abs diff {fp32.max_abs_diff:.2e}, int8 agreement {q['top1_agreement']:.4f}",
          flush=True)

    engines = {
        "torch eager, online TSM": TorchOnlineEngine(online),
        "onnxruntime fp32, online TSM": OrtOnlineEngine(fp32.path, "cpu", threads=threads),
        "onnxruntime int8, online TSM": OrtOnlineEngine(q["path"], "cpu", threads=threads),
        "onnxruntime fp32, no shift (TSN)": OrtOnlineEngine(tsn.path, "cpu", threads=threads),
        "torch eager, no shift (TSN)": TorchOnlineEngine(noshift),
    }
    rng = np.random.default_rng(0)
    results: dict[int, dict[str, list[float]]] = {}
    iterations: dict[int, int] = {}
    for batch in BATCHES:
        frames = rng.standard_normal((batch, 3, s, s), dtype=np.float32)
        cases = step_cases(engines, frames)
        with torch.inference_mode():
            t0 = time.perf_counter()
            for fn in cases.values():
                fn()
            round_s = time.perf_counter() - t0
            iterations[batch] = int(min(args.iterations, max(10, args.budget / round_s)))
            results[batch] = interleaved(cases, iterations[batch], warmup=5)
        print(f"batch {batch}: {iterations[batch]} interleaved rounds", flush=True)

    lines = ["| path | b1 p50 ms | b1 p99 ms | b8 p50 ms | b8 p99 ms | fps b1 | fps b4 | fps b8 | fps b16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in engines:
        row = [name]
        for b in LATENCY_BATCHES:
            p50, p99, _ = summary(results[b][name])
            row += [f"{p50:.2f}", f"{p99:.2f}"]
        row += [f"{b * 1e3 / summary(results[b][name])[2]:.0f}" for b in BATCHES]
        lines.append("| " + " | ".join(row) + " |")

    def ratio(a: str, b: str, batch: int) -> float:
        return summary(results[batch][a])[0] / summary(results[batch][b])[0]

    ort32, ort8, ort_tsn = (f"onnxruntime {p}" for p in ("fp32, online TSM", "int8, online TSM",
                                                          "fp32, no shift (TSN)"))
    shift = [ratio(ort32, ort_tsn, b) for b in LATENCY_BATCHES]
    int8 = [ratio(ort8, ort32, b) for b in LATENCY_BATCHES]
    agree = q["top1_agreement"]
    lines += [
        "",
        "| target | batch 1 | batch 8 | met |",
        "|---|---|---|---|",
        f"| onnxruntime fp32 step / no-shift step (p50) <= 1.05 | {shift[0]:.3f} | {shift[1]:.3f} | "
        f"{'yes' if max(shift) <= 1.05 else 'no'} |",
        f"| int8 step / fp32 step (p50) <= 0.70 | {int8[0]:.3f} | {int8[1]:.3f} | "
        f"{'yes' if max(int8) <= 0.70 else 'no'} |",
        f"| int8 top-1 agreement with fp32 >= 98% | {100 * agree:.1f}% over {q['holdout_predictions']} frames | | "
        f"{'yes' if agree >= 0.98 else 'no'} |",
        "",
        f"Per-step latency (one frame of each of B streams, state fed back) at {s}x{s}; fps = B / mean step time. "
        f"All cases through the engines (`TorchOnlineEngine`, `OrtOnlineEngine`), interleaved round-robin after 5 "
        f"warm-up steps each; rounds per batch {', '.join(f'{b}: {n}' for b, n in iterations.items())} (as many as "
        f"fit in {args.budget:.0f} s, at most {args.iterations}).  ",
        f"torch {torch.__version__} eager, {threads} threads, inference_mode. onnxruntime {ort.__version__}, "
        f"CPUExecutionProvider, `intra_op_num_threads={threads}`, `ORT_ENABLE_ALL` graph optimizations, default "
        "spinning; graphs from `export_onnx` (TorchScript exporter, opset 17, BN folded into convs).  ",
        f"int8: `quantize_int8`, static QDQ, per-channel int8 weights, uint8 activations, min/max calibration on "
        f"{q['calibration_inputs']} (frame, state) inputs collected by stepping the fp32 model through "
        f"{len(calib)} synthetic sequences of 32 frames; graph I/O (state included) stays float32; file "
        f"{q['size_bytes'] / 1e6:.1f} MB vs {q['fp32_size_bytes'] / 1e6:.1f} MB.  ",
        "Agreement at 224: no trained 224 checkpoint ships with streamtsm, so this network is **randomly "
        "initialized** (BN statistics measured on synthetic frames, unit-scale random classifier, 27 classes), and "
        f"the held-out data are {len(holdout)} synthetic sequences of 48 frames (another seed than calibration) "
        f"stepped frame by frame through both models; max abs logit difference {q['max_abs_logit_diff']:.3f}, mean "
        f"{q['mean_abs_logit_diff']:.3f}, against a per-frame logit spread (std over classes) of "
        f"{q['logit_std']:.3f}. Control: the no-shift network with the same weights, quantized the same way, agrees "
        f"{100 * q_tsn['top1_agreement']:.1f}% (mean abs logit difference {q_tsn['mean_abs_logit_diff']:.3f}), so the "
        "disagreement is int8 of this random MobileNetV2, not the state path; the trained model below is the figure "
        "that speaks for deployment.  ",
        f"Export check: onnxruntime vs torch max abs difference {fp32.max_abs_diff:.2e} (TSM), "
        f"{tsn.max_abs_diff:.2e} (TSN).  ",
        f"Load average (1/5/15 min) before: {load_before}, after: {load_average()} on {os.cpu_count()} cores"
        + (": **the machine was loaded before the run** (1-minute load above 0.75 per core); absolute times move "
           "with the load, the interleaved ratios much less "
           "(threads above 1 suffer most: idle-waiting workers get descheduled)." if busy else "."),
    ]
    lines += trained_agreement(work, threads)
    body = "\n".join(lines)
    return body


def trained_agreement(work: Path, threads: int) -> list[str]:
    """int8 vs fp32 on the shipped demo model, a trained online TSM: top-1 agreement on held-out live-scene
    sequences (the synthetic source's frames, stepped frame by frame at the model's stride) and the step times."""
    from streamtsm.engine.factory import DEMO_WEIGHTS
    from streamtsm.models import load

    if not DEMO_WEIGHTS.is_file():
        return ["", "No demo model shipped: no trained-model agreement figure."]
    model = load(DEMO_WEIGHTS)
    stride = model.cfg.frame_interval
    fp32 = export_onnx(model, work / "demo.onnx")
    # Calibration and hold-out: the live scene at the model's stride (every stride-th frame of 320x240 frames),
    # other seeds for the hold-out; sequences span several motions, as a camera's do.
    calib = calibration_frames(model.cfg, "synthetic", num_frames=256 * stride, sequence_length=32 * stride, seed=0)
    holdout = calibration_frames(model.cfg, "synthetic", num_frames=4 * 180 * stride, sequence_length=180 * stride,
                                 seed=1)
    calib, holdout = calib[:, ::stride], holdout[:, ::stride]
    q = quantize_int8(fp32.path, work / "demo.int8.onnx", calib, holdout_frames=holdout, threads=threads)
    engines = {"fp32": OrtOnlineEngine(fp32.path, "cpu", threads=threads),
               "int8": OrtOnlineEngine(q["path"], "cpu", threads=threads)}
    times = {}
    for batch in (1, 8):
        frames = np.random.default_rng(0).standard_normal((batch, 3, model.cfg.input_size, model.cfg.input_size),
                                                         dtype=np.float32)
        cases = step_cases(engines, frames)
        t = interleaved(cases, 300, warmup=10)
        times[batch] = {name: summary(v)[0] for name, v in t.items()}
    agree = q["top1_agreement"]
    ratio = [times[b]["int8"] / times[b]["fp32"] for b in (1, 8)]
    return [
        "",
        f"Trained model (the shipped demo, `{model.cfg.name}` at {model.cfg.input_size}x{model.cfg.input_size}, "
        f"{model.cfg.num_classes} classes, stepped on one frame in {stride}):",
        "",
        "| target | value | met |",
        "|---|---|---|",
        f"| int8 top-1 agreement with fp32 >= 98% | {100 * agree:.1f}% over {q['holdout_predictions']} frames | "
        f"{'yes' if agree >= 0.98 else 'no'} |",
        f"| int8 step / fp32 step (p50), batch 1 and 8 | {ratio[0]:.3f}, {ratio[1]:.3f} "
        f"({times[1]['int8']:.2f} / {times[1]['fp32']:.2f} ms, {times[8]['int8']:.2f} / {times[8]['fp32']:.2f} ms) | "
        f"{'yes' if max(ratio) <= 0.70 else 'no'} |",
        "",
        f"Calibration on {q['calibration_inputs']} (frame, state) inputs of the live scene (seed 0); hold-out: "
        f"{len(holdout)} sequences of {holdout.shape[1]} steps (seed 1, each through several motions), every step "
        f"of both models compared; max abs logit difference {q['max_abs_logit_diff']:.3f}, mean "
        f"{q['mean_abs_logit_diff']:.3f}, per-step logit spread {q['logit_std']:.3f}. "
        f"Export check {fp32.max_abs_diff:.2e}. "
        f"At this size the step is small and fixed costs weigh more, so the int8 speed-up is smaller than at 224.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iterations", type=int, default=200, help="most timed rounds per batch size")
    ap.add_argument("--budget", type=float, default=40.0,
                    help="seconds of timed rounds per batch size (fewer rounds than --iterations when slower)")
    ap.add_argument("--calib-frames", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default: 2)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as work:
        body = run(args, Path(work))
    print(body)
    if not args.no_write:
        write_section("onnx", "Online TSM step: torch vs onnxruntime fp32 vs int8 (CPU)", body)


if __name__ == "__main__":
    main()
