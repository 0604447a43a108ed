"""Live 30 fps streams sustained by 1, 2, ... `streamtsm run` processes behind one `streamtsm broker`, on this
machine: where adding processes stops adding streams (the cores run out).

    python tools/bench_workers.py [--processes 1,2] [--streams 6,8,10,12] [--precision int8] [--seconds 15]
                                  [--warmup 4] [--threads N] [--lanes N] [--calib-frames 96]
                                  [--no-write]

This is the documented way to scale past one process (README, "Scaling"): one broker, and each `run` publishing into
its frontend with ``--connect``; subscribers read every process's messages from the broker's backend. For each
process count P and each total N of the schedule (stopping after two failures in a row), the tool starts the broker
and P ``streamtsm run`` processes, each with N/P synthetic 320x240 30 fps sources (streams ``w<p>c<i>``), the online
MobileNetV2-TSM at 224 (``--onnx``, random but calibrated weights as in tools/bench_streams.py), ``--threads``
onnxruntime threads and ``--lanes`` lanes (defaults: what `run` takes, divided among the processes,
at least 1, so they do not oversubscribe the cores). A subscriber on the backend keeps every stats and pred message. After every process reports all its streams
running, ``--warmup`` seconds are let pass, then the window of ``--seconds`` is measured.

A total is sustained when, over the window, in every process: no frame was dropped, every source delivered >= 98% of
30 fps, the publisher refused nothing, and the capture->subscriber latency (through the broker) did not grow (last
third's p50 <= 1.5 x the first third's + 5 ms). CPU is the processes' and the broker's CPU time over the window
(from /proc), in cores, beside how busy the whole machine was (/proc/stat: these and every other process): a failure
with every core busy is the cores running out.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streams import (FPS, GROWTH_FACTOR, GROWTH_SLACK_MS, HEIGHT, MIN_CAPTURE_RATIO, WIDTH,  # noqa: E402
                           build_models)
from benchlib import (SubscriberThread, busy_seconds, cpu_ticks, pct, stat_cpu_seconds, steal_share,  # noqa: E402
                      write_section)

from streamtsm.engine.factory import default_threads  # noqa: E402
from streamtsm.pipeline import default_lanes  # noqa: E402

CLI = [sys.executable, "-m", "streamtsm.cli"]
READY_TIMEOUT_S = 120.0  # a `run` on a loaded machine takes a while to import and load its model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Messages(SubscriberThread):
    """A subscriber thread on the broker's backend keeping stats snapshots per stream and every prediction."""

    def __init__(self, endpoint: str) -> None:
        self.stats: list[tuple[float, dict]] = []  # (receive time, payload)
        self.preds: list[tuple[float, float, float]] = []  # (capture ts, capture->publish ms, capture->receive ms)
        super().__init__(endpoint)

    def on_message(self, received: float, payload: dict) -> None:
        if payload.get("type") == "stats" and payload.get("streams"):
            self.stats.append((received, payload))
        elif payload.get("type") == "pred":
            self.preds.append((payload["capture_ts"], payload["latency_ms"], (received - payload["capture_ts"]) * 1e3))

    def running(self, streams: set[str]) -> bool:
        """Whether every stream has been reported running."""
        seen = set()
        with self.lock:
            for _, p in self.stats:
                seen |= {sid for sid, v in p["streams"].items() if v["status"] == "running"}
        return streams <= seen


def snapshot_near(stats: list[tuple[float, dict]], sid: str, t: float) -> dict | None:
    """The process stats message holding ``sid`` received nearest to ``t``."""
    having = [(abs(ts - t), p) for ts, p in stats if sid in p["streams"]]
    return min(having, key=lambda x: x[0])[1] if having else None


def run_case(model: str, processes: int, total: int, args: argparse.Namespace) -> dict:
    per = [total // processes + (1 if p < total % processes else 0) for p in range(processes)]
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = subprocess.Popen(CLI + ["broker", "--frontend", front, "--backend", back],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    messages = Messages(back)
    workers: list[subprocess.Popen] = []
    names = [[f"w{p}c{i}" for i in range(n)] for p, n in enumerate(per)]
    try:
        for p, n in enumerate(per):
            cmd = CLI + ["run", "--onnx", model, "--connect", front, "--threads", str(args.threads_each),
                         "--lanes", str(args.lanes_each), "--quiet", "--stats-interval", "1"]
            for name in names[p]:
                cmd += ["--source", f"synthetic:{WIDTH}x{HEIGHT}@{FPS:g}", "--name", name]
            workers.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        everyone = {n for group in names for n in group}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not messages.running(everyone):
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                return {"processes": processes, "n": total, "reasons": ["did not start"],
                        "error": "a process exited or did not report all its streams running"}
            time.sleep(0.2)
        time.sleep(args.warmup)
        pids = [broker.pid] + [w.pid for w in workers]
        cpu0, t0, ticks0 = sum(stat_cpu_seconds(f"/proc/{pid}/stat") for pid in pids), time.time(), cpu_ticks()
        time.sleep(args.seconds)
        cpu1, t1, ticks1 = sum(stat_cpu_seconds(f"/proc/{pid}/stat") for pid in pids), time.time(), cpu_ticks()
        time.sleep(1.5)  # the stats message after the window's end
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(20)
            except subprocess.TimeoutExpired:
                w.kill()
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
        messages.close()

    with messages.lock:
        stats, preds = list(messages.stats), list(messages.preds)
    dropped = publish_dropped = 0
    fps_min, cap_min = float("inf"), float("inf")
    for group in names:
        first, last = snapshot_near(stats, group[0], t0), snapshot_near(stats, group[0], t1)
        if first is None or last is None or first is last:
            return {"processes": processes, "n": total, "reasons": ["no window"], "error": "too few stats messages"}
        span = last["publish_ts"] - first["publish_ts"]
        publish_dropped += last["publish_dropped"] - first["publish_dropped"]
        for sid in group:
            a, b = first["streams"][sid], last["streams"][sid]
            dropped += b["dropped"] - a["dropped"]
            fps_min = min(fps_min, (b["frames"] - a["frames"]) / span)
            cap_min = min(cap_min, (b["captured"] - a["captured"]) / span)
    window = sorted(p for p in preds if t0 <= p[0] <= t1)
    pub = [p[1] for p in window]
    recv = [p[2] for p in window]
    third = max(1, len(window) // 3)
    r = {"processes": processes, "n": total, "per_process": per, "threads": args.threads_each,
         "lanes": args.lanes_each,
         "dropped": dropped, "publish_dropped": publish_dropped, "fps_min": fps_min, "capture_fps_min": cap_min,
         "received": len(window), "cores": (cpu1 - cpu0) / (t1 - t0),
         "machine_busy": busy_seconds(ticks0, ticks1) / (t1 - t0),
         "steal": steal_share(ticks0, ticks1)}
    reasons = []
    if dropped:
        reasons.append(f"{dropped} frames dropped")
    if cap_min < MIN_CAPTURE_RATIO * FPS:
        reasons.append(f"a source delivered {cap_min:.1f} fps")
    if publish_dropped:
        reasons.append(f"{publish_dropped} messages refused by a publisher")
    if not window:
        reasons.append("no prediction received")
    else:
        r.update({"p50": pct(pub, 50), "p99": pct(pub, 99), "recv_p50": pct(recv, 50), "recv_p99": pct(recv, 99)})
        first_p50, last_p50 = pct(recv[:third], 50), pct(recv[-third:], 50)
        if last_p50 > GROWTH_FACTOR * first_p50 + GROWTH_SLACK_MS:
            reasons.append(f"capture->subscriber latency grows ({first_p50:.0f} -> {last_p50:.0f} ms)")
    r["reasons"] = reasons
    return r


def _f(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", default="1,2", help="process counts to try, comma-separated")
    ap.add_argument("--streams", default="6,8,10,12", help="increasing schedule of total stream counts")
    ap.add_argument("--precision", choices=("fp32", "int8"), default="int8")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured window per case")
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds after all streams run, before the window")
    ap.add_argument("--threads", type=int, default=None,
                    help="onnxruntime threads per process (default: what `run` takes, all cores but one, divided "
                         "among the processes, at least 1)")
    ap.add_argument("--lanes", type=int, default=None,
                    help="lanes per process (default: what `run` takes, divided among the processes, at least 1)")
    ap.add_argument("--calib-frames", type=int, default=96, help="int8 calibration frames (synthetic)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    counts = sorted({int(x) for x in args.processes.split(",") if x.strip()})
    schedule = sorted({int(x) for x in args.streams.split(",") if x.strip()})
    if not counts or counts[0] < 1 or not schedule or schedule[0] < 1:
        ap.error("--processes and --streams take positive integers")
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        args.precision = [args.precision]
        models = build_models(Path(tmp), argparse.Namespace(threads=max(1, cores - 1), precision=args.precision,
                                                            calib_frames=args.calib_frames))
        model = str(models[args.precision[0]])
        for processes in counts:
            args.threads_each = args.threads or max(1, default_threads() // processes)
            args.lanes_each = args.lanes or max(1, default_lanes() // processes)
            failures = 0
            for total in schedule:
                if total < processes:
                    continue
                r = run_case(model, processes, total, args)
                rows.append(r)
                print(f"P={processes} N={total}: " + (r.get("error") or
                      f"cores {r['cores']:.2f} (machine {r['machine_busy']:.2f}), dropped {r['dropped']}, "
                      f"fps min {r['fps_min']:.1f}, "
                      f"p99 capture->publish {_f(r.get('p99'))} ms, ->subscriber {_f(r.get('recv_p99'))} ms, "
                      + ("sustained" if not r["reasons"] else "not sustained: " + "; ".join(r["reasons"]))),
                      flush=True)
                failures = failures + 1 if r["reasons"] else 0
                if failures == 2:
                    break
    load_after = os.getloadavg()
    body = report(args, rows, cores, load_before, load_after)
    print(body)
    if not args.no_write:
        write_section("workers", "Scaling past one process: streams versus `run` processes behind the broker", body)


def report(args, rows, cores, load_before, load_after) -> str:
    lines = [f"| processes | threads / lanes each | streams (per process) | CPU cores (of {cores}) | "
             "whole machine busy (cores) | CPU stolen by the host | dropped | slowest stream fps | "
             "p99 capture->publish ms | p99 capture->subscriber ms | sustained |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['processes']} | - | {r['n']} | - | - | - | - | - | - | - | **no** ({r['error']}) |")
            continue
        ok = "yes" if not r["reasons"] else "**no**: " + "; ".join(r["reasons"])
        lines.append(f"| {r['processes']} | {r['threads']} / {r['lanes']} | {r['n']} "
                     f"({' + '.join(map(str, r['per_process']))}) | {r['cores']:.2f} | {r['machine_busy']:.2f} | "
                     f"{r['steal']:.1%} | {r['dropped']} | {r['fps_min']:.1f} | "
                     f"{_f(r.get('p99'))} | {_f(r.get('recv_p99'))} | {ok} |")
    lines.append("")
    best = {}
    for r in rows:
        if not r["reasons"]:
            best[r["processes"]] = max(best.get(r["processes"], 0), r["n"])
    for p in sorted({r["processes"] for r in rows}):
        lines.append(f"- {p} process{'es' if p > 1 else ''}: largest sustained total = **{best.get(p, 0)}**.")
    # Other work during the windows, measured: the whole machine's busy cores beyond these processes' (the load
    # average before the run also counts what a previous benchmark left in its 1-minute decay).
    others = [r["machine_busy"] - r["cores"] for r in rows if "error" not in r]
    loaded = bool(others) and max(others) > 0.25
    for r in rows:
        if "error" not in r and r["reasons"] and r["machine_busy"] >= 0.95 * cores:
            whose = ("mostly other processes'" if r["cores"] < 0.5 * r["machine_busy"] else "mostly these processes'")
            lines.append(f"- The cores ran out at {r['processes']} process{'es' if r['processes'] > 1 else ''} and "
                         f"{r['n']} streams: the machine was {r['machine_busy']:.2f} of {cores} cores busy "
                         f"({whose} work: these used {r['cores']:.2f}), and streams dropped frames.")
            break
    else:
        lines.append("- No failed case had every core busy: what failed was not for want of cores.")
    if loaded:
        lines.append(f"- **The machine was loaded by other work** (up to {max(others):.2f} cores busy beyond these "
                     "processes in a window): where these processes alone run out of cores needs a rerun on a quiet "
                     "machine (the command above).")
    else:
        lines.append(f"- Nothing else ran: at most {max([0.0, *others]):.2f} cores busy beyond these processes in "
                     "any window.")
    lines += ["", (f"Run at {time.strftime('%H:%M UTC', time.gmtime())}, {args.precision[0]}, "
                   f"{args.warmup:g} s warm-up then a {args.seconds:g} s window per case. Each case: a fresh "
                   "`streamtsm broker` and P `streamtsm run --connect` processes (synthetic 320x240 sources started "
                   "together, so their frame clocks are close to in step), a subscriber on the backend in this "
                   "process; the broker and the subscriber run on the same cores. Load average (1/5/15 min) "
                   "before: " + " / ".join(f"{x:.1f}" for x in load_before) + ", after: "
                   + " / ".join(f"{x:.1f}" for x in load_after) + f" on {cores} cores"
                   + (": **the machine was loaded**, so these figures understate a quiet machine." if loaded else "."))]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
