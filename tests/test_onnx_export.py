"""ONNX export: the step graph equals the offline model frame by frame, one file serves any batch, the metadata
describes the file, verification catches a graph that differs, int8 keeps the state float; the CLI commands."""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from streamtsm.config import ModelConfig
from streamtsm.engine.onnxruntime_engine import load_onnx_engine
from streamtsm.errors import ConfigError
from streamtsm.export import ExportError, calibration_frames, export_onnx, quantize_int8, read_metadata, verify_onnx
from streamtsm.export import onnx as onnx_export
from streamtsm.export.quantize import clip_windows
from streamtsm.export.commands import add_commands
from streamtsm.labels import read_labels
from streamtsm.models import create, save_checkpoint

from .conftest import randomize_, scaled_diff

SIZE = 32
# Per output, in units of max(1, max |reference|): see streamtsm.export.onnx.TOLERANCE for why not a bare 1e-4.
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_online(name: str = "tsm_mobilenetv2_online", seed: int = 0, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # create() draws the conv weights from the global generator
        model = create(name, num_classes=5, width_mult=0.25, input_size=SIZE, resize_size=SIZE, **kw)
    return randomize_(model, seed=seed)


def tiny_clip(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create("tsm_r18", num_classes=5, width=8, input_size=SIZE, resize_size=SIZE)
    return randomize_(model, seed=seed)


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    model = tiny_online()
    path = tmp_path_factory.mktemp("onnx") / "online.onnx"
    report = export_onnx(model, path, labels=[f"act{i}" for i in range(5)])
    return model, path, report


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    model = tiny_clip()
    path = tmp_path_factory.mktemp("onnx") / "clip.onnx"
    return model, path, export_onnx(model, path)


def run_steps(sess: ort.InferenceSession, frames: np.ndarray, shapes) -> np.ndarray:
    """Logits [B, T, K] of the step graph fed frame by frame, its state fed back, from zeros."""
    names = [i.name for i in sess.get_inputs()]
    state = [np.zeros((frames.shape[0], *s), np.float32) for s in shapes]
    out = []
    for t in range(frames.shape[1]):
        logits, *state = sess.run(None, dict(zip(names, [frames[:, t], *state])))
        out.append(logits)
    return np.stack(out, 1)


# -- online models ------------------------------------------------------------------------------------------


def test_export_online_step_equals_offline_unidirectional_per_frame(online):
    model, path, _ = online
    clip = torch.randn(2, 8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(clip, per_frame=True).numpy()  # the offline uni-directional model, T = 8
    got = run_steps(session(path), clip.numpy(), model.state_shapes(SIZE, SIZE))
    assert np.abs(expected).max() > 0.5, "logits too small for the comparison to mean anything"
    assert scaled_diff(got, expected) <= TOL


def test_export_online_one_file_serves_batch_1_and_5(online):
    model, path, _ = online
    sess = session(path)
    for batch in (1, 5):
        frames = torch.randn(batch, 3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        state = model.init_state(batch, SIZE, SIZE)
        expected = []
        with torch.no_grad():
            for t in range(3):
                logits, state = model.step(frames[:, t], state)
                expected.append(logits.numpy())
        got = run_steps(sess, frames.numpy(), model.state_shapes(SIZE, SIZE))
        assert got.shape == (batch, 3, 5)
        assert scaled_diff(got, np.stack(expected, 1)) <= TOL


def test_export_online_graph_has_named_io_with_dynamic_batch(online):
    model, path, report = online
    graph = onnx.load(str(path)).graph
    n = len(model.state_shapes(SIZE, SIZE))
    assert [i.name for i in graph.input] == ["frame", *(f"state_{i}" for i in range(n))] == report.inputs
    assert [o.name for o in graph.output] == ["logits", *(f"new_state_{i}" for i in range(n))] == report.outputs
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    dims = [d.dim_value for d in graph.input[1].type.tensor_type.shape.dim[1:]]
    assert tuple(dims) == model.state_shapes(SIZE, SIZE)[0]


def test_export_report_holds_the_verified_difference(online):
    _, path, report = online
    assert report.kind == "online" and report.opset == 17 and report.input_size == SIZE
    assert "dynamo=False" in report.exporter
    assert 0 <= report.max_abs_diff < 1e-3 and 0 <= report.max_scaled_diff <= TOL
    assert "6 steps at batch 2" in report.verification
    assert report.size_bytes == path.stat().st_size


def test_export_metadata_round_trips(online):
    model, path, _ = online
    meta = read_metadata(path)
    assert meta["kind"] == "online" and meta["precision"] == "fp32" and meta["format_version"] == 1
    cfg = ModelConfig.from_dict(meta["config"])
    assert cfg == ModelConfig.from_dict({**model.cfg.to_dict(), "labels": [f"act{i}" for i in range(5)]})
    assert [tuple(s["shape"]) for s in meta["state"]] == model.state_shapes(SIZE, SIZE)
    assert [s["name"] for s in meta["state"]] == [f"state_{i}" for i in range(len(meta["state"]))]
    assert meta["io"]["inputs"]["frame"] == ["batch", 3, SIZE, SIZE]
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["streamtsm.kind"]) == "online"  # every value is a JSON string


def test_export_without_shift_has_no_state(tmp_path):
    report = export_onnx(tiny_online("tsn_mobilenetv2"), tmp_path / "tsn.onnx")
    assert report.inputs == ["frame"] and report.outputs == ["logits"]
    assert read_metadata(report.path)["state"] == []


def test_verify_onnx_rejects_a_graph_that_differs_from_the_model(online):
    model, path, _ = online
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.fc.bias += 0.01
    with pytest.raises(ExportError, match="not faithful"):
        verify_onnx(changed, path)


def test_export_leaves_no_file_when_verification_fails(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise ExportError("onnxruntime differs from torch")

    monkeypatch.setattr(onnx_export, "verify_onnx", fail)
    with pytest.raises(ExportError):
        export_onnx(tiny_online(), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_a_label_count_that_differs_from_the_classifier(tmp_path):
    with pytest.raises(ConfigError, match="3 labels .* 5 classes"):
        export_onnx(tiny_online(), tmp_path / "m.onnx", labels=["a", "b", "c"])


# -- clip models --------------------------------------------------------------------------------------------


def test_export_clip_model_matches_torch(clip):
    model, path, report = clip
    assert report.kind == "clip" and report.inputs == ["clip"] and report.outputs == ["logits"]
    assert read_metadata(path)["io"]["inputs"]["clip"] == ["batch", 8, 3, SIZE, SIZE]
    sess = session(path)
    for batch in (1, 3):
        clips = torch.randn(batch, 8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(clips).numpy()
        got = sess.run(None, {"clip": clips.numpy()})[0]
        assert np.abs(expected).max() > 0.5
        assert scaled_diff(got, expected) <= TOL


# -- int8 ---------------------------------------------------------------------------------------------------


def _io_types(path) -> dict[str, int]:
    graph = onnx.load(str(path)).graph
    return {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}


def test_quantize_int8_keeps_state_io_float_and_reports_agreement(online, tmp_path):
    model, path, _ = online
    frames = calibration_frames(ModelConfig.from_dict(read_metadata(path)["config"]), num_frames=48,
                                sequence_length=12)
    report = quantize_int8(path, tmp_path / "int8.onnx", frames)
    assert set(report) >= {"path", "size_bytes", "fp32_size_bytes", "calibration_inputs", "holdout_predictions",
                           "top1_agreement", "max_abs_logit_diff", "io_dtypes", "quantization"}
    # 4 sequences of 12: 3 calibrate (36 (frame, state) inputs), 1 is held out and stepped through both models.
    assert report["calibration_inputs"] == 36 and report["holdout_predictions"] == 12
    assert 0.0 <= report["top1_agreement"] <= 1.0
    assert report["quantization"]["format"] == "QDQ" and report["quantization"]["per_channel"]
    assert set(_io_types(report["path"]).values()) == {onnx.TensorProto.FLOAT}
    assert set(report["io_dtypes"].values()) == {"float"}
    ops = {n.op_type for n in onnx.load(report["path"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    meta, fp32_meta = read_metadata(report["path"]), read_metadata(path)
    assert meta["precision"] == "int8" and meta["config"] == fp32_meta["config"]
    assert meta["state"] == fp32_meta["state"] and meta["quantization"]["weights"] == "int8"
    engine = load_onnx_engine(report["path"])
    logits, state = engine.step(frames[0, :2], engine.zero_state(2))
    assert logits.shape == (2, 5) and all(s.dtype == np.float32 for s in state.values())


def test_quantize_int8_clip_model(clip, tmp_path):
    _, path, _ = clip
    # tsm_r18 windows are 8 frames 8 apart: 57 consecutive frames each, one window per 60-frame sequence.
    frames = np.random.default_rng(0).standard_normal((3, 60, 3, SIZE, SIZE), dtype=np.float32)
    report = quantize_int8(path, tmp_path / "clip8.onnx", frames)
    assert report["holdout_predictions"] == 1 and report["calibration_inputs"] == 2
    assert _io_types(report["path"]) == {"clip": onnx.TensorProto.FLOAT, "logits": onnx.TensorProto.FLOAT}
    with pytest.raises(ConfigError, match=r"8 frames 8 apart \(57 consecutive frames\)"):
        quantize_int8(path, tmp_path / "short.onnx", frames[:, :40])


def test_clip_calibration_windows_are_sampled_like_the_live_ring():
    # Frame t of sequence n holds the value 100 n + t, so each window shows which frames it took.
    t = np.arange(20, dtype=np.float32)
    sequences = (t[None, :] + 100 * np.arange(2, dtype=np.float32)[:, None])[:, :, None, None, None]
    windows = clip_windows(np.broadcast_to(sequences, (2, 20, 3, 2, 2)), clip_len=3, interval=4)
    assert windows[:, :, 0, 0, 0].tolist() == [[0, 4, 8], [9, 13, 17], [100, 104, 108], [109, 113, 117]]


def test_quantize_rejects_frames_of_another_size_and_int8_input(online, tmp_path):
    _, path, _ = online
    with pytest.raises(ConfigError, match=r"\[F, 3, 32, 32\]"):
        quantize_int8(path, tmp_path / "q.onnx", np.zeros((8, 3, 64, 64), np.float32))
    frames = np.random.default_rng(0).standard_normal((2, 6, 3, SIZE, SIZE), dtype=np.float32)
    quantize_int8(path, tmp_path / "q.onnx", frames)
    with pytest.raises(ConfigError, match="already int8"):
        quantize_int8(tmp_path / "q.onnx", tmp_path / "qq.onnx", frames)


def test_calibration_frames_from_synthetic_scene_are_deterministic_sequences():
    cfg = ModelConfig(name="m", kind="online", num_classes=5, input_size=SIZE, resize_size=40)
    a = calibration_frames(cfg, "synthetic", num_frames=20, sequence_length=8, seed=3)
    b = calibration_frames(cfg, "synthetic", num_frames=20, sequence_length=8, seed=3)
    assert a.shape == (2, 8, 3, SIZE, SIZE) and a.dtype == np.float32
    assert np.array_equal(a, b) and a.std() > 0.1


def test_calibration_frames_from_a_video_file(shared_data):
    cfg = ModelConfig(name="m", kind="online", num_classes=5, input_size=SIZE, resize_size=40)
    frames = calibration_frames(cfg, str(shared_data / "videos" / "sample.avi"), num_frames=24, sequence_length=8)
    assert frames.shape == (3, 8, 3, SIZE, SIZE)


# -- labels -------------------------------------------------------------------------------------------------


def test_read_labels_skips_blank_lines_and_checks_the_count(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("wave\n  push door \n\npull door\n\n")
    assert read_labels(path) == ["wave", "push door", "pull door"]
    assert read_labels(path, 3) == ["wave", "push door", "pull door"]
    with pytest.raises(ConfigError, match="has 3 classes but the model has 27"):
        read_labels(path, 27)
    with pytest.raises(ConfigError, match="not found"):
        read_labels(tmp_path / "missing.txt")


def test_read_labels_reads_the_shared_jester_map(shared_data):
    assert len(read_labels(shared_data / "labels" / "jester_tsm_online_order.txt", 27)) == 27


# -- commands -----------------------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamtsm")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_export_onnx_with_checkpoint_labels_and_int8(tmp_path, capsys):
    weights = tmp_path / "tiny.pth"
    save_checkpoint(tiny_online(), weights)
    (tmp_path / "labels.txt").write_text("".join(f"class {i}\n" for i in range(5)))
    out = tmp_path / "m.onnx"
    assert cli(["export-onnx", "--weights", str(weights), "--labels", str(tmp_path / "labels.txt"), "--int8",
                "--calib-frames", "16", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "max abs diff" in text and "top-1 agreement" in text
    assert read_metadata(out)["config"]["labels"] == [f"class {i}" for i in range(5)]
    assert read_metadata(tmp_path / "m.int8.onnx")["precision"] == "int8"

    assert cli(["quantize", "--onnx", str(out), "-o", str(tmp_path / "q.onnx"), "--calib-frames", "16"]) == 0
    assert "top-1 agreement" in capsys.readouterr().out


def test_cli_export_onnx_rejects_a_labels_file_of_another_size(tmp_path):
    weights = tmp_path / "tiny.pth"
    save_checkpoint(tiny_online(), weights)
    (tmp_path / "labels.txt").write_text("a\nb\n")
    with pytest.raises(ConfigError, match="has 2 classes but the model has 5"):
        cli(["export-onnx", "--weights", str(weights), "--labels", str(tmp_path / "labels.txt"),
             "-o", str(tmp_path / "m.onnx")])
    with pytest.raises(ConfigError, match="give --model"):
        cli(["export-onnx", "-o", str(tmp_path / "m.onnx")])


def _nan_model():
    model = tiny_online(seed=3)
    with torch.no_grad():
        model.fc.bias[1] = float("nan")
    return model


def test_export_fails_on_a_model_that_outputs_nan_and_leaves_no_file(tmp_path):
    with pytest.raises(ExportError, match="NaN or infinity") as info:
        export_onnx(_nan_model(), tmp_path / "nan.onnx")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_verify_onnx_fails_on_a_graph_whose_outputs_are_not_finite(tmp_path, bad):
    # The graph goes wrong where torch does not (an fp16/int8 overflow, a damaged file): before issue 16 an all-NaN
    # graph was reported as verified with a difference of 0.
    model = tiny_online(seed=3)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.fc.bias[:] = bad
    export_onnx(broken, tmp_path / "bad.onnx", verify=False)
    with pytest.raises(ExportError, match="onnxruntime output .* NaN or infinity"):
        verify_onnx(model, tmp_path / "bad.onnx")


def test_quantize_fails_on_a_graph_that_outputs_nan_and_writes_nothing(tmp_path):
    export_onnx(_nan_model(), tmp_path / "nan.onnx", verify=False)
    frames = calibration_frames(ModelConfig.from_dict(read_metadata(tmp_path / "nan.onnx")["config"]),
                                num_frames=24, sequence_length=12)
    with pytest.raises(ExportError, match="NaN or infinity"):
        quantize_int8(tmp_path / "nan.onnx", tmp_path / "int8.onnx", frames)
    assert not (tmp_path / "int8.onnx").exists()
