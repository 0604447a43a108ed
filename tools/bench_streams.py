"""How many live 30 fps streams one process sustains in real time: the online MobileNetV2-TSM at 224 on
onnxruntime (fp32 and int8), capture->publish latency at that load, and memory per stream.

    python tools/bench_streams.py [--streams 1,2,4,6,8,10,12,16] [--precision fp32,int8] [--seconds 20]
                                  [--warmup 5] [--threads N] [--lanes N] [--live-buffer N] [--compare 8,12]
                                  [--spinning] [--phase staggered|aligned] [--calib-frames 192] [--no-write]

For each precision and each N of the schedule (stopping after two failures in a row) the real pipeline runs N
synthetic 320x240 scenes paced at 30 fps (distinct seeds), each capture thread preprocessing its frames, one batched
``OrtOnlineEngine``, a ZeroMQ publisher on tcp://127.0.0.1:* sending on its own thread (as ``streamtsm run`` does)
and a subscriber reading everything in a thread. The first ``--warmup`` seconds are excluded;
the figures cover the next ``--seconds``. Counters come from the stats the pipeline publishes every second (taken
by a sink, in the pipeline's own thread, so they are consistent snapshots), latencies from the pred messages the
subscriber receives. Each precision runs in a fresh process, so that its RSS growth is its own.

A load is sustained when, over the measured window: no frame was dropped (the stats' ``dropped``), every source
delivered its 30 fps (>= 98%: a starved synthetic renderer makes fewer frames, which no counter would show), no
message was refused by the publisher, no step error or reconnect happened, and latency did not grow (the p50 of
the last third of the window <= 1.5 x the first third's + 5 ms, both capture->publish and capture->subscriber).

No trained checkpoint ships with streamtsm: the weights are random but calibrated as in tools/bench_onnx.py, which
changes nothing in the cost of a step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import random_but_calibrated  # noqa: E402
from benchlib import (SubscriberThread, cpu_ticks, interleaved, pct, rss_mb, steal_share, thread_cpu,  # noqa: E402
                      thread_delta, write_section)

from streamtsm.capture import CaptureThread, FrameBuffer, SyntheticSource, opencv_on_calling_threads  # noqa: E402
from streamtsm.config import ModelConfig  # noqa: E402
from streamtsm.engine.factory import default_threads  # noqa: E402
from streamtsm.engine.onnxruntime_engine import OrtOnlineEngine  # noqa: E402
from streamtsm.export import calibration_frames, export_onnx, quantize_int8, read_metadata  # noqa: E402
from streamtsm.labels import numbered_labels  # noqa: E402
from streamtsm.models import create  # noqa: E402
from streamtsm.pipeline import Pipeline, PipelineOptions, StreamSpec, default_lanes  # noqa: E402
from streamtsm.postprocess import LatencyTracker, RateMeter, StreamPostprocessor  # noqa: E402
from streamtsm.preprocess import Preprocessor  # noqa: E402
from streamtsm.publish import TOPIC_STATS, Publisher, stats_message  # noqa: E402
from streamtsm.settings import RUN_DEFAULTS  # noqa: E402
from streamtsm.synthetic import MotionScene  # noqa: E402

WIDTH, HEIGHT, FPS = 320, 240, 30.0
TARGET_STREAMS = 8
STATS_INTERVAL = 1.0  # what `streamtsm run` publishes by default
MIN_CAPTURE_RATIO = 0.98
GROWTH_FACTOR, GROWTH_SLACK_MS = 1.5, 5.0


# -- sources --------------------------------------------------------------------------------------------------


class PhasedSyntheticSource(SyntheticSource):
    """The synthetic scene with its frame clock started ``phase_s`` late: independent cameras are not
    frame-synchronized, so N streams started together would batch unrealistically well."""

    def __init__(self, seed: int, phase_s: float) -> None:
        super().__init__(WIDTH, HEIGHT, FPS, seed=seed)
        self.phase_s = phase_s

    def open(self) -> None:
        time.sleep(self.phase_s)  # benchmark only: shifts this camera's exposure times by a fraction of a frame
        super().open()


def stream_specs(n: int, phase: str) -> list[StreamSpec]:
    def factory(i: int):
        offset = i / n / FPS if phase == "staggered" else 0.0
        return lambda: PhasedSyntheticSource(seed=i, phase_s=offset)

    return [StreamSpec(factory(i), f"cam{i}") for i in range(n)]


# -- what is observed -----------------------------------------------------------------------------------------


class Deliveries(SubscriberThread):
    """A subscriber thread reading everything the publisher sends; keeps the pred messages of the current case."""

    def __init__(self, endpoint: str) -> None:
        # (publish_ts, capture_ts, capture->publish ms, capture->receive ms)
        self._preds: list[tuple[float, float, float, float]] = []
        super().__init__(endpoint)

    def on_message(self, received: float, payload: dict) -> None:
        if payload.get("type") == "pred":
            self._preds.append((payload["publish_ts"], payload["capture_ts"], payload["latency_ms"],
                                (received - payload["capture_ts"]) * 1e3))

    def take(self) -> list[tuple[float, float, float, float]]:
        with self.lock:
            out, self._preds = self._preds, []
        return out

    def drain(self, quiet_s: float = 0.3, limit_s: float = 3.0) -> None:
        """Wait until nothing arrived for ``quiet_s`` (the tail of a run is still in flight), at most ``limit_s``."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and time.monotonic() - self.last_recv < quiet_s:
            time.sleep(0.05)


def connect(publisher: Publisher, deliveries: Deliveries, timeout: float = 5.0) -> None:
    """Send probes until the subscriber sees one: a ZeroMQ subscription takes a moment to reach the publisher."""
    deadline = time.monotonic() + timeout
    while not deliveries.ready.is_set():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the subscriber received nothing from {publisher.endpoint} in {timeout:g} s")
        publisher.send(TOPIC_STATS, stats_message(streams={}))
        deliveries.ready.wait(0.05)


class StatsSnapshots:
    """A pipeline sink keeping every stats message with the process's clock, CPU time and RSS at that moment.

    The pipeline calls it under its lock (from lane 1's thread, between its steps), so each snapshot is consistent.
    """

    def __init__(self) -> None:
        self.items: list[dict] = []

    def on_message(self, topic: str, payload: dict) -> None:
        if payload.get("type") == "stats" and payload.get("streams"):
            self.items.append({"mono": time.monotonic(), "wall": payload["publish_ts"], "cpu": time.process_time(),
                               "rss": rss_mb(), "streams": payload["streams"], "models": payload["models"],
                               "publish_dropped": payload["publish_dropped"]})

    def close(self) -> None:
        pass


# -- one case -------------------------------------------------------------------------------------------------


def _grows(first: float, last: float) -> bool:
    return last > GROWTH_FACTOR * first + GROWTH_SLACK_MS


def run_case(engine: OrtOnlineEngine, n: int, args: argparse.Namespace, publisher: Publisher,
             deliveries: Deliveries, lanes: int | None = None, live_buffer: int | None = None) -> dict:
    """N live streams in ``lanes`` lanes (default ``args.lanes``), each source holding ``live_buffer`` frames
    (default ``args.live_buffer``), for warm-up + window; the figures of the window."""
    snapshots = StatsSnapshots()
    # Two stats intervals of margin, so that a periodic snapshot falls near warm-up + seconds whatever the drift.
    duration = args.warmup + args.seconds + 2 * STATS_INTERVAL + 0.5
    pipeline = Pipeline(engine, stream_specs(n, args.phase), sinks=[publisher, snapshots],
                        options=PipelineOptions(duration=duration, stats_interval=STATS_INTERVAL,
                                                lanes=lanes or args.lanes,
                                                live_buffer=live_buffer or args.live_buffer))
    gc.collect()
    deliveries.take()
    pipeline.start()
    t0 = time.monotonic()
    ticks: dict[str, tuple] = {}
    # Steal and the threads' CPU over the measured window, sampled by timers at its edges (the pipeline's thread is
    # busy running).
    edges = [threading.Timer(args.warmup, lambda: ticks.__setitem__("start", (cpu_ticks(), thread_cpu(_role)))),
             threading.Timer(args.warmup + args.seconds,
                             lambda: ticks.__setitem__("end", (cpu_ticks(), thread_cpu(_role))))]
    for timer in edges:
        timer.daemon = True
        timer.start()
    pipeline.run()
    for timer in edges:
        timer.cancel()
    deliveries.drain()
    preds = deliveries.take()

    periodic = [s for s in snapshots.items if s["mono"] < t0 + duration - 0.05
                and all(v["status"] == "running" for v in s["streams"].values())]
    after_warmup = [s for s in periodic if s["mono"] >= t0 + args.warmup]
    if len(after_warmup) < 2:
        return {"n": n, "error": f"only {len(after_warmup)} stats snapshots after warm-up (need 2)",
                "reasons": ["no window"]}
    start = after_warmup[0]
    end = min(after_warmup[1:], key=lambda s: abs(s["mono"] - start["mono"] - args.seconds))
    window = end["mono"] - start["mono"]

    def delta(key: str) -> dict[str, int]:
        return {sid: end["streams"][sid][key] - start["streams"][sid][key] for sid in end["streams"]}

    frames, captured, dropped = delta("frames"), delta("captured"), delta("dropped")
    step_errors, reconnects, skipped = delta("step_errors"), delta("reconnects"), delta("skipped")
    model = next(iter(end["models"].values()))
    steps = model["steps"] - next(iter(start["models"].values()))["steps"]
    fps = [f / window for f in frames.values()]
    capture_fps = [c / window for c in captured.values()]

    # Published between the two snapshots: stamped under the pipeline's lock as the snapshots are, so these are
    # exactly the frames processed in the window. Thirds in capture order.
    in_window = sorted((p[1:] for p in preds if start["wall"] < p[0] <= end["wall"]))
    pub_ms = [p[1] for p in in_window]
    recv_ms = [p[2] for p in in_window]
    third = max(1, len(in_window) // 3)
    r = {
        "n": n, "window": window, "fps_mean": statistics.fmean(fps), "fps_min": min(fps),
        "capture_fps_min": min(capture_fps), "capture_fps_mean": statistics.fmean(capture_fps),
        "dropped": sum(dropped.values()), "warmup_dropped": sum(v["dropped"] for v in start["streams"].values()),
        "skipped": sum(skipped.values()), "step_errors": sum(step_errors.values()),
        "reconnects": sum(reconnects.values()),
        "publish_dropped": end["publish_dropped"] - start["publish_dropped"],
        "processed": sum(frames.values()), "captured": sum(captured.values()), "received": len(in_window),
        "batch_mean": sum(frames.values()) / steps if steps else float("nan"),
        "step_p50": model["step_p50_ms"], "step_p99": model["step_p99_ms"],
        "cores": (end["cpu"] - start["cpu"]) / window, "rss": start["rss"], "rss_end": end["rss"],
        "steal": steal_share(*(ticks[k][0] for k in ("start", "end"))) if len(ticks) == 2 else float("nan"),
        "threads": ({role: sec / args.seconds for role, sec in thread_delta(ticks["start"][1], ticks["end"][1]).items()}
                    if len(ticks) == 2 else {}),
    }
    # The lanes' threads run the model calls (one intra-op thread computes in the caller's thread) and everything
    # else the loops do serially; CPU time, so waiting for a core does not count.
    lane_cores = sum(r["threads"].get(role, 0.0) for role in ROLES[:2]) if r["threads"] else float("nan")
    r["loop_cpu_ms"] = lane_cores * window * 1e3 / steps if steps else float("nan")
    r["loop_share"] = lane_cores
    if in_window:
        r.update({
            "p50": pct(pub_ms, 50), "p99": pct(pub_ms, 99), "recv_p99": pct(recv_ms, 99),
            "first_p50": pct(pub_ms[:third], 50), "last_p50": pct(pub_ms[-third:], 50),
            "recv_first_p50": pct(recv_ms[:third], 50), "recv_last_p50": pct(recv_ms[-third:], 50),
        })
    r["reasons"] = verdict(r)
    return r


ROLES = ("lane 1 (the caller's thread: its steps, pre/post-processing, stats)", "other lanes", "capture threads",
         "publisher thread", "subscriber (the benchmark's)", "other")


def _role(t: threading.Thread) -> str:
    if t is threading.main_thread():
        return ROLES[0]
    if t.name.startswith("lane-"):
        return ROLES[1]
    if t.name.startswith("capture"):
        return ROLES[2]
    if t.name == "publisher":
        return ROLES[3]
    if t.name == "bench-subscriber":
        return ROLES[4]
    return ROLES[5]


def thread_table(rows: list[dict]) -> list[str]:
    """CPU cores by thread over each case's window."""
    ok = [r for r in rows if r.get("threads")]
    if not ok:
        return []
    lines = ["| streams | " + " | ".join(ROLES) + " | Python threads, all | process, all threads |",
             "|---|" + "---|" * (len(ROLES) + 2)]
    for r in ok:
        lines.append(f"| {r['n']} | " + " | ".join(f"{r['threads'].get(role, 0.0):.2f}" for role in ROLES)
                     + f" | {sum(r['threads'].values()):.2f} | {r['cores']:.2f} |")
    return lines


def verdict(r: dict) -> list[str]:
    """Why a case is not sustained (empty: sustained)."""
    reasons = []
    if r["dropped"]:
        reasons.append(f"{r['dropped']} frame{'s' if r['dropped'] != 1 else ''} dropped")
    if r["capture_fps_min"] < MIN_CAPTURE_RATIO * FPS:
        reasons.append(f"a source delivered {r['capture_fps_min']:.1f} fps")
    if r["publish_dropped"]:
        reasons.append(f"{r['publish_dropped']} messages refused by the publisher")
    if r["step_errors"] or r["reconnects"]:
        reasons.append(f"{r['step_errors']} step errors, {r['reconnects']} reconnects")
    if not r["received"]:
        reasons.append("no prediction received")
    else:
        if _grows(r["first_p50"], r["last_p50"]):
            reasons.append("capture->publish latency grows")
        if _grows(r["recv_first_p50"], r["recv_last_p50"]):
            reasons.append("capture->subscriber latency grows")
    return reasons


# -- what a frame costs outside the model ---------------------------------------------------------------------


def per_frame_costs(cfg, frames: int = 300) -> dict:
    """Milliseconds per frame of the synthetic renderer and of preprocessing, each alone, in this thread."""
    scene = MotionScene(WIDTH, HEIGHT, seed=0)
    render = []
    images = []
    for t in range(frames):
        t0 = time.perf_counter()
        images.append(scene.render(t))
        render.append((time.perf_counter() - t0) * 1e3)
    pre = Preprocessor.for_config(cfg)
    prep = []
    for image in images:
        t0 = time.perf_counter()
        pre(image)
        prep.append((time.perf_counter() - t0) * 1e3)
    return {"frames": frames, "render_p50": pct(render, 50), "render_mean": statistics.fmean(render),
            "pre_p50": pct(prep, 50), "pre_mean": statistics.fmean(prep)}


@contextlib.contextmanager
def live_cameras(cfg, n: int = TARGET_STREAMS) -> Iterator[list[FrameBuffer]]:
    """``n`` live synthetic cameras, each a capture thread rendering and preprocessing at 30 fps into a 1-frame
    ``drop_oldest`` buffer (yielded; nothing need take the frames), running one second before the body and stopped
    after it."""
    pre = Preprocessor.for_config(cfg)
    buffers = [FrameBuffer(1, "drop_oldest") for _ in range(n)]
    captures = [CaptureThread(SyntheticSource(WIDTH, HEIGHT, FPS, seed=i), f"cam{i}", buffer, preprocess=pre)
                for i, buffer in enumerate(buffers)]
    for capture in captures:
        capture.start()
    try:
        time.sleep(1.0)
        yield buffers
    finally:
        for capture, buffer in zip(captures, buffers):
            capture.stop()
            buffer.close()
        for capture in captures:
            capture.join(2.0)


def capture_cores(cfg, rounds: int = 5, seconds: float = 3.0) -> dict:
    """Process CPU cores of 8 live synthetic cameras with their preprocessing and nothing else (their frames taken
    and discarded), with OpenCV's own thread pool and with each call on its capture thread
    (:func:`opencv_on_calling_threads`, what `streamtsm run` does), in alternating windows of one run."""
    cv2.setNumThreads(-1)  # OpenCV's default pool, whatever was set before
    settings = {"pool": cv2.getNumThreads(), "calling": 1}
    cores: dict[str, list[float]] = {name: [] for name in settings}
    with live_cameras(cfg) as buffers:
        for _ in range(rounds):
            for name, threads in settings.items():
                cv2.setNumThreads(threads)
                time.sleep(0.5)  # the previous setting's calls end
                wall, cpu, end = time.monotonic(), time.process_time(), time.monotonic() + seconds
                while time.monotonic() < end:
                    for buffer in buffers:
                        buffer.pop()
                    time.sleep(0.005)
                cores[name].append((time.process_time() - cpu) / (time.monotonic() - wall))
    return {"pool_threads": settings["pool"], "rounds": rounds, "seconds": seconds,
            **{name: statistics.median(v) for name, v in cores.items()}}


STEP_FORMS_BATCHES = (4, 8)


def step_forms(models: dict, args: argparse.Namespace, iterations: int = 40) -> list[str]:
    """One batched step in two forms side by side (interleaved): one intra-op thread, and every core as intra-op
    threads. Alone, then beside 8 live synthetic cameras (capture threads rendering and preprocessing at 30 fps,
    their frames left in their buffers), where the cores are shared."""
    cores = os.cpu_count() or 1
    forms = {"1 thread": 1, f"{cores} intra-op threads": cores}
    lines = ["| precision | batch | beside | " + " | ".join(f"{name}, p50 ms" for name in forms)
             + f" | {cores} threads / 1 thread |",
             "|---|---|---|" + "---|" * (len(forms) + 1)]
    for precision in args.precision:
        engines = {name: OrtOnlineEngine(models[precision], "cpu", threads=t) for name, t in forms.items()}
        cfg = next(iter(engines.values())).cfg
        for beside in ("nothing", f"{TARGET_STREAMS} live cameras"):
            with live_cameras(cfg) if beside != "nothing" else contextlib.nullcontext():
                for batch in STEP_FORMS_BATCHES:
                    rng = np.random.default_rng(batch)
                    size = cfg.input_size
                    frames = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
                    cases = {}
                    for name, engine in engines.items():
                        state = engine.zero_state(batch)
                        cases[name] = lambda engine=engine, state=state: engine.step(frames, state)
                    times = interleaved(cases, iterations)
                    one, every = (pct(t, 50) for t in times.values())
                    lines.append(f"| {precision} | {batch} | {beside} | {one:.1f} | {every:.1f} | {every / one:.2f}x |")
        for engine in engines.values():
            engine.close()
    return lines


# (lanes, live buffer) compared side by side: one lane against two, and a 1-frame buffer against a 2-frame one.
FORMS = ((1, 2), (2, 1), (2, 2))
COMPARE_ROUNDS = 2


def compared_forms(engine: OrtOnlineEngine, args: argparse.Namespace, publisher: Publisher,
                   deliveries: Deliveries) -> list[dict]:
    """Each load of ``args.compare`` int8 streams in each of :data:`FORMS` (lanes, live buffer), alternating,
    ``COMPARE_ROUNDS`` rounds: what lanes and the live buffer change, measured side by side in one process."""
    rows = []
    for n in args.compare:
        for round_ in range(COMPARE_ROUNDS):
            for lanes, live_buffer in FORMS:
                try:
                    r = run_case(engine, n, args, publisher, deliveries, lanes=lanes, live_buffer=live_buffer)
                except Exception as e:  # noqa: BLE001 (a case that cannot run is reported, not the end of the run)
                    r = {"n": n, "error": f"{type(e).__name__}: {e}", "reasons": ["error"]}
                r.update(lanes=lanes, live_buffer=live_buffer, round=round_ + 1)
                rows.append(r)
                print(f"N={n}, lanes {lanes}, live buffer {live_buffer}, round {round_ + 1}: " + (r.get("error") or
                      f"dropped {r['dropped']}, p99 {_f(r.get('p99'))} ms, batch {r['batch_mean']:.2f}"), flush=True)
    return rows


def compared_table(rows: list[dict]) -> list[str]:
    lines = ["| streams | round | lanes | live buffer | dropped | p50 / p99 capture->publish ms | mean batch | "
             "step p50 / p99 ms | CPU cores, process | CPU stolen by the host |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['n']} | {r['round']} | {r['lanes']} | {r['live_buffer']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | |")
            continue
        lines.append(f"{head} {r['dropped']} | {_f(r.get('p50'))} / {_f(r.get('p99'))} | "
                     f"{r['batch_mean']:.2f} | {_f(r['step_p50'])} / {_f(r['step_p99'])} | {r['cores']:.2f} | "
                     f"{100 * r['steal']:.1f}% |")
    return lines


def python_side_bytes(labels: list[str], options: PipelineOptions) -> dict:
    """Bytes the post-processing objects of one stream hold once their windows are full, and what one synthetic
    scene holds (background, noise tile, a segment's sprite), measured with tracemalloc."""
    tracemalloc.start()
    try:
        rng = np.random.default_rng(0)
        base = tracemalloc.get_traced_memory()[0]
        post = StreamPostprocessor(labels, smooth=options.smooth, topk=options.topk, threshold=options.threshold,
                                   hold=options.hold)
        latency, rate = LatencyTracker(), RateMeter()
        for i in range(2000):
            post.process(rng.standard_normal(len(labels)).astype(np.float32), i, i / FPS)
            latency.add(float(i))
        now = time.monotonic()
        for i in range(int(FPS * rate.window_s)):
            rate.tick(now + i / FPS)
        post_bytes = tracemalloc.get_traced_memory()[0] - base
        base = tracemalloc.get_traced_memory()[0]
        scene = MotionScene(WIDTH, HEIGHT, seed=0)
        scene.render(0)
        scene_bytes = tracemalloc.get_traced_memory()[0] - base
        del post, latency, rate, scene
    finally:
        tracemalloc.stop()
    return {"post": post_bytes, "scene": scene_bytes}


def activation_mb_per_row(path: str, threads: int, batch: int) -> float:
    """RSS growth of a fresh onnxruntime session from a step at batch 1 to one at ``batch``, per added row: what its
    activations (arena) cost per stream. Approximate: the allocator may reuse memory the process freed earlier."""
    probe = OrtOnlineEngine(path, "cpu", threads=threads)
    rng = np.random.default_rng(0)
    size = probe.cfg.input_size
    small = rng.standard_normal((1, 3, size, size), dtype=np.float32), probe.zero_state(1)
    large = rng.standard_normal((batch, 3, size, size), dtype=np.float32), probe.zero_state(batch)  # not counted
    for _ in range(2):
        probe.step(*small)
    one = rss_mb()
    probe.step(*large)
    grown = rss_mb()
    probe.close()
    return (grown - one) / (batch - 1)


# -- models ---------------------------------------------------------------------------------------------------


def build_models(work: Path, args: argparse.Namespace) -> dict:
    """Export the online MobileNetV2-TSM (random but calibrated weights) to fp32 and, if asked, int8."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    online = create("tsm_mobilenetv2_online", num_classes=27, input_size=224)
    random_but_calibrated(online, calibration_frames(online.cfg, "synthetic", num_frames=64, sequence_length=8,
                                                     seed=7))
    fp32 = export_onnx(online, work / "tsm.onnx")
    out = {"fp32": fp32.path, "export_diff": fp32.max_abs_diff}
    if "int8" in args.precision:
        calib = calibration_frames(online.cfg, "synthetic", num_frames=args.calib_frames, sequence_length=32, seed=0)
        holdout = calibration_frames(online.cfg, "synthetic", num_frames=64, sequence_length=32, seed=1)
        q = quantize_int8(fp32.path, work / "tsm.int8.onnx", calib, holdout_frames=holdout, threads=args.threads)
        out.update({"int8": q["path"], "quant": q})
    del online
    gc.collect()
    return out


# -- report ---------------------------------------------------------------------------------------------------


def _f(value, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and value != value) else format(value, spec)


def _share(step_ms) -> str:
    """The step's wall time as a share of the 30 fps frame period: what is left for everything else."""
    return "-" if step_ms is None else f"{step_ms * FPS / 1e3:.0%}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| streams | fps/stream mean | min | processed / captured frames | captured fps/stream (min) | "
             "dropped (warm-up) | "
             "latency p50 ms | p99 ms | p50 first -> last third ms | subscriber p99 ms | mean batch | "
             "step p50 ms (wall) | step / frame period | lanes' CPU ms per step (cores) | CPU cores | "
             "CPU stolen by the host | RSS MB | sustained |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} |" + " - |" * 16 + f" **no** ({r['error']}) |")
            continue
        ok = "yes" if not r["reasons"] else "**no**: " + "; ".join(r["reasons"])
        lines.append(
            f"| {r['n']} | {r['fps_mean']:.1f} | {r['fps_min']:.1f} | {r['processed']} / {r['captured']} | "
            f"{r['capture_fps_min']:.1f} | "
            f"{r['dropped']} ({r['warmup_dropped']}) | {_f(r.get('p50'))} | {_f(r.get('p99'))} | "
            f"{_f(r.get('first_p50'))} -> {_f(r.get('last_p50'))} | {_f(r.get('recv_p99'))} | "
            f"{r['batch_mean']:.2f} | {_f(r['step_p50'])} | {_share(r['step_p50'])} | "
            f"{_f(r['loop_cpu_ms'])} ({r['loop_share']:.2f}) | {r['cores']:.2f} | {r['steal']:.1%} | "
            f"{r['rss']:.0f} | {ok} |")
    return lines


def largest_sustained(rows: list[dict]) -> tuple[int | None, list[int]]:
    """(largest sustained N, the failed N below it)."""
    good = [r["n"] for r in rows if not r["reasons"]]
    if not good:
        return None, []
    best = max(good)
    return best, [r["n"] for r in rows if r["reasons"] and r["n"] < best]


def rss_per_stream(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    one = next((r for r in ok if r["n"] == 1), None)
    top = max(ok, key=lambda r: r["n"]) if ok else None
    if one is None or top is None or top["n"] == 1:
        return "needs runs at 1 stream and at more"
    per = (top["rss"] - one["rss"]) / (top["n"] - 1)
    text = f"{per:.2f} MB per added stream ((RSS at {top['n']} - RSS at 1) / {top['n'] - 1}, after warm-up)"
    if len(ok) >= 3:
        slope = np.polyfit([r["n"] for r in ok], [r["rss"] for r in ok], 1)[0]
        text += f"; least-squares slope over N = {', '.join(str(r['n']) for r in ok)}: {slope:.2f} MB"
    return text


def measure_precision(precision: str, path: str, schedule: list[int],
                      args: argparse.Namespace) -> tuple[list[dict], float | None, list[dict]]:
    """The schedule for one exported file (run in its own process): rows, activation MB per batch row, and for
    int8 the lanes and live buffers compared (:func:`compared_forms`)."""
    opencv_on_calling_threads()  # as `streamtsm run`
    publisher = Publisher("tcp://127.0.0.1:*", background=True)
    deliveries = Deliveries(publisher.endpoint)
    rows, failures, compared = [], 0, []
    try:
        connect(publisher, deliveries)
        engine = OrtOnlineEngine(path, "cpu", threads=args.threads, spinning=args.spinning)
        for n in schedule:
            try:
                r = run_case(engine, n, args, publisher, deliveries)
            except Exception as e:  # a case that cannot run is a failure to report, not the end of the schedule
                r = {"n": n, "error": f"{type(e).__name__}: {e}", "reasons": ["error"]}
            rows.append(r)
            print(f"{precision} N={n}: " + (r.get("error") or
                  f"fps {r['fps_mean']:.1f} (min {r['fps_min']:.1f}), dropped {r['dropped']}, "
                  f"p50/p99 {_f(r.get('p50'))}/{_f(r.get('p99'))} ms, batch {r['batch_mean']:.2f}, "
                  f"RSS {r['rss']:.0f} MB, " + ("sustained" if not r["reasons"] else
                                              "not sustained: " + "; ".join(r["reasons"]))), flush=True)
            failures = failures + 1 if r["reasons"] else 0
            if failures == 2:
                break
        if precision == "int8" and args.compare:
            compared = compared_forms(engine, args, publisher, deliveries)
        engine.close()
    finally:
        deliveries.close()
        publisher.close()
    top = max(r["n"] for r in rows)
    # After the runs, so that the probe's arena cannot lower their RSS figures; too small a batch says nothing.
    return rows, activation_mb_per_row(path, args.threads, top) if top >= 4 else None, compared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,2,4,6,8,10,12,16", help="increasing schedule of stream counts")
    ap.add_argument("--precision", default="fp32,int8", help="fp32, int8 or both, comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window per case")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds per case before the window (excluded)")
    ap.add_argument("--threads", type=int, default=default_threads(),
                    help="onnxruntime intra-op threads (default: what `streamtsm run` uses, all cores but one)")
    ap.add_argument("--lanes", type=int, default=default_lanes(),
                    help="threads stepping the streams, each its share of them (default: what `streamtsm run` uses)")
    ap.add_argument("--live-buffer", type=int, default=RUN_DEFAULTS["live_buffer"],
                    help="frames each source holds for the model (default: what `streamtsm run` uses)")
    ap.add_argument("--compare", default="8,12",
                    help="int8 stream counts at which 1 and 2 lanes, 1- and 2-frame live buffers run side by side "
                         "('' skips it)")
    ap.add_argument("--spinning", action="store_true",
                    help="let onnxruntime's pool threads busy-wait between operators (off in `streamtsm run`)")
    ap.add_argument("--phase", choices=("staggered", "aligned"), default="staggered",
                    help="camera frame clocks spread evenly over a frame period (default), or all in step")
    ap.add_argument("--calib-frames", type=int, default=192, help="int8 calibration frames (synthetic)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    schedule = sorted({int(x) for x in args.streams.split(",") if x.strip()})
    args.compare = [int(x) for x in args.compare.split(",") if x.strip()]
    args.precision = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not schedule or schedule[0] < 1 or not set(args.precision) <= {"fp32", "int8"} or not args.precision:
        ap.error("--streams takes positive integers; --precision takes fp32 and/or int8")

    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {}
    activations: dict[str, float] = {}
    compared: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        models = build_models(Path(tmp), args)
        meta = read_metadata(models["fp32"])
        cfg = ModelConfig.from_dict(meta["config"])
        costs = per_frame_costs(cfg)
        costs["capture"] = capture_cores(cfg)
        opencv_on_calling_threads()  # as `streamtsm run`, for the step forms beside live cameras
        forms = step_forms(models, args)
        python_bytes = python_side_bytes(list(cfg.labels or numbered_labels(cfg.num_classes)), PipelineOptions())
        for precision in args.precision:
            # A fresh process per precision: memory the previous one freed would otherwise be reused and hide
            # this one's growth in RSS.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                results[precision], act, forms_run = pool.submit(measure_precision, precision, models[precision],
                                                                schedule, args).result()
            compared += forms_run
            if act is not None:
                activations[precision] = act
    load_after = os.getloadavg()
    body = report(args, schedule, results, activations, models, meta, costs, python_bytes, load_before, load_after,
                  forms, compared)
    print(body)
    if not args.no_write:
        write_section("streams", "Live streams per process: sustained 30 fps streams, latency, memory (CPU)", body)


def report(args, schedule, results, activations, models, meta, costs, python_bytes, load_before,
           load_after, forms, compared) -> str:
    lines = [
        "A batched step alone and beside live cameras, one intra-op thread and every core's, side by side "
        f"(interleaved, {' and '.join(map(str, STEP_FORMS_BATCHES))} rows of random frames, the same file):", "",
        *forms, ""]
    if compared:
        lines += [
            "int8 streams in one lane and in two (`streamtsm run --lanes`), each source holding one frame or two "
            "for the model (`--live-buffer`), alternating in one process, "
            f"{COMPARE_ROUNDS} rounds per load (each case as below: warm-up, then the window):", "",
            *compared_table(compared), ""]
    lines += [
        "Streams sustained, with the streams stepped as `streamtsm run` steps them on this machine "
        f"(`threads={args.threads}`, `lanes={args.lanes}`, `live_buffer={args.live_buffer}`):", ""]
    for precision, rows in results.items():
        lines += [f"**onnxruntime {precision}**", "", *table(rows), ""]
        threads = thread_table(rows)
        if threads:
            lines += ["CPU cores by thread over each window (from /proc/self/task; the process's figure also counts "
                      "the threads of libraries' own pools, OpenCV's and ZeroMQ's, which are not Python threads):",
                      "", *threads, ""]
        ok = [r for r in rows if "error" not in r and r["processed"]]
        if ok:
            cover = [r["received"] / r["processed"] for r in ok]
            lines += [f"The subscriber received {100 * min(cover):.1f}-{100 * max(cover):.1f}% of the predictions "
                      "published in each window.", ""]

    lines.append("Verdict (target: >= 8 streams sustained):")
    best_overall = 0
    for precision, rows in results.items():
        best, below = largest_sustained(rows)
        if best is None:
            lines.append(f"- {precision}: **not sustained at any N tried**, not even {rows[0]['n']} stream(s).")
            continue
        best_overall = max(best_overall, best)
        note = (f" (N = {', '.join(map(str, below))} failed below it: the limit is not sharp; repeat on a quiet "
                "machine)" if below else "")
        ceiling = " (the largest N tried: the real limit may be higher)" if best == rows[-1]["n"] else ""
        if best >= TARGET_STREAMS:
            met = "target **met**"
        elif ceiling:
            met = f"target **not reached by the schedule** (it ended at {best}; try larger N)"
        else:
            met = "target **not met**"
        lines.append(f"- {precision}: largest sustained N = **{best}**{ceiling}{note}: {met}.")
    lines += [f"- Overall: {'**met**' if best_overall >= TARGET_STREAMS else '**not met**'} "
              f"(best: {best_overall} stream{'' if best_overall == 1 else 's'}).", ""]

    shapes = [tuple(s["shape"]) for s in meta["state"]]
    state = sum(int(np.prod(s)) for s in shapes) * 4
    frame = WIDTH * HEIGHT * 3
    size = meta["config"]["input_size"]
    prep = 3 * size * size * 4
    held = frame + prep + 2 * state + python_bytes["post"]
    lines += [
        "Memory per stream:",
        f"- model state: {state / 1e3:.1f} kB ({len(shapes)} float32 fold tensors, "
        f"{', '.join('x'.join(map(str, s)) for s in shapes)}); during a step the input and the new state both "
        f"exist, so {2 * state / 1e3:.1f} kB at the peak.",
        f"- pipeline buffers of a live source: the FrameBuffer's 1 frame ({frame / 1e3:.1f} kB, 320x240x3 uint8), "
        f"its row of the preprocessed batch ({prep / 1e3:.1f} kB, 3x{size}x{size} float32), "
        f"post-processing with full windows ({python_bytes['post'] / 1e3:.1f} kB: smoothing, event detector, "
        f"1000 latency samples, the 2 s rate window); with the state at its peak: **{held / 1e6:.2f} MB**.",
        f"- the synthetic scene itself (background, noise tile, sprite; a camera's decoder replaces it): "
        f"{python_bytes['scene'] / 1e6:.2f} MB.",
    ]
    for precision, rows in results.items():
        act = (f"; of which onnxruntime's activations, measured on a fresh session stepped at batch 1 then "
               f"{max(r['n'] for r in rows)}: about {activations[precision]:.2f} MB per batch row"
               if precision in activations else "")
        lines.append(f"- measured RSS growth, {precision}: {rss_per_stream(rows)} (all of the above, the capture "
                     f"thread and allocator slack{act}).")
    lines.append("")

    # The previous benchmark of a series leaves about one core's worth in the 1-minute average; more than that
    # means something else was running.
    busy = load_before[0] > 0.75 * (os.cpu_count() or 1)
    render_cores = [n * FPS * costs["render_mean"] / 1e3 for n in (1, TARGET_STREAMS)]
    q = models.get("quant")
    lines.append(
        f"Each case: N synthetic scenes ({WIDTH}x{HEIGHT}, paced at {FPS:g} fps by the clock, seeds 0..N-1, frame "
        f"clocks {'spread evenly over one frame period' if args.phase == 'staggered' else 'in step'}), each with "
        f"its capture thread (which also preprocesses its frames) and a {args.live_buffer}-frame `drop_oldest` buffer "
        f"(`live_buffer={args.live_buffer}`), one batched "
        f"`OrtOnlineEngine` (CPUExecutionProvider, `intra_op_num_threads={args.threads}`, "
        f"`session.intra_op.allow_spinning={int(args.spinning)}`, `inter_op_num_threads=1`; the streams dealt "
        f"to {args.lanes} lane(s), each a thread stepping its own streams' batches: `lanes={args.lanes}`), default "
        "post-processing (smooth 8, top-5), a ZeroMQ publisher on tcp://127.0.0.1 sending on its own thread "
        "(`Publisher(background=True)`, as `streamtsm run`) with a subscriber thread in the same process reading "
        "every message. "
        f"{args.warmup:g} s warm-up (excluded), then a {args.seconds:g} s window between two of the stats snapshots "
        "the pipeline publishes every second; fps, captured, dropped, batch (processed frames / model calls) and CPU "
        "(process CPU time / wall time, all threads) are differences between those snapshots; latency is "
        "capture->publish (`latency_ms` of the pred messages published in the window, stamped when the pipeline "
        "hands the message to the publisher; thirds in capture order) and capture->subscriber (receive time - "
        "`capture_ts`, which includes the publisher's queue and thread); step p50 is the wall time of the batched "
        "model call over the last 1000 calls of every lane (it includes waiting for a core); the lanes' CPU per step "
        "is the CPU time of the lane threads (from /proc/self/task, so waiting for a core does not count) divided by "
        "the model calls in the window: the model call (one intra-op thread computes in the caller's thread) plus "
        "everything else a lane's loop does serially, and in brackets the cores they kept busy; CPU stolen by the "
        "host is the steal share of all CPU time in /proc/stat over the window (time the hypervisor gave this "
        "virtual machine's cores to others while they had work: capacity the pipeline did not get); RSS is VmRSS at the start of the window. "
        f"Frame stride {max(1, int(meta['config'].get('frame_interval') or 1))} (the model's `frame_interval`; "
        f"frames skipped by it in the windows: {sum(r.get('skipped', 0) for rs in results.values() for r in rs)}). "
        "Schedule " + ", ".join(map(str, schedule)) + ", stopped after two failures in a row; each precision in a "
        "fresh process.  ")
    lines.append(
        "Sustained: 0 frames dropped in the window, every source at >= "
        f"{MIN_CAPTURE_RATIO:.0%} of {FPS:g} fps (the synthetic scene renders in its capture thread; starved of CPU "
        "it falls behind its clock and then skips ahead, and frames that were never made are counted nowhere), "
        "no message refused by the publisher, no step error or reconnect, and neither latency growing "
        f"(last-third p50 <= {GROWTH_FACTOR:g} x first-third p50 + {GROWTH_SLACK_MS:g} ms). A live buffer holds "
        f"at most {args.live_buffer} frame(s), so a backlog cannot build inside the pipeline beyond them: an "
        "overloaded pipeline drops frames instead, and the latency check guards the publisher's queue.  ")
    lines.append(
        f"What the synthetic source costs: rendering a frame takes {costs['render_mean']:.2f} ms (p50 "
        f"{costs['render_p50']:.2f}, {costs['frames']} frames, alone), i.e. {render_cores[0]:.2f} of a core per "
        f"stream and {render_cores[1]:.2f} at {TARGET_STREAMS} streams, spent in the capture threads on the same "
        "cores as the model; a real camera's decoding replaces it (its cost depends on the codec). Preprocessing "
        f"(resize, crop, normalize) takes {costs['pre_mean']:.2f} ms per frame (p50 {costs['pre_p50']:.2f}), also in "
        "the capture threads. The 8 cameras with their preprocessing and nothing else, side by side in alternating "
        f"{costs['capture']['seconds']:g} s windows (median of {costs['capture']['rounds']}): "
        f"{costs['capture']['pool']:.2f} cores with OpenCV's own pool of "
        f"{costs['capture']['pool_threads']} threads, {costs['capture']['calling']:.2f} with each OpenCV call "
        "on its capture thread, as `streamtsm run` sets it.  ")
    quant = (f"; int8: `quantize_int8`, static QDQ, per-channel, min/max calibration on {args.calib_frames} "
             f"synthetic frames, top-1 agreement with fp32 {100 * q['top1_agreement']:.1f}% over "
             f"{q['holdout_predictions']} held-out frames (random weights; see the onnx section)") if q else ""
    lines.append(
        f"Model: `tsm_mobilenetv2_online` at {meta['config']['input_size']}, 27 classes, random weights calibrated as "
        f"in tools/bench_onnx.py (BN statistics on synthetic frames; the cost of a step does not depend on them), "
        f"`export_onnx` (max abs difference to torch {models['export_diff']:.1e}){quant}. onnxruntime "
        f"{ort.__version__}, torch {torch.__version__} (export only).  ")
    lines.append(
        "Load average (1/5/15 min) before: " + " / ".join(f"{x:.1f}" for x in load_before) + ", after: "
        + " / ".join(f"{x:.1f}" for x in load_after) + f" on {os.cpu_count()} cores"
        + (": **the machine was loaded before the run** (1-minute load above 0.75 per core), so these figures "
           "understate what a quiet machine sustains."
           if busy else "."))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
