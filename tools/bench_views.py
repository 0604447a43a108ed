"""What the overlay, the ``--output`` video and the web view (one client watching) cost the pipeline, one stream.

    python tools/bench_views.py [--rounds 8] [--frames 150] [--live-seconds 10] [--chromium]

Side by side in one run, alternating rounds, one stream, the same engine (tools/bench_pipeline.py's setup):
- off: the pipeline with its usual sink, the ZeroMQ publisher with a connected subscriber;
- on: the same plus what ``run --output out.avi --http-port PORT`` adds (streamtsm/cli.py ``_run``): the
  ``--output`` writer (overlay drawn on every frame, Motion JPEG file) and the web view (WebSink + WebServer) with one
  client that reads the page, the MJPEG stream and the Server-Sent Events continuously, as a browser tab does. The
  client runs in a process of its own (a browser is one): a small standard-library HTTP reader (this file with
  ``--client URL``), so that on a small machine it costs the CPU a browser's network side would, not a renderer's.

Two modes:
- saturated: a 320x240 MJPG file decoded as fast as the model consumes it; ms per processed frame = wall time of
  the run, closing the ``--output`` file included / frames (the writer must have written them);
- live: the synthetic scene paced at 30 fps; CPU seconds of this process (all its threads) per processed frame, and
  the capture->subscriber latency p50 / p99.

``--chromium`` adds live rounds where the client is a real headless Chromium (/usr/bin/chromium) showing the page;
its own CPU is reported apart (it is not in this process's figure), and on a 2-core machine it takes cores the
pipeline would otherwise get, so its rows are reported as a separate measurement.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import thread_cpu, thread_delta  # noqa: E402 (standard library only: light for --client)


# -- the client (a separate process: python tools/bench_views.py --client URL) ------------------------------------

def _read_stream(host: str, port: int, path: str, counts: dict, key: str, marker: bytes) -> None:
    """Reads ``path`` until the connection ends, counting ``marker`` occurrences (frames or SSE records); retries
    a 404 (the stream is not known until the pipeline's first step), as the page's image does."""
    while True:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            if resp.status == 404:
                resp.read()
                time.sleep(0.05)
                continue
            counts[key + "_status"] = resp.status
            tail = b""
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    return
                counts[key + "_bytes"] += len(chunk)
                data = tail + chunk
                counts[key] += data.count(marker)
                tail = data[-(len(marker) - 1):]
        except OSError:
            return
        finally:
            conn.close()


def client_main(url: str) -> None:
    """Loads the page, then reads /events and /video/<stream>.mjpg until SIGTERM; prints its counts as JSON."""
    u = urlsplit(url)
    host, port, stream = u.hostname, u.port, u.path.strip("/") or "cam"
    counts = {"page_bytes": 0, "events": 0, "events_bytes": 0, "frames": 0, "frames_bytes": 0}
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/")
    counts["page_bytes"] = len(conn.getresponse().read())
    conn.close()
    for path, key, marker in (("/events", "events", b"\n\n"), (f"/video/{stream}.mjpg", "frames", b"--streamtsmframe")):
        threading.Thread(target=_read_stream, args=(host, port, path, counts, key, marker), daemon=True).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("ready", flush=True)
    done.wait()
    counts["cpu_s"] = time.process_time()
    print(json.dumps(counts), flush=True)


# -- the benchmark -------------------------------------------------------------------------------------------------

def _start_client(url: str, chromium: bool, profile: Path | None) -> subprocess.Popen:
    if chromium:
        cmd = ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--remote-debugging-port=0", url]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    proc = subprocess.Popen([sys.executable, __file__, "--client", url + "cam"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its descendants still alive, from /proc (Linux)."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
        except (OSError, IndexError, ValueError):
            continue
    return total


def _what_thread(t: threading.Thread) -> str:
    name = t.name
    if t is threading.main_thread():
        return "main (the pipeline: model step, pre/post-processing, the sinks' inline calls)"
    if "process_request_thread" in name:
        return "http responses"
    if name.startswith("http-"):
        return "http accept"
    if name.startswith("Thread-") or name.startswith("capture") or "Capture" in type(t).__name__:
        return "capture" if "Capture" in type(t).__name__ else "other threads"
    return name


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of each live thread of this process by native id: (what it is, seconds), from /proc (Linux)."""
    return thread_cpu(_what_thread)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--live-seconds", type=float, default=10)
    ap.add_argument("--live-rounds", type=int, default=None, help="default: --rounds")
    ap.add_argument("--chromium", action="store_true", help="also live rounds with a headless Chromium as the client")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(args.client)
        return

    import cv2
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from bench_pipeline import subscriber_thread, bare_round, make_video
    from benchlib import pct, write_section

    from streamtsm.engine.factory import default_threads
    from streamtsm.engine.torch_engine import TorchOnlineEngine
    from streamtsm.models import create
    from streamtsm.pipeline import Pipeline, PipelineOptions, StreamSpec
    from streamtsm.preprocess import Preprocessor
    from streamtsm.publish import Publisher
    from streamtsm.sinks.video import video_sink
    from streamtsm.web import WebServer
    from streamtsm.web.sink import WebSink

    torch.set_num_threads(default_threads())
    engine = TorchOnlineEngine(create("tsm_mobilenetv2_online", num_classes=27))
    pre = Preprocessor.for_config(engine.cfg)
    frame = pre(np.random.default_rng(0).integers(0, 255, (240, 320, 3), np.uint8))[None]
    publisher = Publisher("tcp://127.0.0.1:*")
    stop, latencies = threading.Event(), []
    sub = subscriber_thread(publisher.endpoint, stop, latencies)
    time.sleep(0.5)  # let the subscription reach the publisher before measuring (benchmark only)
    load_before = os.getloadavg()

    def one_round(source: str, views: bool, tmp: Path, *, frames: int | None = None, duration: float | None = None,
                  chromium: bool = False) -> dict:
        """One pipeline run; with ``views`` the --output writer and the web view with its client."""
        sinks, extra = [publisher], {}
        web = server = client = video = None
        if views:
            video = video_sink(str(tmp / "out.avi"), ["cam"])
            web = WebSink()
            server = WebServer(0, view=web, what="the web view").start()
            client = _start_client(server.url, chromium, tmp / "chromium-profile")
            deadline = time.monotonic() + 30
            while web.stats()["pages"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)  # the page is loaded (its event stream open) before the round starts
            sinks += [video, web]
        pipeline = Pipeline(engine, [StreamSpec(source, "cam")], sinks=sinks,
                            options=PipelineOptions(max_frames=frames, duration=duration, stats_interval=1.0))
        pipeline.start()
        latencies.clear()
        cpu0, t0 = time.process_time(), time.perf_counter()
        client_cpu0 = _tree_cpu(client.pid) if client is not None else 0.0
        threads0 = _thread_cpu()
        stats = pipeline.run()
        # Before the sinks close, while their threads still live (the writer's last few queued frames are missed).
        threads = thread_delta(threads0, _thread_cpu())
        threads["threads ended before the sample (capture)"] = time.process_time() - cpu0 - sum(threads.values())
        if video is not None:
            video.close()  # the file is written and closed: part of the cost
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if client is not None:
            extra["client_cpu_s"] = _tree_cpu(client.pid) - client_cpu0
            if chromium:
                os.killpg(client.pid, signal.SIGTERM)
                client.wait(10)
                shutil.rmtree(tmp / "chromium-profile", ignore_errors=True)
            else:
                client.send_signal(signal.SIGTERM)
                extra["client"] = json.loads(client.communicate(timeout=10)[0])
            server.close()
            web.close()
            extra["web"] = web.stats()
            extra["written"] = video.target.files["cam"].written
            extra["output_dropped"] = video.dropped
        done = stats["streams"]["cam"]["frames"]
        return {"threads": threads, "wall_s": wall, "ms_per_frame": wall / done * 1e3,
                "cpu_ms_per_frame": cpu / done * 1e3, "frames": done,
                "lat_p50": pct(latencies, 50) if latencies else float("nan"),
                "lat_p99": pct(latencies, 99) if latencies else float("nan"), "stats": stats, **extra}

    live_rounds = args.live_rounds or args.rounds
    res: dict[str, list[dict]] = {k: [] for k in ("sat_off", "sat_on", "live_off", "live_on", "live_off_c",
                                                  "live_chromium")}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        video_in = tmp / "scene.avi"
        make_video(video_in, args.frames)
        bare_round(engine, frame, 20)  # warm-up
        one_round(str(video_in), True, tmp, frames=args.frames)  # warm-up: imports, first JPEG, first file
        for i in range(args.rounds):
            # Alternate which goes first, so a drift in the machine's load falls on both alike.
            for views in ((False, True) if i % 2 == 0 else (True, False)):
                r = one_round(str(video_in), views, tmp, frames=args.frames)
                res["sat_on" if views else "sat_off"].append(r)
                print(f"saturated {'on ' if views else 'off'} {r['ms_per_frame']:.2f} ms/frame", flush=True)
        live = "synthetic:320x240@30"
        for i in range(live_rounds):
            for views in ((False, True) if i % 2 == 0 else (True, False)):
                r = one_round(live, views, tmp, duration=args.live_seconds)
                res["live_on" if views else "live_off"].append(r)
                print(f"live {'on ' if views else 'off'} {r['cpu_ms_per_frame']:.2f} CPU ms/frame, "
                      f"p50 {r['lat_p50']:.1f} p99 {r['lat_p99']:.1f}", flush=True)
        if args.chromium:
            for i in range(max(2, live_rounds // 2)):
                for kind in (("live_off_c", "live_chromium") if i % 2 == 0 else ("live_chromium", "live_off_c")):
                    r = one_round(live, kind == "live_chromium", tmp, duration=args.live_seconds,
                                  chromium=kind == "live_chromium")
                    res[kind].append(r)
                    print(f"{kind} {r.get('web')} {r['cpu_ms_per_frame']:.2f} CPU ms/frame, p50 {r['lat_p50']:.1f} "
                          f"p99 {r['lat_p99']:.1f} client cpu {r.get('client_cpu_s', 0):.1f}s", flush=True)
    stop.set()
    sub.join(2)
    publisher.close()
    load_after = os.getloadavg()

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in res[key])

    def rounds(key: str, field: str) -> str:
        return ", ".join(f"{r[field]:.2f}" for r in res[key])

    def over(a: float, b: float) -> str:
        return f"{100 * (b / a - 1):+.1f}%"

    def paired(off: str, on: str, field: str) -> str:
        # Round i's off and on ran back to back: their ratio cancels the load drifts that move both.
        ratios = [b[field] / a[field] for a, b in zip(res[off], res[on])]
        return f"{100 * (statistics.median(ratios) - 1):+.1f}%" if ratios else "n/a"

    sat_off, sat_on = med("sat_off", "ms_per_frame"), med("sat_on", "ms_per_frame")
    cpu_off, cpu_on = med("live_off", "cpu_ms_per_frame"), med("live_on", "cpu_ms_per_frame")
    on = res["live_on"] + res["sat_on"]
    client_rates = [r["client"]["frames"] / r["wall_s"] for r in res["live_on"]]
    lines = [
        "Off: the pipeline with the ZeroMQ publisher and a connected subscriber. On: the same plus what "
        "`run --output out.avi --http-port PORT` adds, the --output writer (the overlay on every frame, a Motion JPEG "
        "file, closed within the timed run) and the web view with one client that loads the page and then reads the "
        "MJPEG stream and the Server-Sent Events continuously. The client is a standard-library HTTP reader in a "
        "process of its own (`tools/bench_views.py --client`): on 2 cores a real browser's renderer would itself "
        "take a core from the pipeline, so it stands in for the browser's network side; the rows with a headless "
        "Chromium showing the page are a separate measurement. Rounds alternate off/on (the order flips every "
        "round) in one process with one engine; one stream; medians.",
        "",
        "| measure (one stream, median of the rounds) | off | on | overhead |", "|---|---|---|---|",
        f"| saturated file, ms per processed frame ({args.rounds} rounds of {args.frames} frames each) | "
        f"{sat_off:.2f} | {sat_on:.2f} | **{over(sat_off, sat_on)}** |",
        f"| ... median of the per-round ratios on/off (each round's pair ran back to back) | | | "
        f"{paired('sat_off', 'sat_on', 'ms_per_frame')} |",
        f"| live 30 fps, CPU ms of the process per processed frame ({live_rounds} rounds of {args.live_seconds:g} s) | "
        f"{cpu_off:.2f} | {cpu_on:.2f} | **{over(cpu_off, cpu_on)}** |",
        f"| ... median of the per-round ratios on/off | | | {paired('live_off', 'live_on', 'cpu_ms_per_frame')} |",
        f"| live 30 fps, frames processed per round | {med('live_off', 'frames'):.0f} | "
        f"{med('live_on', 'frames'):.0f} | |",
        f"| live 30 fps, capture->subscriber latency p50, ms | {med('live_off', 'lat_p50'):.1f} | "
        f"{med('live_on', 'lat_p50'):.1f} | {med('live_on', 'lat_p50') - med('live_off', 'lat_p50'):+.1f} ms |",
        f"| live 30 fps, capture->subscriber latency p99, ms | {med('live_off', 'lat_p99'):.1f} | "
        f"{med('live_on', 'lat_p99'):.1f} | {med('live_on', 'lat_p99') - med('live_off', 'lat_p99'):+.1f} ms |",
    ]
    if res["live_chromium"]:
        ch, off2 = res["live_chromium"], res["live_off_c"]
        c_on = statistics.median(r["cpu_ms_per_frame"] for r in ch)
        c_off = statistics.median(r["cpu_ms_per_frame"] for r in off2)
        lines += [
            f"| live 30 fps with a headless Chromium as the client, CPU ms of the process per processed frame "
            f"({len(ch)} rounds, against the off rounds alternating with them) | {c_off:.2f} | {c_on:.2f} | "
            f"**{over(c_off, c_on)}** |",
            f"| ... median of the per-round ratios on/off | | | "
            f"{paired('live_off_c', 'live_chromium', 'cpu_ms_per_frame')} |",
            f"| ... latency p50 / p99, ms | {statistics.median(r['lat_p50'] for r in off2):.1f} / "
            f"{statistics.median(r['lat_p99'] for r in off2):.1f} | {statistics.median(r['lat_p50'] for r in ch):.1f}"
            f" / {statistics.median(r['lat_p99'] for r in ch):.1f} | |",
            f"| ... Chromium's own CPU (its processes), ms per processed frame | | "
            f"{statistics.median(r['client_cpu_s'] / r['frames'] * 1e3 for r in ch):.2f} | |",
        ]
    views_threads = ("sink-output", "web-encoder", "http responses", "http accept")
    direct = statistics.median(sum(r["threads"].get(n, 0.0) for n in views_threads) / r["frames"] * 1e3
                               for r in res["live_on"])
    lines += [
        "",
        f"The views' own threads (the --output writer, the web view's encoder and its HTTP responses) used a median "
        f"{direct:.2f} CPU ms per processed frame live, {100 * direct / cpu_off:.1f}% of the process's CPU per frame "
        "with the views off: the cost they add by themselves, measured apart from the load's noise on the totals "
        "(the breakdown below). Target: overhead <= 10% at one stream.",
    ]
    names = sorted({n for r in res["live_on"] + res["live_off"] for n in r["threads"]})
    lines += ["", "Where the CPU goes, live 30 fps: CPU ms per processed frame by thread, median of the rounds "
              "(from /proc/self/task; `sink-output` is the --output writer: overlay + Motion JPEG file; "
              "`web-encoder` the web view's overlay + JPEG at most 10 per second; `http responses` the MJPEG and "
              "SSE writers to the client)", "", "| thread | off | on |", "|---|---|---|"]
    for n in names:
        per = {k: statistics.median(r["threads"].get(n, 0.0) / r["frames"] * 1e3 for r in res[k])
               for k in ("live_off", "live_on")}
        lines.append(f"| {n} | {per['live_off']:.2f} | {per['live_on']:.2f} |")
    lines += [
        "",
        f"Rounds, saturated (ms/frame): off {rounds('sat_off', 'ms_per_frame')}; "
        f"on {rounds('sat_on', 'ms_per_frame')}.  ",
        f"Rounds, live (CPU ms/frame): off {rounds('live_off', 'cpu_ms_per_frame')}; "
        f"on {rounds('live_on', 'cpu_ms_per_frame')}.  ",
        f"With the views on: --output wrote {sum(r['written'] for r in on)} frames and dropped "
        f"{sum(r['output_dropped'] for r in on)}; the web view encoded {sum(r['web']['frames_encoded'] for r in on)} "
        f"JPEGs (at most 10 per second), its client received a median "
        f"{statistics.median(client_rates):.1f} JPEGs/s live and "
        f"{sum(r['client']['events'] for r in on)} SSE records in all; the client process used a median "
        f"{statistics.median(r['client_cpu_s'] / r['frames'] * 1e3 for r in res['live_on']):.2f} CPU ms per frame "
        "(not in the process figure).  ",
        f"Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; the machine is shared. "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OpenCV {cv2.__version__}, random weights.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("views", "Overlay, --output and web view: overhead at one stream (CPU)", body)


if __name__ == "__main__":
    main()
