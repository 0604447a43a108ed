"""Online step latency through a real Triton server vs local onnxruntime, side by side in one run (CPU).

    python tools/bench_triton.py [--size 224] [--iterations 150] [--batches 1,4] [--no-write]

The server is the ``tritonserver`` of the nvidia-pytriton wheel in .venv-triton (tools/setup_triton.sh), on
127.0.0.1, serving the model as ``export-triton --runtime python`` writes it (the python backend's model.py steps the
served ONNX graph with onnxruntime and keeps each stream's state). The client is ``TritonOnlineEngine`` over gRPC,
one request per stream, all in flight at once; the local case is ``OrtOnlineEngine`` on the export-onnx file of the
same weights. Both onnxruntime sessions use onnxruntime's default threads on the same machine, so the difference is
what Triton adds: gRPC, the sequence batcher, the python backend's shared-memory hand-off and the state bookkeeping.

No trained 224 checkpoint ships with streamtsm: the MobileNetV2-TSM weights are random (latency does not depend
on them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import interleaved, summary, write_section  # noqa: E402

from streamtsm.engine.onnxruntime_engine import OrtOnlineEngine  # noqa: E402
from streamtsm.engine.triton_engine import TritonOnlineEngine  # noqa: E402
from streamtsm.engine.triton_server import LocalTritonServer, find_install  # noqa: E402
from streamtsm.export import export_onnx  # noqa: E402
from streamtsm.export.triton import export_triton  # noqa: E402
from streamtsm.models import create  # noqa: E402


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224, help="frame side (default: 224)")
    ap.add_argument("--iterations", type=int, default=150, help="timed steps per case (default: 150)")
    ap.add_argument("--batches", default="1,4", help="streams stepped together, comma-separated (default: 1,4)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    install = find_install()
    server_ort = subprocess.run([str(install.env / "bin" / "python"), "-c",
                                 "import onnxruntime; print(onnxruntime.__version__)"],
                                capture_output=True, text=True, check=True).stdout.strip()
    load_before = load_average()
    busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    torch.manual_seed(0)
    model = create("tsm_mobilenetv2_online", num_classes=27, input_size=args.size).eval()
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "tsm.onnx"
        export_onnx(model, plain, verify=False)
        export_triton(plain, Path(tmp) / "repo", name="tsm", runtime="python", max_batch_size=max(batches),
                      verify=False)
        with LocalTritonServer(Path(tmp) / "repo", install=install) as server:
            server.wait_model_ready("tsm", timeout_s=120)
            local = OrtOnlineEngine(plain, providers="cpu")
            remote = TritonOnlineEngine(server.grpc_url, "tsm", timeout_s=60)
            try:
                rng = np.random.default_rng(0)
                for batch in batches:
                    frames = rng.standard_normal((batch, 3, args.size, args.size), dtype=np.float32)
                    states = {"local": local.zero_state(batch), "triton": remote.zero_state(batch)}
                    engines = {"local": local, "triton": remote}
                    def case(name):
                        def step():
                            _, states[name] = engines[name].step(frames, states[name])
                        return step

                    times = interleaved({f"onnxruntime in process, {batch} stream(s)": case("local"),
                                         f"Triton python backend over gRPC, {batch} stream(s)": case("triton")},
                                        args.iterations)
                    for name, samples in times.items():
                        p50, p99, mean = summary(samples)
                        rows.append(f"| {name} | {p50:.2f} | {p99:.2f} | {mean:.2f} | {1e3 * batch / mean:.0f} |")
                    local_p50 = summary(next(v for k, v in times.items() if k.startswith("onnxruntime")))[0]
                    triton_p50 = summary(next(v for k, v in times.items() if k.startswith("Triton")))[0]
                    notes.append(f"batch {batch}: Triton p50 minus local p50 {triton_p50 - local_p50:+.2f} ms "
                                 f"(ratio {triton_p50 / local_p50:.2f})")
            finally:
                remote.close()
    body = "\n".join([
        "| path | p50 ms | p99 ms | mean ms | frames/s |", "|---|---|---|---|---|", *rows, "",
        f"One step = one frame of each stream, state kept (locally by the engine, on the server by model.py); "
        f"{args.iterations} steps per case after 5 warm-up steps, the two paths interleaved round-robin. "
        f"tsm_mobilenetv2_online at {args.size}x{args.size}, 27 classes, random weights; "
        f"onnxruntime {ort.__version__} in process, {server_ort} in the server's model.py (Python "
        f"{install.python_version}), CPUExecutionProvider, "
        f"default threads on both sides; Triton 2.51 from nvidia-pytriton, 127.0.0.1. "
        + "; ".join(notes) + ".  ",
        f"Load average (1/5/15 min) before: {load_before}, after: {load_average()} on {os.cpu_count()} cores"
        + (": **the machine was loaded well beyond its cores** (shared with other work), so every figure here is "
           "dominated by CPU contention; the two paths were interleaved, but the server's and this process's "
           "onnxruntime threads compete differently for the cores, so even the comparison is rough. Rerun on a "
           "quiet machine for figures to plan with." if busy else ".")
    ])
    print(body)
    if not args.no_write:
        write_section("triton", "Online step through a real Triton server vs local onnxruntime (CPU)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
