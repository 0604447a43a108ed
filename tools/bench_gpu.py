"""The GPU path of the online MobileNetV2-TSM step: CUDA and TensorRT execution providers, fp32 and fp16, step latency
at batch 1-64 with the streaming state kept on the device through IOBinding, and the live 30-fps streams one GPU
sustains. One run prints the whole table; ``--write`` also writes it to docs/benchmarks.md.

    python tools/bench_gpu.py [--size 224] [--batches 1,2,4,8,16,32,64] [--iterations 200] [--budget 10]
                              [--providers tensorrt,cuda,cpu] [--cpu-iterations 5] [--write]

Every (provider, precision) is a row, whatever the machine: a provider that onnxruntime lacks, or that cannot run
here (no CUDA device, TensorRT libraries missing), is reported "not available" with the reason, and the CPU rows
(fp32 on the CPU provider, measured with few iterations) keep the script useful and testable on a machine without a
GPU.

What each row measures:

    step        one frame of each of B streams in ([B, 3, S, S] from host memory, as preprocessing leaves it),
                logits out to host memory, the state fed back: the state outputs are bound (IOBinding) to OrtValues
                preallocated on the device, two sets used in turn, so a step's new state is the next step's input
                without leaving the device
    no copies   the bound state outputs are device OrtValues after a step, and onnxruntime's profiler shows no
                Memcpy node in a step (a node placed on the CPU inside the graph would add one each way)
    fp16        CUDA: the fp32 export converted here (every float initializer and constant to float16, a Cast after
                each float input and before each float output, so the file's inputs, outputs and state stay float32
                as the engine expects; the state crosses steps as float32); TensorRT: the fp32 export with
                TensorRT's own fp16 flag. Agreement: top-1 of each row against onnxruntime fp32 on the CPU provider,
                on random frame sequences stepped with their state
    streams     live 30-fps streams one pipeline thread sustains: the largest batch whose step (p99) plus the
                batch's preprocessing (serial in that thread, measured here on one core) fits in 80% of the 33.3 ms
                frame period; and the GPU-bound figure, steps of the best batch back to back in the period (several
                pipelines or processes sharing the GPU, preprocessing on other cores)

No trained 224 checkpoint ships with streamtsm, so the network's weights are random with BN statistics measured on
synthetic frames (as in tools/bench_onnx.py): the speed is the architecture's, and the agreement is a check of the
fp16 graph, not an accuracy figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import AttributeProto, TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import load_average, random_but_calibrated  # noqa: E402
from benchlib import interleaved, summary, write_section  # noqa: E402

from streamtsm.engine.onnxruntime_engine import cuda_device_count  # noqa: E402
from streamtsm.formats import FRAME, LOGITS, META_PRECISION, add_metadata, read_metadata  # noqa: E402

EP = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
DEVICE = {"tensorrt": "cuda", "cuda": "cuda", "cpu": "cpu"}
PRECISIONS = ("fp32", "fp16")
PERIOD_MS = 1000 / 30
HEADROOM = 0.8  # share of the frame period a pipeline may plan to use; the rest absorbs jitter and publishing
FP16_MAX = float(np.finfo(np.float16).max)


# -- fp16 ---------------------------------------------------------------------------------------------------


def _half_tensor(tensor: TensorProto) -> TensorProto:
    # Values past float16's range would become inf; clipping keeps a huge weight huge instead.
    array = np.clip(numpy_helper.to_array(tensor), -FP16_MAX, FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(array, tensor.name)


def float16_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of a float32 graph whose inputs and outputs stay float32.

    Every float initializer and constant becomes float16, every ``Cast(to=float)`` casts to float16, and a Cast
    converts each float graph input on the way in and each float graph output on the way out, so the file keeps
    the interface (names, shapes, float32 types) of the fp32 export and any of its runners can run it.

    Raises:
        ValueError: the graph has subgraphs (If, Loop, Scan), which this conversion does not walk.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(_half_tensor(init))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                raise ValueError(f"node {node.name or node.op_type} has a subgraph; fp16 conversion walks flat graphs")
            if attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_half_tensor(attr.t))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16

    def is_float(value: onnx.ValueInfoProto) -> bool:
        return value.type.tensor_type.elem_type == TensorProto.FLOAT

    def rename(old: str, new: str, *, inputs: bool, outputs: bool) -> None:
        for node in graph.node:
            for names, on in ((node.input, inputs), (node.output, outputs)):
                if on:
                    for j, name in enumerate(names):
                        if name == old:
                            names[j] = new

    graph_inputs = {v.name for v in graph.input}
    tail = []
    for out in graph.output:
        if is_float(out) and out.name not in graph_inputs:
            inner = out.name + "_fp16"
            rename(out.name, inner, inputs=True, outputs=True)
            tail.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT, name=f"{inner}_to_fp32"))
    head = []
    for value in graph.input:
        if is_float(value):
            inner = value.name + "_fp16"
            rename(value.name, inner, inputs=True, outputs=False)
            head.append(helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT16,
                                         name=f"{value.name}_to_fp16"))
    nodes = [*head, *graph.node, *tail]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("value_info")  # the intermediate types changed; onnxruntime infers them again
    return model


def write_float16(fp32_path: Path, out_path: Path) -> Path:
    """The fp16 file of an fp32 export: :func:`float16_graph`, checked, metadata kept with precision ``fp16``."""
    model = float16_graph(onnx.load(str(fp32_path)))
    add_metadata(model, {META_PRECISION: "fp16"})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out_path))
    return out_path


# -- sessions -----------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """A (provider, precision) that cannot run on this machine; the message says why."""


@dataclass
class Row:
    """One (provider, precision): how it ran, or why it did not."""

    provider: str
    precision: str
    note: str = ""  # "not available: ..." when it did not run
    session: ort.InferenceSession | None = None
    setup_s: float = 0.0  # session creation and the first step (TensorRT builds its engine there)
    times: dict[int, list[float]] = field(default_factory=dict)  # batch -> step ms
    state_device: str = ""
    memcpy_per_step: float | None = None
    cpu_nodes: int | None = None
    agreement: float | None = None
    max_logit_diff: float | None = None
    errors: dict[int, str] = field(default_factory=dict)  # batch -> why its step failed

    @property
    def name(self) -> str:
        return f"{self.provider} {self.precision}"

    @property
    def available(self) -> bool:
        return self.session is not None


def provider_options(provider: str, precision: str, spec: list[tuple[str, tuple[int, ...]]], max_batch: int,
                     work: Path) -> list:
    """The providers list for a session: TensorRT with one optimization profile over batch 1..max_batch (one
    engine build for every batch), CUDA as its fallback for nodes TensorRT refuses."""
    if provider == "cpu":
        return [EP["cpu"]]
    cuda = (EP["cuda"], {"device_id": 0})
    if provider == "cuda":
        return [cuda]

    def shapes(batch: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in (batch, *shape))}" for name, shape in spec)

    cache = work / f"trt-{precision}"
    cache.mkdir(parents=True, exist_ok=True)
    trt = {"device_id": 0, "trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
           "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
           "trt_timing_cache_path": str(cache), "trt_max_workspace_size": 4 << 30,
           "trt_profile_min_shapes": shapes(1), "trt_profile_opt_shapes": shapes(min(8, max_batch)),
           "trt_profile_max_shapes": shapes(max_batch)}
    return [(EP["tensorrt"], trt), cuda]


def open_session(path: Path, provider: str, precision: str, spec, max_batch: int, work: Path, threads: int | None,
                 profile: bool = False) -> ort.InferenceSession:
    """A session on ``provider`` or :class:`Unavailable` with the reason; never a silent fall-back to another."""
    if EP[provider] not in ort.get_available_providers():
        raise Unavailable(f"onnxruntime {ort.__version__} here has no {EP[provider]}")
    if provider != "cpu" and cuda_device_count() == 0:
        raise Unavailable("no CUDA device on this machine")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(work / f"profile-{provider}-{precision}")
    try:
        session = ort.InferenceSession(str(path), options,
                                       providers=provider_options(provider, precision, spec, max_batch, work))
    except Exception as e:  # onnxruntime raises its own pybind types
        raise Unavailable(f"{EP[provider]} failed to open the model: {str(e).splitlines()[0][:160]}") from None
    used = session.get_providers()
    if used[0] != EP[provider]:
        raise Unavailable(f"{EP[provider]} did not load (onnxruntime fell back to {', '.join(used)}; its log says why)")
    return session


class DeviceStep:
    """Steps a batch of B streams with the state on the session's device: frames bound from host memory, logits
    bound to host memory, the state outputs bound to one of two preallocated device state sets while the other
    is the input, swapped after each step."""

    def __init__(self, session: ort.InferenceSession, spec, batch: int, device: str) -> None:
        self.session, self.spec, self.device = session, spec, device
        self.names = [name for name, _ in spec]
        self.outputs = ["new_" + name for name in self.names]
        # Uploaded zeros: ortvalue_from_shape_and_type would leave device memory uninitialized.
        self.sets = [[ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, *shape), np.float32), device, 0)
                      for _, shape in spec] for _ in range(2)]
        self.current = 0
        self.binding = session.io_binding()

    def step(self, frames: np.ndarray) -> np.ndarray:
        binding, now, new = self.binding, self.sets[self.current], self.sets[1 - self.current]
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input(FRAME, frames)
        for name, value in zip(self.names, now):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(LOGITS, "cpu")  # the one output the host needs each step
        for name, value in zip(self.outputs, new):
            binding.bind_ortvalue_output(name, value)
        self.session.run_with_iobinding(binding)
        self.current = 1 - self.current
        return binding.get_outputs()[0].numpy()

    def state_devices(self) -> set[str]:
        """Devices of the state outputs bound in the last step (what the next step reads)."""
        return {value.device_name().lower() for value in self.binding.get_outputs()[1:]}


def count_copies(session: ort.InferenceSession, steps: int) -> tuple[float, int]:
    """(Memcpy nodes per step, graph nodes run by the CPU provider) from a profiled session's trace, which
    :func:`open_session` with ``profile=True`` starts; ends the profiling."""
    trace = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    memcpy = sum(1 for e in nodes if e.get("args", {}).get("op_name", "").startswith("Memcpy"))
    on_cpu = {e["name"] for e in nodes if e.get("args", {}).get("provider") == EP["cpu"]}
    return memcpy / steps, len(on_cpu)


# -- measuring ----------------------------------------------------------------------------------------------


def preprocess_ms(size: int, resize: int, mean, std, repeats: int = 30) -> float:
    """Median ms to preprocess one 640x480 BGR frame into a batch row, one thread (what the pipeline does)."""
    from streamtsm.preprocess import Preprocessor

    pre = Preprocessor(size, resize, mean, std)
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    row = np.empty((3, size, size), np.float32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pre(image, out=row)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def agreement(rows: list[Row], reference: ort.InferenceSession, spec, size: int, sequences: int, steps: int,
              batch: int) -> None:
    """Top-1 agreement and max |logit difference| of each available row with ``reference`` (fp32, CPU) on random
    frame sequences stepped with their state: ``sequences`` runs of ``steps`` steps at ``batch`` streams."""
    rng = np.random.default_rng(1)
    for row in rows:
        if not row.available:
            continue
        same, total, worst = 0, 0, 0.0
        for _ in range(sequences):
            ours, ref = DeviceStep(row.session, spec, batch, DEVICE[row.provider]), DeviceStep(reference, spec, batch,
                                                                                               "cpu")
            for _ in range(steps):
                frames = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
                a, b = ours.step(frames), ref.step(frames)
                same += int((a.argmax(1) == b.argmax(1)).sum())
                total += batch
                worst = max(worst, float(np.abs(a - b).max()))
        row.agreement, row.max_logit_diff = same / total, worst


def measure(rows: list[Row], spec, size: int, batches: list[int], args) -> dict[int, int]:
    """Step times of every available row at every batch; device rows interleaved round-robin, as many rounds as
    fit in ``args.budget`` seconds (at most ``args.iterations``), CPU rows apart with ``args.cpu_iterations``.
    Returns the device rows' rounds per batch."""
    rng = np.random.default_rng(0)
    rounds = {}
    for batch in batches:
        frames = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        steppers = {row.name: DeviceStep(row.session, spec, batch, DEVICE[row.provider]) for row in rows
                    if row.available}

        def case(stepper: DeviceStep):
            return lambda: stepper.step(frames)

        cases, one_round = {}, 0.0
        for row in rows:
            if row.name not in steppers:
                continue
            try:  # a row that fails at one batch (out of memory, say) is reported there and timed at the others
                t0 = time.perf_counter()
                steppers[row.name].step(frames)
                one_round += (time.perf_counter() - t0) * (row.provider != "cpu")
                cases[row.name] = case(steppers[row.name])
            except Exception as e:  # onnxruntime raises its own pybind types
                row.errors[batch] = str(e).splitlines()[0][:160]
        device = {n: fn for n, fn in cases.items() if not n.startswith("cpu")}
        host = {n: fn for n, fn in cases.items() if n.startswith("cpu")}
        times = {}
        if device:
            rounds[batch] = int(min(args.iterations, max(args.min_iterations, args.budget / max(one_round, 1e-6))))
            times.update(interleaved(device, rounds[batch], warmup=args.warmup))
        if host:
            times.update(interleaved(host, args.cpu_iterations, warmup=1))
        for row in rows:
            if row.name in times:
                row.times[batch] = times[row.name]
        print(f"batch {batch}: " + ", ".join(f"{n} {summary(t)[0]:.2f} ms" for n, t in times.items()), flush=True)
    return rounds


def streams(row: Row, pre_ms: float) -> tuple[str, str]:
    """(one pipeline thread, steps back to back) live 30-fps streams of a measured row, as the module doc says;
    ``+`` where the largest batch measured decides, so a larger batch may give more."""
    budget = HEADROOM * PERIOD_MS
    p99 = {b: summary(t)[1] for b, t in sorted(row.times.items())}
    if not p99:
        return "-", "-"
    largest = max(p99)
    fits = [b for b, t in p99.items() if t + b * pre_ms <= budget]
    one = f"{fits[-1]}{'+' if fits[-1] == largest else ''}" if fits else "0"
    per_batch = {b: b * int(budget // t) for b, t in p99.items()}
    best = max(per_batch, key=lambda b: (per_batch[b], b))
    return one, f"{per_batch[best]}{'+' if best == largest and per_batch[best] else ''}"


# -- report -------------------------------------------------------------------------------------------------


def tables(rows: list[Row], batches: list[int], pre_ms: float) -> str:
    """The markdown tables: step latency per batch, then the per-row summary."""
    lines = ["| provider | precision | " + " | ".join(f"b{b} p50 / p99 ms" for b in batches) + " | best fps |",
             "|---|---|" + "---|" * len(batches) + "---|"]
    for row in rows:
        if not row.available:
            lines.append(f"| {row.provider} | {row.precision} | " + " | ".join("-" for _ in batches)
                         + f" | {row.note} |")
            continue
        cells = []
        for b in batches:
            p50, p99, _ = summary(row.times[b]) if b in row.times else (None, None, None)
            cells.append(("failed" if b in row.errors else "-") if p50 is None else f"{p50:.2f} / {p99:.2f}")
        fps = max((b * 1e3 / summary(t)[2] for b, t in row.times.items()), default=0.0)
        lines.append(f"| {row.provider} | {row.precision} | " + " | ".join(cells) + f" | {fps:.0f} |")
    lines += ["", "| provider | precision | state between steps | Memcpy nodes per step | nodes on CPU | top-1 vs fp32 "
              "CPU | max abs logit diff | 30-fps streams, one pipeline | 30-fps streams, steps back to back | setup s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if not row.available:
            lines.append(f"| {row.provider} | {row.precision} | {row.note} | - | - | - | - | - | - | - |")
            continue
        one, b2b = streams(row, pre_ms)
        lines.append(f"| {row.provider} | {row.precision} | {row.state_device} | {row.memcpy_per_step:g} | "
                     f"{'-' if row.provider == 'cpu' else row.cpu_nodes} | {100 * row.agreement:.1f}% | {row.max_logit_diff:.2e} | {one} | {b2b} | "
                     f"{row.setup_s:.1f} |")
    lines += [f"\n{row.name} failed at batch {b}: {why}" for row in rows for b, why in row.errors.items()]
    return "\n".join(lines)


def run(args, work: Path) -> tuple[str, list[Row]]:
    """Build, export, convert, open every row, verify, time; returns (report body, rows)."""
    import torch

    from streamtsm.export import calibration_frames, export_onnx
    from streamtsm.models import create

    torch.manual_seed(0)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    size, batches = args.size, sorted(set(args.batches))
    load_before = load_average()
    model = create("tsm_mobilenetv2_online", num_classes=27, input_size=size)
    random_but_calibrated(model, calibration_frames(model.cfg, "synthetic", num_frames=args.bn_frames,
                                                    sequence_length=8, seed=7))
    fp32 = export_onnx(model, work / "tsm.onnx")
    fp16_path = write_float16(Path(fp32.path), work / "tsm.fp16.onnx")
    spec = [(s["name"], tuple(s["shape"])) for s in read_metadata(fp32.path)["state"]]
    print(f"exported {fp32.path} (check {fp32.max_abs_diff:.2e}) and its fp16 copy", flush=True)

    rows = []
    for provider in args.providers:
        for precision in PRECISIONS:
            row = Row(provider, precision)
            # TensorRT takes the fp32 file and builds fp16 kernels itself (its flag); the others run the fp16 file.
            path = fp16_path if precision == "fp16" and provider != "tensorrt" else Path(fp32.path)
            try:
                t0 = time.perf_counter()
                row.session = open_session(path, provider, precision, spec, batches[-1], work, args.threads)
                DeviceStep(row.session, spec, 1, DEVICE[provider]).step(np.zeros((1, 3, size, size), np.float32))
                row.setup_s = time.perf_counter() - t0
                # The copy check: a profiled twin of the session, a few steps, the bound state's device.
                probe = open_session(path, provider, precision, spec, batches[-1], work, args.threads, profile=True)
                stepper = DeviceStep(probe, spec, 2, DEVICE[provider])
                frames = np.zeros((2, 3, size, size), np.float32)
                for _ in range(args.profile_steps):
                    stepper.step(frames)
                devices = stepper.state_devices()
                row.memcpy_per_step, row.cpu_nodes = count_copies(probe, args.profile_steps)
                where = "/".join(sorted(devices))
                if provider == "cpu":
                    row.state_device = "host (the CPU provider's device)"
                elif devices == {"cuda"} and row.memcpy_per_step == 0:
                    row.state_device = "on the GPU (cuda), no copies"
                else:
                    row.state_device = f"**copied**: {where}, {row.memcpy_per_step:g} Memcpy per step"
            except Unavailable as e:
                row.session, row.note = None, f"not available: {e}"
            except Exception as e:  # a provider that loads but fails on the first step is unavailable too
                row.session, row.note = None, f"not available: first step failed: {str(e).splitlines()[0][:160]}"
            print(f"{row.name}: {row.note or 'ready in %.1f s' % row.setup_s}", flush=True)
            rows.append(row)

    reference = open_session(Path(fp32.path), "cpu", "fp32", spec, batches[-1], work, args.threads)
    agreement(rows, reference, spec, size, args.agree_sequences, args.agree_steps, args.agree_batch)
    pre_ms = preprocess_ms(size, model.cfg.resize_size, model.cfg.mean, model.cfg.std)
    rounds = measure(rows, spec, size, batches, args)

    gpu = "none"
    if cuda_device_count() > 0:
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20).stdout.strip() or "a CUDA device"
        except (OSError, subprocess.SubprocessError):
            gpu = "a CUDA device (nvidia-smi not found)"
    missing = [row.name for row in rows if row.provider != "cpu" and not row.available]
    body = [
        f"Online MobileNetV2-TSM step at {size}x{size}, 27 classes, random weights (BN statistics from synthetic "
        f"frames). GPU: {gpu}.",
        "",
        *([f"**Still to be measured**: {', '.join(missing)} (see the reasons below); run this on a machine with a "
           "CUDA device and onnxruntime-gpu (TensorRT rows also need TensorRT's libraries) to fill them in.", ""]
          if missing else []),
        tables(rows, batches, pre_ms),
        "",
        f"Step: one frame of each of B streams in from host memory, logits out to host memory, the state bound "
        f"(IOBinding) to preallocated device OrtValues, two sets in turn, so it never leaves the device; device rows "
        f"interleaved round-robin after {args.warmup} warm-up steps, rounds per batch "
        f"{', '.join(f'{b}: {n}' for b, n in rounds.items()) or '-'} (as many as fit in {args.budget:g} s, "
        f"at most {args.iterations}); CPU rows {args.cpu_iterations} steps per batch after one warm-up. "
        f"fps = B / mean step time.  ",
        f"State between steps: the devices of the bound state outputs after {args.profile_steps} profiled steps at "
        "batch 2, and the Memcpy nodes onnxruntime's profiler recorded per step (0: nothing inside the graph moves "
        "between host and device; the frames in and logits out are the IOBinding's own copies). Nodes on CPU: "
        "graph nodes the CPU provider ran in a GPU row.  ",
        "fp16: CUDA runs the fp32 export converted by `float16_graph` (float16 weights and compute, float32 graph "
        "inputs and outputs: the state crosses steps in float32); TensorRT runs the fp32 export with "
        "`trt_fp16_enable`; CPU fp16 runs the converted file on the CPU provider, a check of the conversion rather "
        "than a speed (few of its CPU kernels are float16). fp32 rows allow TF32 where the provider does by "
        "default (CUDA's `use_tf32`, TensorRT). Top-1 agreement: each row against onnxruntime fp32 on the CPU provider, on "
        f"{args.agree_sequences} random frame sequences of {args.agree_steps} steps at batch {args.agree_batch}, "
        "state fed back.  ",
        f"Streams: preprocessing one 640x480 frame into a batch row takes {pre_ms:.2f} ms on one core here; "
        f"'one pipeline' is the largest measured batch B with step p99 + B x {pre_ms:.2f} ms <= "
        f"{HEADROOM:.0%} of 33.3 ms (+: the largest batch measured fits, so more may); 'steps back to back' "
        f"is max over B of B x floor({HEADROOM * PERIOD_MS:.1f} ms / step p99), preprocessing elsewhere (the "
        f"{os.cpu_count()} cores here preprocess at most {int(os.cpu_count() * HEADROOM * PERIOD_MS / pre_ms)} "
        "streams).  ",
        f"TensorRT: one optimization profile for batch 1..{batches[-1]} (opt {min(8, batches[-1])}), engine and "
        "timing caches in the run's work folder; setup s is session creation plus the first step (the engine "
        "build).  ",
        f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())}), torch {torch.__version__} "
        f"for the export (check vs torch {fp32.max_abs_diff:.2e}), `ORT_ENABLE_ALL`.  ",
        f"Load average (1/5/15 min) before: {load_before}, after: {load_average()} on {os.cpu_count()} cores.",
    ]
    return "\n".join(body), rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def ints(text: str) -> list[int]:
        values = [int(v) for v in text.split(",") if v.strip()]
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
        return values

    def providers(text: str) -> list[str]:
        names = [v.strip().lower() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in EP]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected any of {', '.join(EP)}, comma-separated, got {text!r}")
        return list(dict.fromkeys(names))

    ap.add_argument("--size", type=int, default=224, help="frame side S (default 224)")
    ap.add_argument("--batches", type=ints, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--providers", type=providers, default=["tensorrt", "cuda", "cpu"])
    ap.add_argument("--iterations", type=int, default=200, help="most timed rounds per batch (device rows)")
    ap.add_argument("--min-iterations", type=int, default=20, help="fewest timed rounds per batch (device rows)")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of timed rounds per batch (device rows)")
    ap.add_argument("--warmup", type=int, default=10, help="warm-up steps per row and batch (device rows)")
    ap.add_argument("--cpu-iterations", type=int, default=5, help="timed steps per batch of the CPU rows")
    ap.add_argument("--profile-steps", type=int, default=5, help="profiled steps for the copy check")
    ap.add_argument("--agree-sequences", type=int, default=4)
    ap.add_argument("--agree-steps", type=int, default=16)
    ap.add_argument("--agree-batch", type=int, default=4)
    ap.add_argument("--bn-frames", type=int, default=64, help="synthetic frames that set the BN statistics")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime and torch CPU threads (default: all)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the exported files (default: a temp folder)")
    ap.add_argument("--write", action="store_true", help="also write the section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.size < 32:
        ap.error(f"--size must be >= 32 (MobileNetV2 downsamples 32x), got {args.size}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        body, _ = run(args, work)
    print("\n" + body)
    if args.write:
        write_section("gpu", "Online TSM step on the GPU: CUDA and TensorRT, fp32 and fp16, state on the device", body)


if __name__ == "__main__":
    main()
