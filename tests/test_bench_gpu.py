"""tools/bench_gpu.py on any machine: one row per (provider, precision), providers that cannot run here reported
with the reason instead of raising, the IOBinding stepper equal to plain session.run with the state fed back, and
the fp16 conversion keeping the float32 interface and agreeing with fp32."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from streamtsm.export import export_onnx
from streamtsm.formats import FRAME, LOGITS, read_metadata

from .test_onnx_export import SIZE, tiny_online

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_gpu  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--size", "32", "--batches", "1,2", "--iterations", "2", "--min-iterations", "1", "--warmup", "1",
        "--cpu-iterations", "2", "--profile-steps", "2", "--bn-frames", "8", "--agree-sequences", "1",
        "--agree-steps", "4", "--agree-batch", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu")
    report = export_onnx(tiny_online(seed=3), work / "tsm.onnx")
    fp16 = bench_gpu.write_float16(Path(report.path), work / "tsm.fp16.onnx")
    spec = [(s["name"], tuple(s["shape"])) for s in read_metadata(report.path)["state"]]
    return work, Path(report.path), fp16, spec


def table_rows(body: str, header_start: str) -> list[list[str]]:
    """Cells of the markdown table whose header line starts with ``header_start`` (header and rule dropped)."""
    lines = body.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_bench_gpu_table_has_a_row_per_provider_and_precision_and_reports_unavailable_ones(tmp_path, monkeypatch):
    # As on a machine without a GPU, whatever this one has: every GPU row must be reported, not raised.
    monkeypatch.setattr(bench_gpu, "cuda_device_count", lambda: 0)
    args = bench_gpu.parse_args([*TINY, "--work", str(tmp_path)])
    body, rows = bench_gpu.run(args, tmp_path)

    latency = table_rows(body, "| provider | precision | b1")
    assert latency[0] == ["provider", "precision", "b1 p50 / p99 ms", "b2 p50 / p99 ms", "best fps"]
    cells = {(r[0], r[1]): r[2:] for r in latency[2:]}
    assert list(cells) == [(p, q) for p in ("tensorrt", "cuda", "cpu") for q in ("fp32", "fp16")]
    for provider in ("tensorrt", "cuda"):
        for precision in ("fp32", "fp16"):
            assert cells[provider, precision][:2] == ["-", "-"]
            assert cells[provider, precision][2].startswith("not available: ")
    for precision in ("fp32", "fp16"):
        b1, b2, fps = cells["cpu", precision]
        assert re.fullmatch(r"\d+\.\d\d / \d+\.\d\d", b1) and re.fullmatch(r"\d+\.\d\d / \d+\.\d\d", b2)
        assert float(fps) > 0

    summary = table_rows(body, "| provider | precision | state between steps")
    assert len(summary) == 2 + 6 and all(len(r) == 10 for r in summary)
    by_row = {(r[0], r[1]): r[2:] for r in summary[2:]}
    assert by_row["cuda", "fp16"][0] == "not available: no CUDA device on this machine"
    cpu32, cpu16 = by_row["cpu", "fp32"], by_row["cpu", "fp16"]
    assert cpu32[1] == cpu16[1] == "0"  # no Memcpy nodes on the CPU provider
    assert cpu32[3] == "100.0%"  # the fp32 row against the fp32 reference on the same provider
    assert float(cpu16[3].rstrip("%")) >= 75.0
    assert {r.name: r.available for r in rows} == {"tensorrt fp32": False, "tensorrt fp16": False,
                                                  "cuda fp32": False, "cuda fp16": False,
                                                  "cpu fp32": True, "cpu fp16": True}


def test_open_session_names_a_missing_provider(exported, monkeypatch):
    work, fp32, _, spec = exported
    monkeypatch.setattr(bench_gpu.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(bench_gpu.Unavailable, match="has no TensorrtExecutionProvider"):
        bench_gpu.open_session(fp32, "tensorrt", "fp16", spec, 4, work, 1)


def test_open_session_without_a_cuda_device_is_unavailable(exported, monkeypatch):
    work, fp32, _, spec = exported
    monkeypatch.setattr(bench_gpu, "cuda_device_count", lambda: 0)
    with pytest.raises(bench_gpu.Unavailable, match="no CUDA device"):
        bench_gpu.open_session(fp32, "cuda", "fp32", spec, 4, work, 1)


def test_device_step_matches_session_run_with_the_state_fed_back(exported):
    work, fp32, _, spec = exported
    session = bench_gpu.open_session(fp32, "cpu", "fp32", spec, 3, work, 1)
    stepper = bench_gpu.DeviceStep(session, spec, 3, "cpu")
    state = {name: np.zeros((3, *shape), np.float32) for name, shape in spec}
    rng = np.random.default_rng(0)
    for _ in range(4):  # past the second step: both preallocated state sets have been read and written
        frames = rng.standard_normal((3, 3, SIZE, SIZE), dtype=np.float32)
        logits, *new = session.run([LOGITS, *("new_" + n for n, _ in spec)], {FRAME: frames, **state})
        state = dict(zip((n for n, _ in spec), new))
        np.testing.assert_allclose(stepper.step(frames), logits, rtol=1e-5, atol=1e-5)
    assert stepper.state_devices() == {"cpu"}


def test_count_copies_reads_the_profile_of_a_cpu_session(exported):
    work, fp32, _, spec = exported
    session = bench_gpu.open_session(fp32, "cpu", "fp32", spec, 2, work, 1, profile=True)
    stepper = bench_gpu.DeviceStep(session, spec, 2, "cpu")
    for _ in range(3):
        stepper.step(np.zeros((2, 3, SIZE, SIZE), np.float32))
    memcpy, on_cpu = bench_gpu.count_copies(session, 3)
    assert memcpy == 0
    assert on_cpu > 10  # every node of the graph ran on the CPU provider, so the trace was read


def test_float16_graph_keeps_the_float32_interface_and_agrees_with_fp32(exported):
    work, fp32, fp16, spec = exported
    model = onnx.load(str(fp16))
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in [*model.graph.input, *model.graph.output])
    assert [v.name for v in model.graph.input] == [v.name for v in onnx.load(str(fp32)).graph.input]
    weights = [i for i in model.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert weights and all(i.data_type == TensorProto.FLOAT16 for i in weights)
    assert read_metadata(fp16)["precision"] == "fp16"

    a = bench_gpu.DeviceStep(bench_gpu.open_session(fp32, "cpu", "fp32", spec, 4, work, 1), spec, 4, "cpu")
    b = bench_gpu.DeviceStep(bench_gpu.open_session(fp16, "cpu", "fp16", spec, 4, work, 1), spec, 4, "cpu")
    rng = np.random.default_rng(1)
    same = total = 0
    for _ in range(6):
        frames = rng.standard_normal((4, 3, SIZE, SIZE), dtype=np.float32)
        x, y = a.step(frames), b.step(frames)
        assert np.abs(x - y).max() <= 0.05 * max(1.0, np.abs(x).max())  # fp16 rounding, not a wrong graph
        same += int((x.argmax(1) == y.argmax(1)).sum())
        total += len(x)
    assert same / total >= 0.9


def test_float16_graph_refuses_subgraphs():
    then = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "then", [],
                                  [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                                   [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ValueError, match="subgraph"):
        bench_gpu.float16_graph(onnx.helper.make_model(graph))


def test_bench_gpu_parse_args_refuses_an_unknown_provider():
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--providers", "cuda,openvino"])
