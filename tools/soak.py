"""Soak test: N live streams for M minutes; RSS, threads, latency and drops over time.

    python tools/soak.py --streams 4 --minutes 10 [--model NAME | --weights W | --onnx F | --bench-model int8]
                         [--sample-seconds 30]

``--bench-model fp32|int8`` builds the 224 MobileNetV2-TSM that tools/bench_streams.py measures (random weights with
calibrated BN statistics, exported with export_onnx, int8 by quantize_int8) in a temporary folder and soaks it on
onnxruntime; without a model option the default (the shipped demo model) runs.

Runs the real pipeline (capture threads on synthetic 30 fps scenes, batched online model, ZeroMQ publisher with a
subscriber reading) and samples the process every interval. Writes a section of docs/benchmarks.md with the
table and the verdicts: RSS growth after warm-up (first interval) <= 5%, no thread leak, no drift in p99 latency.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import os_threads, pct, rss_mb, write_section  # noqa: E402

from streamtsm.engine.factory import build_engine  # noqa: E402
from streamtsm.pipeline import Pipeline, PipelineOptions, StreamSpec, effective_frame_stride  # noqa: E402
from streamtsm.publish import Publisher, Subscriber  # noqa: E402


class LatencySink:
    """Collects capture->publish latency of predictions per sampling interval, and the latest stats message.

    It runs in the pipeline's thread, as every sink does, so the stats it keeps are a consistent snapshot; reading
    ``pipeline.stats()`` from this tool's thread would walk the pipeline's deques while it appends to them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ms: list[float] = []
        self._stats: dict | None = None

    def on_message(self, topic: str, payload: dict) -> None:
        kind = payload.get("type")
        if kind == "pred":
            with self._lock:
                self._ms.append(payload["latency_ms"])
        elif kind == "stats":
            with self._lock:
                self._stats = payload

    def close(self) -> None:
        pass

    def latest_stats(self) -> dict | None:
        with self._lock:
            return self._stats

    def take(self) -> list[float]:
        with self._lock:
            out, self._ms = self._ms, []
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--sample-seconds", type=float, default=30)
    ap.add_argument("--model")
    ap.add_argument("--weights")
    ap.add_argument("--onnx")
    ap.add_argument("--bench-model", choices=("fp32", "int8"),
                    help="build and run the 224 MobileNetV2-TSM of tools/bench_streams.py at this precision")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    made_by, work = "", None
    if args.bench_model:
        from bench_streams import build_models

        work = Path(tempfile.mkdtemp(prefix="soak-"))
        built = build_models(work, argparse.Namespace(threads=1, precision=args.bench_model, calib_frames=192))
        args.onnx = built[args.bench_model]
        made_by = (f" The model: tools/bench_streams.py's 224 MobileNetV2-TSM ({args.bench_model}, random weights "
                   "with calibrated BN statistics, 27 classes), as built by `--bench-model`.")
    engine = build_engine(model=args.model, weights=args.weights, onnx=args.onnx)
    publisher = Publisher("tcp://127.0.0.1:*")
    latency = LatencySink()
    specs = [StreamSpec("synthetic:320x240@30", f"cam{i}") for i in range(args.streams)]
    # No duration: the tool stops the pipeline itself after its last sample, so no sample sees the teardown.
    pipeline = Pipeline(engine, specs, sinks=[publisher, latency], options=PipelineOptions())
    stop_sub = threading.Event()
    received = [0]

    def subscribe():
        with Subscriber(publisher.endpoint, ["streamtsm"]) as sub:
            while not stop_sub.is_set():
                if sub.recv(timeout=0.2) is not None:
                    received[0] += 1

    sub_thread = threading.Thread(target=subscribe, daemon=True)
    sub_thread.start()
    rows = []
    pipeline.start()
    stop_pipeline = threading.Event()
    runner = threading.Thread(target=pipeline.run, args=(stop_pipeline,), name="pipeline")
    runner.start()
    t0 = time.monotonic()
    last_totals = {"frames": 0, "dropped": 0, "ts": time.time()}
    samples = max(1, round(args.minutes * 60 / args.sample_seconds))
    for k in range(1, samples + 1):
        # Sample on a fixed clock (k intervals after the start), not after a sleep, so intervals do not drift.
        runner.join(max(0.0, t0 + k * args.sample_seconds - time.monotonic()))
        if not runner.is_alive():
            raise SystemExit(f"the pipeline stopped after {time.monotonic() - t0:.0f} s, before the soak ended")
        snapshot = latency.latest_stats()
        st = snapshot["streams"].values() if snapshot else []
        frames, dropped = sum(s["frames"] for s in st), sum(s["dropped"] for s in st)
        snap_ts = snapshot["publish_ts"] if snapshot else time.time()
        ms = latency.take()
        elapsed = time.monotonic() - t0
        rows.append({
            "t": elapsed, "rss": rss_mb(), "threads": os_threads(), "py_threads": threading.active_count(),
            "p50": pct(ms, 50) if ms else float("nan"), "p99": pct(ms, 99) if ms else float("nan"),
            # Over the time between the two stats snapshots (published once a second), not the sampling interval.
            "fps": (frames - last_totals["frames"]) / max(1e-9, snap_ts - last_totals["ts"]),
            "dropped": dropped - last_totals["dropped"],
        })
        last_totals = {"frames": frames, "dropped": dropped, "ts": snap_ts}
        r = rows[-1]
        print(f"{r['t']:6.0f}s rss {r['rss']:.1f} MB threads {r['threads']} p50 {r['p50']:.1f} p99 {r['p99']:.1f} "
              f"ms fps {r['fps']:.1f} dropped {r['dropped']}", flush=True)
    stop_pipeline.set()
    runner.join(10)
    stop_sub.set()
    sub_thread.join(2)
    publisher.close()
    engine.close()
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)

    steady = rows[1:] if len(rows) > 2 else rows  # the first interval is warm-up
    base, end = steady[0], steady[-1]
    growth = 100 * (end["rss"] / base["rss"] - 1)
    p99_first = float(np.nanmean([r["p99"] for r in steady[: max(1, len(steady) // 3)]]))
    p99_last = float(np.nanmean([r["p99"] for r in steady[-max(1, len(steady) // 3):]]))
    threads = sorted({r["threads"] for r in steady})
    lines = ["| t (s) | RSS MB | OS threads | latency p50 ms | p99 ms | fps (all streams) | dropped in interval |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['t']:.0f} | {r['rss']:.1f} | {r['threads']} | {r['p50']:.1f} | {r['p99']:.1f} | "
              f"{r['fps']:.1f} | {r['dropped']} |" for r in rows]
    grew = growth <= 5.0
    leak = steady[-1]["threads"] > steady[0]["threads"]
    # Drift: the last third's p99 beyond 1.25x the first third's plus 2 ms (one scheduler hiccup on 2 cores).
    drift = p99_last > 1.25 * p99_first + 2.0
    stride = effective_frame_stride(specs[0], engine)
    lines += [
        "",
        f"- RSS growth after warm-up: {growth:+.2f}% ({base['rss']:.1f} -> {end['rss']:.1f} MB; target <= 5%): "
        f"{'met' if grew else 'NOT met'}",
        f"- OS threads after warm-up: {threads}: {'grew (leak)' if leak else 'no leak'}",
        f"- p99 latency, first third vs last third of the run: {p99_first:.1f} vs {p99_last:.1f} ms: "
        f"{'drift' if drift else 'no drift'} (drift: last > 1.25 x first + 2 ms)",
        f"- frames dropped after warm-up: {sum(r['dropped'] for r in steady)}",
        f"- messages received by the subscriber: {received[0]}",
        f"\n{args.streams} synthetic 30 fps streams (320x240), model {engine.model_name} ({engine.backend}), "
        f"{args.minutes:g} minutes, sampled every {args.sample_seconds:g} s (the first interval is warm-up). "
        f"fps counts the frames the model processed: one in {stride} (the model's frame stride). "
        "Latency is capture->publish "
        "of the predictions published in each interval. Frames the model could not keep up with are dropped by "
        "design (live sources keep only their newest frame)." + made_by,
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("soak", "Soak: long run with several live streams", body)


if __name__ == "__main__":
    main()
