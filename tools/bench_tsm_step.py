"""Per-frame latency of the online TSM step vs the same network without shift vs recomputing an 8-frame clip.

Side by side in one run (interleaved), torch eager on CPU, batch 1, 224x224, writes docs/benchmarks.md.

    python tools/bench_tsm_step.py [--iterations 200] [--size 224]

With ``--onnx``: the exported step on onnxruntime instead, at batch 1 and 8, interleaved, wall and CPU time: the
shift as exported (slice + concatenation, the reference online demo's ``torch.cat((cache, x[:, fold:]))``), two
other graph forms of the same step that avoid slicing or concatenating the block input (identity 1x1 convolutions;
the block's first 1x1 conv split over the fold and the rest), and the same network without shift; plus the node
counts of the graphs onnxruntime actually runs (after its optimizations: a figure that does not move with load).

    python tools/bench_tsm_step.py --onnx [--iterations 200] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import interleaved, summary, write_section  # noqa: E402

from streamtsm.models import create  # noqa: E402
from streamtsm.models.shift import ShiftableBlock, TemporalShift  # noqa: E402


def optimized_ops(path: Path, work: Path) -> collections.Counter:
    """Op types of the graph onnxruntime runs for ``path`` (CPU provider, all optimizations, NCHWc layouts)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.optimized_model_filepath = str(work / (path.stem + ".optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


# -- shift forms measured against the exported one (same values; only the graph differs) ------------------------


LIBRARY_BLOCK_STEP = ShiftableBlock.step


def step_identity_convs(shift, x, cached):
    """TemporalShift.step without a slice or concat of the block input, which onnxruntime's blocked (NCHWc)
    convolutions cannot keep in their layout: new = conv1x1(x, I[:fold]); shifted = x + conv1x1(cached - new,
    I[:, :fold]) (channels < fold: cached, the rest: x)."""
    fold, channels = shift.fold, int(x.shape[1])
    eye = torch.eye(channels, dtype=x.dtype)
    new = F.conv2d(x, eye[:fold, :, None, None])
    return x + F.conv2d(cached - new, eye[:, :fold, None, None]), new


def _folded(conv, bn) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


def step_split_first_conv(block, x, cached):
    """ShiftableBlock.step of an inverted residual with its first 1x1 conv (BN folded) split over the fold and the
    rest, summed: no concat; the rest's weights see x whole with the fold's columns zeroed, so x is not sliced
    for the conv either."""
    conv, bn, act = block.conv[0], block.conv[1], block.conv[2]
    if conv.groups != 1 or conv.kernel_size != (1, 1):  # no 1x1 expansion (expand ratio 1): nothing to split
        return LIBRARY_BLOCK_STEP(block, x, cached)
    fold = block.shift.fold
    weight, bias = _folded(conv, bn)
    rest = torch.cat([torch.zeros_like(weight[:, :fold]), weight[:, fold:]], 1)
    hidden = act(F.conv2d(x, rest, bias) + F.conv2d(cached, weight[:, :fold]))
    return x + block.conv[3:](hidden), x[:, :fold]


def step_masks(shift, x, cached):
    """TemporalShift.step with every full-size tensor left to convolutions: shifted = conv1x1(cached, I[:, :fold])
    + depthwise1x1(x, 0 on the fold, 1 elsewhere), summed (onnxruntime fuses the sum into the first conv); the new
    fold is conv1x1(x, I[:fold]). No Sub, unlike the identity-convs form."""
    fold, channels = shift.fold, int(x.shape[1])
    eye = torch.eye(channels, dtype=x.dtype)
    keep = torch.ones(channels, dtype=x.dtype)
    keep[:fold] = 0
    shifted = F.conv2d(cached, eye[:, :fold, None, None]) + F.conv2d(x, keep[:, None, None, None], groups=channels)
    return shifted, F.conv2d(x, eye[:fold, :, None, None])


def step_split_hardsigmoid(block, x, cached):
    """The split-first-conv form with its ReLU6 written as 6 * HardSigmoid(z - 3), which onnxruntime fuses into a
    blocked convolution after a sum (it fuses Relu, Sigmoid, Tanh and HardSigmoid there, not Clip); the factor 6
    goes into the depth-wise conv's weights and the -3 into the first conv's bias."""
    conv = block.conv[0]
    if conv.groups != 1 or conv.kernel_size != (1, 1):
        return LIBRARY_BLOCK_STEP(block, x, cached)
    fold, channels = block.shift.fold, int(x.shape[1])
    weight, bias = _folded(conv, block.conv[1])
    rest = torch.cat([torch.zeros_like(weight[:, :fold]), weight[:, fold:]], 1)
    unit = F.hardsigmoid(F.conv2d(x, rest, bias - 3) + F.conv2d(cached, weight[:, :fold]))  # relu6(z) / 6
    dw = block.conv[3]
    dw_weight, dw_bias = _folded(dw, block.conv[4])
    hidden = block.conv[5](F.conv2d(unit, 6 * dw_weight, dw_bias, stride=dw.stride, padding=dw.padding,
                                    groups=dw.groups))
    new = F.conv2d(x, torch.eye(channels, dtype=x.dtype)[:fold, :, None, None])
    return x + block.conv[6:](hidden), new


FORMS = {step_identity_convs: TemporalShift, step_split_first_conv: ShiftableBlock, step_masks: TemporalShift,
         step_split_hardsigmoid: ShiftableBlock}


@contextlib.contextmanager
def shift_form(step):
    """Run (and export) the online step with ``step`` in place of the library's (None: the library's)."""
    owner = FORMS.get(step)
    original = owner.step if owner else None
    if owner:
        owner.step = step
    try:
        yield
    finally:
        if owner:
            owner.step = original


def onnx_forms(args: argparse.Namespace) -> str:
    """The --onnx comparison; returns the section body."""
    import onnxruntime as ort

    from streamtsm.export import export_onnx

    s = args.size
    load_before = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    online = create("tsm_mobilenetv2_online", num_classes=27, input_size=s)
    noshift = create("tsn_mobilenetv2", num_classes=27, input_size=s)
    noshift.load_state_dict(online.state_dict())
    forms = {"concat": ("online TSM, slice + concat (as exported; the reference demo's form)", None),
             "convs": ("online TSM, identity 1x1 convs instead", step_identity_convs),
             "masks": ("online TSM, fold mask and embedding as 1x1 convs", step_masks),
             "split": ("online TSM, first 1x1 conv split over fold and rest", step_split_first_conv),
             "split_hs": ("online TSM, split first conv, ReLU6 as HardSigmoid (fused)", step_split_hardsigmoid),
             "none": ("same network without shift (TSN)", None)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reports = {}
        for form, (_, step) in forms.items():
            with shift_form(step):
                reports[form] = export_onnx(noshift if form == "none" else online, work / f"{form}.onnx")
        ops = {form: optimized_ops(Path(r.path), work) for form, r in reports.items()}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1  # the step runs on the calling thread, so its CPU time is measurable
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        sessions = {form: ort.InferenceSession(r.path, options, providers=["CPUExecutionProvider"])
                    for form, r in reports.items()}
        rng = np.random.default_rng(0)
        wall, cpu = {}, {}
        for batch in args.batches:
            cases = {}
            for form, sess in sessions.items():
                feeds = {v.name: rng.standard_normal([batch, *v.shape[1:]], dtype=np.float32)
                         for v in sess.get_inputs()}
                cases[form] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)
            for fn in cases.values():
                for _ in range(5):
                    fn()
            wall[batch], cpu[batch] = {f: [] for f in cases}, {f: [] for f in cases}
            for _ in range(args.iterations):
                for form, fn in cases.items():
                    t0, c0 = time.perf_counter(), time.thread_time()
                    fn()
                    cpu[batch][form].append((time.thread_time() - c0) * 1e3)
                    wall[batch][form].append((time.perf_counter() - t0) * 1e3)
            print(f"batch {batch}: " + ", ".join(f"{f} {summary(t)[0]:.2f} ms" for f, t in wall[batch].items()),
                  flush=True)

    def ratio(times: dict, batch: int, form: str) -> str:
        return f"{summary(times[batch][form])[0] / summary(times[batch]['none'])[0]:.3f}x"

    lines = ["| graph | " + " | ".join(f"b{b} p50 ms | b{b} / no-shift, wall | b{b} / no-shift, CPU time"
                                       for b in args.batches)
             + " | nodes run | Reorder / Split, Slice / Concat / Clip, Sub alone | export check |",
             "|---|" + "---|---|---|" * len(args.batches) + "---|---|---|"]
    for form, (name, _) in forms.items():
        row = [name]
        for b in args.batches:
            row += [f"{summary(wall[b][form])[0]:.2f}", ratio(wall, b, form), ratio(cpu, b, form)]
        c = ops[form]
        row += [str(sum(c.values())),
                f"{c['ReorderInput'] + c['ReorderOutput']} / {c['Split'] + c['Slice']} / {c['Concat']} / "
                f"{c['Clip'] + c['Sub']}",
                f"{reports[form].max_abs_diff:.1e}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"{s}x{s}, random weights, onnxruntime {ort.__version__} CPU provider, 1 intra-op thread (no spinning), "
        f"`ORT_ENABLE_ALL`; {args.iterations} interleaved rounds per batch after 5 warm-up runs each; ratios of "
        "medians. CPU time: the calling thread's (`time.thread_time`), which onnxruntime runs the whole step on "
        "with one intra-op thread: it leaves out the time the thread waits for a core, so it moves less with the "
        "machine's load than wall time. Nodes run: the graph after onnxruntime's optimizations (BN folded, "
        "ReLU6 and residual adds fused into its NCHWc convolutions); Reorder: its NCHW <-> NCHWc conversions; "
        "Clip, Sub alone: activations left unfused and the convs form's subtractions. Export check: max "
        "|onnxruntime - torch| of `export_onnx` (all forms pass it).  ",
        f"Load average (1/5/15 min) before: {load_before}, after: "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores.",
        "",
        "What the forms show (the node counts hold on any load): onnxruntime's CPU provider runs convolutions in a "
        "blocked NCHWc layout and has no blocked Slice or Split (its blocked Concat needs every input's channels a "
        "multiple of the block, 16 here with AVX-512, and the folds are 3 to 20 channels), so the exported slice + "
        "concat costs each of the 10 shifted blocks a conversion of the block input out of the blocked layout, the "
        "split, the concatenation and a conversion back (the 40 extra nodes). Every other form also adds about four "
        "nodes per block, since the state is a graph input and output in NCHW: a node that makes the new fold and "
        "its conversion out, and at least two that combine the cached fold with the block input. The identity-convs "
        "and masks forms keep every full-size tensor blocked but their extra convolutions cost as much as the "
        "conversions they remove. Splitting the first conv over the fold and the rest leaves the ReLU6 (Clip) after "
        "the sum unfused (onnxruntime fuses only Relu, Sigmoid, Tanh and HardSigmoid after a sum into a blocked "
        "convolution), so the 6x wider hidden tensor leaves the blocked layout; written as HardSigmoid it fuses, "
        "but the fold's own convolution then writes that 6x wider tensor, which costs more than the shift saved. "
        "Measured at batch 1 the per-node overhead (a few microseconds each, more than the data they move at 7x7 "
        "and 14x14) dominates; at batch 8 the data. The export keeps the slice + concat form, the reference online "
        "demo's, unless a form measures faster.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--onnx", action="store_true", help="the exported step on onnxruntime, shift forms compared")
    ap.add_argument("--batches", type=lambda t: [int(b) for b in t.split(",")], default=[1, 8],
                    help="batches of the --onnx comparison (default 1,8)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    if args.onnx:
        torch.manual_seed(0)
        body = onnx_forms(args)
        print(body)
        if not args.no_write:
            write_section("shift_graph", "The shift in the exported graph: forms of the online step measured "
                          "(CPU, onnxruntime)", body)
        return
    torch.manual_seed(0)
    s = args.size
    load_before = " / ".join(f"{x:.1f}" for x in os.getloadavg())

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
        f"{args.iterations} interleaved iterations after 5 warm-up runs each.  ",
        f"Load average (1/5/15 min) before: {load_before}, after: "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("tsm_step", "Online TSM step vs no shift vs clip recompute (CPU, torch eager)", body)


if __name__ == "__main__":
    main()
