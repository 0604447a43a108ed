"""Soak test: N live streams plus a flapping and a stalled IP camera for M minutes; RSS, threads, file
descriptors, latency and drops over time, then how long each kind of stop takes.

    python tools/soak.py --streams 4 --minutes 10 [--model NAME | --weights W | --onnx F | --bench-model int8]
                         [--sample-seconds 30] [--flapping 1] [--stalled 1] [--stop-repeats 3]

``--bench-model fp32|int8`` builds the 224 MobileNetV2-TSM that tools/bench_streams.py measures (random weights with
calibrated BN statistics, exported with export_onnx, int8 by quantize_int8) in a temporary folder and soaks it on
onnxruntime; without a model option the default (the shipped demo model) runs.

Runs the real pipeline (capture threads on synthetic 30 fps scenes and on tools/ip_camera.py's MJPEG cameras on
127.0.0.1, one that drops its connection every 2 s and is down for 2 s, one that stalls mid-stream; batched online
model; ZeroMQ publisher with a subscriber reading) and samples the process every interval. Then the stop checks: a
`streamtsm run` process is sent SIGTERM in each state (loading its model, opening a source that never answers, a
source stalled inside the decoder, a flapping source, many streams under load), ``--stop-repeats`` times each, and
the time to its exit and its exit code are recorded. Writes a section of docs/benchmarks.md with the table and the
verdicts: RSS growth after warm-up (first interval) <= 5%, no thread or file-descriptor growth, no drift in p99
latency, every stop <= 1 s with exit 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# OpenCV's and FFmpeg's own lines (a camera refusing, a stream timing out) would bury the table: silent, as `run`.
os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import open_fds, os_threads, pct, rss_mb, write_section  # noqa: E402
from ip_camera import IpCamera  # noqa: E402

from streamtsm.capture import opencv_on_calling_threads  # noqa: E402
from streamtsm.engine.factory import build_engine  # noqa: E402
from streamtsm.pipeline import Pipeline, PipelineOptions, StreamSpec, effective_frame_stride  # noqa: E402
from streamtsm.publish import Publisher, Subscriber  # noqa: E402


class LatencySink:
    """Collects capture->publish latency of predictions per sampling interval, and the latest stats message.

    The pipeline calls it under its lock, as every sink, so the stats it keeps are a consistent snapshot.
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


class SilentServer:
    """A TCP port on 127.0.0.1 that accepts connections and never answers: a camera whose HTTP server hangs, so a
    reader stays inside FFmpeg's open. ``connected`` is set once a client has connected."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/cam.mjpg"
        self.connected = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._held.append(conn)
            self.connected.set()

    def close(self) -> None:
        for conn in self._held:
            conn.close()
        self._sock.close()


# Not --quiet: the start line on stderr says the streams run (stdout, a line per prediction, is not read).
RUN = [sys.executable, "-m", "streamtsm.cli", "run", "--publish", "none"]


def camera_process(mode: str) -> tuple[str, str, subprocess.Popen]:
    """Starts tools/ip_camera.py (320x240 at 30 fps; 60 frames a connection) in a process; (mode, url, process)."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ip_camera.py")), "--mode", mode,
                             "--frames", "60", "--fps", "30", "--size", "320x240", "--down-s", "2"],
                            stdout=subprocess.PIPE, text=True)
    return mode, proc.stdout.readline().strip(), proc


def _stop_once(args: list[str], ready) -> tuple[float, int, str]:
    """Starts `streamtsm run ARGS`, calls ``ready(proc)`` until it says the state is reached, sends SIGTERM and
    returns (seconds to exit, exit code, the last line of stderr)."""
    proc = subprocess.Popen(RUN + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ready(proc)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        return time.monotonic() - t0, proc.returncode, (err.strip().splitlines() or [""])[-1]
    finally:
        proc.kill()


def stop_checks(repeats: int) -> list[dict]:
    """SIGTERM to a `streamtsm run` process in each state a stop can find it in; one row per state."""
    rows = []

    def check(state: str, args: list[str], ready, cleanup=None) -> None:
        runs = []
        for _ in range(repeats):
            runs.append(_stop_once(args, ready))
        if cleanup:
            cleanup()
        rows.append({"state": state, "times": [r[0] for r in runs], "codes": sorted({r[1] for r in runs}),
                     "last": runs[-1][2]})
        print(f"stop while {state}: {max(r[0] for r in runs):.2f} s max, exit {rows[-1]['codes']}", flush=True)

    check("loading the model", ["--source", "synthetic:96x72@30"], lambda p: time.sleep(0.7))
    silent = SilentServer()
    check("opening a source that never answers", ["--source", silent.url],
          lambda p: (silent.connected.wait(60), time.sleep(1.0)), silent.close)
    with IpCamera("stall", frames=30, fps=30) as cam:
        def stalled(p, cam=cam):
            cam.wait_stalls(len(cam.stalls) + 1, 60)
            time.sleep(1.0)
        check("a source is stalled inside the decoder", ["--source", cam.url], stalled)
    with IpCamera("flap", frames=30, fps=30, down_s=1.0) as cam:
        check("a source flaps", ["--source", cam.url, "--source", "synthetic:96x72@30"],
              lambda p, cam=cam: cam.wait_stalls(len(cam.stalls) + 2, 60))
    many = []
    for i in range(8):
        many += ["--source", "synthetic:320x240@30"]
    check("8 streams under load", many, lambda p: (p.stderr.readline(), time.sleep(5.0)))  # after the start line
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=4, help="synthetic 30 fps streams")
    ap.add_argument("--flapping", type=int, default=1, help="IP cameras that drop every 2 s and are down for 2 s")
    ap.add_argument("--stalled", type=int, default=1, help="IP cameras that stall mid-stream")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--sample-seconds", type=float, default=30)
    ap.add_argument("--stop-repeats", type=int, default=3, help="SIGTERMs per stop state (0: no stop checks)")
    ap.add_argument("--model")
    ap.add_argument("--weights")
    ap.add_argument("--onnx")
    ap.add_argument("--bench-model", choices=("fp32", "int8"),
                    help="build and run the 224 MobileNetV2-TSM of tools/bench_streams.py at this precision")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    load_before = os.getloadavg()
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
    # 60 frames at 30 fps: a flapping camera is up 2 s, then down 2 s; a stalled one stalls after 2 s and again
    # after each reconnect (its hung reader is replaced after the 5 s read timeout).
    # Each camera in a process of its own, so this process's threads, descriptors and memory are the recognizer's.
    cameras = [camera_process("flap") for _ in range(args.flapping)]
    cameras += [camera_process("stall") for _ in range(args.stalled)]
    specs = [StreamSpec("synthetic:320x240@30", f"cam{i}") for i in range(args.streams)]
    specs += [StreamSpec(url, f"{mode}{i}") for i, (mode, url, _) in enumerate(cameras)]
    # No duration: the tool stops the pipeline itself after its last sample, so no sample sees the teardown.
    pipeline = Pipeline(engine, specs, sinks=[publisher, latency], options=PipelineOptions())
    opencv_on_calling_threads()  # as `streamtsm run`
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
    faulty = [spec.name for spec in specs[args.streams:]]
    for k in range(1, samples + 1):
        # Sample on a fixed clock (k intervals after the start), not after a sleep, so intervals do not drift.
        runner.join(max(0.0, t0 + k * args.sample_seconds - time.monotonic()))
        if not runner.is_alive():
            raise SystemExit(f"the pipeline stopped after {time.monotonic() - t0:.0f} s, before the soak ended")
        snapshot = latency.latest_stats()
        streams = snapshot["streams"] if snapshot else {}
        live = [s for sid, s in streams.items() if sid not in faulty]
        frames, dropped = sum(s["frames"] for s in live), sum(s["dropped"] for s in live)
        snap_ts = snapshot["publish_ts"] if snapshot else time.time()
        ms = latency.take()
        elapsed = time.monotonic() - t0
        rows.append({
            "t": elapsed, "rss": rss_mb(), "threads": os_threads(), "fds": open_fds(),
            "p50": pct(ms, 50) if ms else float("nan"), "p99": pct(ms, 99) if ms else float("nan"),
            # Over the time between the two stats snapshots (published once a second), not the sampling interval.
            "fps": (frames - last_totals["frames"]) / max(1e-9, snap_ts - last_totals["ts"]),
            "dropped": dropped - last_totals["dropped"],
            "faults": ", ".join(f"{sid} {streams[sid]['status']} ({streams[sid]['reconnects']} reconnects)"
                                for sid in faulty if sid in streams),
        })
        last_totals = {"frames": frames, "dropped": dropped, "ts": snap_ts}
        r = rows[-1]
        print(f"{r['t']:6.0f}s rss {r['rss']:.1f} MB threads {r['threads']} fds {r['fds']} p50 {r['p50']:.1f} "
              f"p99 {r['p99']:.1f} ms fps {r['fps']:.1f} dropped {r['dropped']} | {r['faults']}", flush=True)
    stopped_at = time.monotonic()
    stop_pipeline.set()
    runner.join(10)
    pipeline_stop_s = time.monotonic() - stopped_at
    stop_sub.set()
    sub_thread.join(2)
    publisher.close()
    engine.close()
    for _, _, proc in cameras:
        proc.terminate()
        proc.wait(5)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    stops = stop_checks(args.stop_repeats) if args.stop_repeats > 0 else []

    steady = rows[1:] if len(rows) > 2 else rows  # the first interval is warm-up
    base, end = steady[0], steady[-1]
    growth = 100 * (end["rss"] / base["rss"] - 1)
    p99_first = float(np.nanmean([r["p99"] for r in steady[: max(1, len(steady) // 3)]]))
    p99_last = float(np.nanmean([r["p99"] for r in steady[-max(1, len(steady) // 3):]]))
    threads = sorted({r["threads"] for r in steady})
    fds = sorted({r["fds"] for r in steady})
    lines = ["| t (s) | RSS MB | OS threads | open fds | latency p50 ms | p99 ms | fps (synthetic streams) | "
             "dropped in interval | faulty cameras |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['t']:.0f} | {r['rss']:.1f} | {r['threads']} | {r['fds']} | {r['p50']:.1f} | {r['p99']:.1f} | "
              f"{r['fps']:.1f} | {r['dropped']} | {r['faults']} |" for r in rows]
    grew = growth <= 5.0
    # Growth: the last third's maximum above the first third's maximum (a stalled camera's abandoned readers come
    # and go, one at a time, as FFmpeg's own read timeout frees them).
    third = max(1, len(steady) // 3)
    thread_leak = max(r["threads"] for r in steady[-third:]) > max(r["threads"] for r in steady[:third])
    fd_leak = max(r["fds"] for r in steady[-third:]) > max(r["fds"] for r in steady[:third])
    # Drift: the last third's p99 beyond 1.25x the first third's plus 2 ms (one scheduler hiccup on 2 cores).
    drift = p99_last > 1.25 * p99_first + 2.0
    stride = effective_frame_stride(specs[0], engine)
    lines += [
        "",
        f"- RSS growth after warm-up: {growth:+.2f}% ({base['rss']:.1f} -> {end['rss']:.1f} MB; target <= 5%): "
        f"{'met' if grew else 'NOT met'}",
        f"- OS threads after warm-up: {threads}: {'grew (leak)' if thread_leak else 'no growth'}",
        f"- open file descriptors after warm-up: {fds}: {'grew (leak)' if fd_leak else 'no growth'}",
        f"- p99 latency, first third vs last third of the run: {p99_first:.1f} vs {p99_last:.1f} ms: "
        f"{'drift' if drift else 'no drift'} (drift: last > 1.25 x first + 2 ms)",
        f"- frames of the synthetic streams dropped after warm-up: {sum(r['dropped'] for r in steady)}",
        f"- messages received by the subscriber: {received[0]}",
        f"- stopping the soak's pipeline (stop set -> run returned, every capture joined or left blocked): "
        f"{pipeline_stop_s:.2f} s",
        f"\n{args.streams} synthetic 30 fps streams (320x240) and {args.flapping} flapping + {args.stalled} stalled "
        f"IP cameras (tools/ip_camera.py, MJPEG over HTTP on 127.0.0.1, 320x240 at 30 fps), model "
        f"{engine.model_name} ({engine.backend}), {args.minutes:g} minutes, sampled every {args.sample_seconds:g} s "
        f"(the first interval is warm-up). fps and drops count the synthetic streams' frames the model processed: "
        f"one in {stride} (the model's frame stride). Latency is capture->publish of the predictions published in "
        "each interval. Frames the model could not keep up with are dropped by design (a live source holds at most "
        f"{PipelineOptions().live_buffer} frames for the model, `--live-buffer`)." + made_by,
    ]
    if stops:
        lines += ["", f"Stops: `streamtsm run` sent SIGTERM in each state, {args.stop_repeats} times (time from the "
                  "signal to the process's exit, measured by its parent):", "",
                  "| state | seconds to exit (each run) | exit codes | <= 1 s, exit 0 |", "|---|---|---|---|"]
        for r in stops:
            ok = max(r["times"]) <= 1.0 and r["codes"] == [0]
            lines.append(f"| {r['state']} | {', '.join(f'{t:.2f}' for t in r['times'])} | "
                         f"{', '.join(map(str, r['codes']))} | {'yes' if ok else 'NO'} |")
    lines.append("\nLoad average (1/5/15 min) before: " + " / ".join(f"{v:.2f}" for v in load_before)
                 + ", after: " + " / ".join(f"{v:.2f}" for v in os.getloadavg()) + ".")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("soak", "Soak: long run with several live streams and faulty cameras", body)


if __name__ == "__main__":
    main()
