"""The onnxruntime engine: same answers as the torch engine through stack/split/zero_state, engines chosen by the
file's metadata, providers by name, one clear error per kind of bad file, and no torch import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from streamtsm.engine.onnxruntime_engine import (OrtClipEngine, OrtOnlineEngine, cuda_device_count,
                                                 default_providers, load_onnx_engine, resolve_providers)
from streamtsm.engine.torch_engine import TorchClipEngine, TorchOnlineEngine
from streamtsm.errors import ConfigError, StreamTSMError
from streamtsm.export import export_onnx

from .conftest import scaled_diff
from .test_onnx_export import SIZE, TOL, tiny_clip, tiny_online

pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def online(tmp_path_factory):
    model = tiny_online(seed=1)
    path = tmp_path_factory.mktemp("engine") / "online.onnx"
    export_onnx(model, path)
    return model, path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    model = tiny_clip(seed=1)
    path = tmp_path_factory.mktemp("engine") / "clip.onnx"
    export_onnx(model, path)
    return model, path


def frames(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)


def test_engine_module_imports_without_torch():
    code = "import streamtsm.engine.onnxruntime_engine, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("io_binding", [False, True], ids=["numpy", "iobinding"])
def test_ort_online_engine_matches_torch_engine_through_stack_split_and_zero_state(online, io_binding):
    # io_binding=True on CPU runs the device-state path (OrtValues, row views, gathers) with host OrtValues.
    model, path = online
    ours = OrtOnlineEngine(path, providers=["cpu"], io_binding=io_binding)
    theirs = TorchOnlineEngine(model)

    def both(fn):
        return fn(ours), fn(theirs)

    def step(pair, x):
        (la, sa), (lb, sb) = ours.step(x, pair[0]), theirs.step(x, pair[1])
        assert scaled_diff(la, lb) <= TOL
        return sa, sb

    # Streams a, b, c start alone, then run as one batch, then c leaves, d joins between a and b.
    a, b, c = both(lambda e: e.zero_state(1)), both(lambda e: e.zero_state(1)), both(lambda e: e.zero_state(1))
    a, b, c = step(a, frames(1, 0)), step(b, frames(1, 1)), step(c, frames(1, 2))
    batch = (ours.stack([a[0], b[0], c[0]]), theirs.stack([a[1], b[1], c[1]]))
    for t in range(3):
        batch = step(batch, frames(3, 10 + t))
        # Split and stack the same rows back in order between steps (what a pipeline does every frame).
        batch = tuple(e.stack(e.split(s, 3)) for e, s in zip((ours, theirs), batch))
    rows = [(ra, rb) for ra, rb in zip(ours.split(batch[0], 3), theirs.split(batch[1], 3))]
    d = both(lambda e: e.zero_state(1))
    batch = (ours.stack([rows[0][0], d[0], rows[1][0]]), theirs.stack([rows[0][1], d[1], rows[1][1]]))
    for t in range(2):
        batch = step(batch, frames(3, 20 + t))
    c = step(rows[2], frames(1, 30))  # the stream that left, stepped on its own row
    assert len(ours.zero_state(4)) == ours.num_state == len(theirs.zero_state(4))


def test_ort_online_engine_state_is_numpy_on_cpu(online):
    engine = OrtOnlineEngine(online[1], providers="cpu")
    state = engine.zero_state(2)
    assert all(isinstance(s, np.ndarray) and s.dtype == np.float32 for s in state.values())
    logits, new_state = engine.step(frames(2, 0), state)
    assert logits.shape == (2, 5) and [s.shape for s in new_state.values()] == [s.shape for s in state.values()]
    assert engine.backend == "onnxruntime" and engine.precision == "fp32" and engine.model_name == online[0].cfg.name


def test_ort_online_engine_rejects_bad_frames_and_state(online):
    engine = OrtOnlineEngine(online[1], providers="cpu")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\] array with H = W = 32"):
        engine.step(np.zeros((1, 3, 64, 64), np.float32), engine.zero_state(1))
    with pytest.raises(ValueError, match="holds 1 streams but the frame batch has 2"):
        engine.step(frames(2, 0), engine.zero_state(1))
    with pytest.raises(ValueError, match="one per shifted block"):
        engine.step(frames(1, 0), dict(list(engine.zero_state(1).items())[:-1]))


@pytest.mark.parametrize("io_binding", [False, True], ids=["numpy", "iobinding"])
def test_ort_online_engine_state_spec_is_the_graphs_state_inputs_and_the_torch_engines(online, io_binding):
    model, path = online
    engine = OrtOnlineEngine(path, providers="cpu", io_binding=io_binding)
    graph_inputs = [i.name for i in engine.session.get_inputs()][1:]
    assert list(engine.state_names) == graph_inputs == [s["name"] for s in engine.meta["state"]]
    assert engine.state_spec == TorchOnlineEngine(model).state_spec
    state = engine.zero_state(3)
    assert list(state) == graph_inputs
    _, new_state = engine.step(frames(3, 0), state)
    assert list(new_state) == graph_inputs
    assert [list(part) for part in engine.split(new_state, 3)] == [graph_inputs] * 3
    with pytest.raises(ValueError, match=r"missing \['state_0'\], unexpected \['new_state_0'\]"):
        engine.step(frames(3, 1), {("new_state_0" if k == "state_0" else k): v for k, v in new_state.items()})


def test_ort_engines_reject_frames_that_are_not_float32(online, clip):
    engine = OrtOnlineEngine(online[1], providers="cpu")
    with pytest.raises(ValueError, match=r"frames must be a float32 \[B, 3, H, W\] array .* got float64"):
        engine.step(frames(1, 0).astype(np.float64), engine.zero_state(1))
    clips = np.zeros((1, 8, 3, SIZE, SIZE), np.float16)
    with pytest.raises(ValueError, match=r"clips must be a float32 \[B, T, 3, H, W\] array .* got float16"):
        OrtClipEngine(clip[1], providers="cpu").predict(clips)


def test_load_onnx_engine_picks_the_engine_by_kind_and_matches_torch_clip_engine(online, clip):
    assert isinstance(load_onnx_engine(online[1]), OrtOnlineEngine)
    model, path = clip
    engine = load_onnx_engine(path)
    assert isinstance(engine, OrtClipEngine) and engine.clip_len == 8
    clips = np.random.default_rng(0).standard_normal((2, 8, 3, SIZE, SIZE), dtype=np.float32)
    assert scaled_diff(engine.predict(clips), TorchClipEngine(model).predict(clips)) <= TOL
    with pytest.raises(ValueError, match="T = 8"):
        engine.predict(clips[:, :4])
    with pytest.raises(ConfigError, match="holds a clip model"):
        OrtOnlineEngine(path)


def test_engine_labels_come_from_the_file_or_the_caller(tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(tiny_online(seed=2), path, labels=list("abcde"), verify=False)
    assert load_onnx_engine(path).labels == list("abcde")
    assert load_onnx_engine(path, labels=list("vwxyz")).labels == list("vwxyz")
    with pytest.raises(ConfigError, match="2 labels given for a model with 5 classes"):
        load_onnx_engine(path, labels=["a", "b"])


# -- providers ----------------------------------------------------------------------------------------------


def test_resolve_providers_maps_short_names_in_order():
    assert resolve_providers("cpu,cuda,tensorrt") == ["CPUExecutionProvider", "CUDAExecutionProvider",
                                                     "TensorrtExecutionProvider"]
    assert resolve_providers(["TRT", "cpu"]) == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["CUDAExecutionProvider"]) == ["CUDAExecutionProvider"]
    assert resolve_providers(None) is None
    with pytest.raises(ConfigError, match="unknown execution provider 'openvino'; expected any of tensorrt, cuda, cpu"):
        resolve_providers("cpu,openvino")


def test_default_providers_run_on_this_machine(online):
    engine = load_onnx_engine(online[1])
    assert engine.providers[-1] == default_providers()[-1] == "CPUExecutionProvider"
    if cuda_device_count() == 0:
        assert engine.providers == ["CPUExecutionProvider"]


@pytest.mark.skipif(cuda_device_count() > 0, reason="checks the refusal on a machine without a CUDA device")
def test_explicit_gpu_provider_without_a_gpu_is_a_config_error(online):
    with pytest.raises(ConfigError, match="none of the requested execution providers"):
        load_onnx_engine(online[1], providers="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA device")
def test_cuda_engine_keeps_state_on_the_device_and_matches_cpu(online):
    gpu = OrtOnlineEngine(online[1], providers="cuda,cpu")
    cpu = OrtOnlineEngine(online[1], providers="cpu")
    assert gpu.providers[0] == "CUDAExecutionProvider"
    sg, sc = gpu.zero_state(2), cpu.zero_state(2)
    for t in range(4):
        (lg, sg), (lc, sc) = gpu.step(frames(2, t), sg), cpu.step(frames(2, t), sc)
        assert all(s.device_name().lower() == "cuda" for s in sg.values())
        assert np.abs(lg - lc).max() <= 1e-3
    rows = gpu.split(sg, 2)
    assert gpu.stack(rows)["state_0"] is sg["state_0"]  # the same rows back in order: no copy


# -- bad files ----------------------------------------------------------------------------------------------


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="ONNX model not found"):
        load_onnx_engine(tmp_path / "nope.onnx")


def test_a_file_that_is_not_onnx_is_a_config_error(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    with pytest.raises(ConfigError, match="not an ONNX model, or truncated/corrupt"):
        load_onnx_engine(path)


def test_a_truncated_file_is_a_config_error(online, tmp_path):
    path = tmp_path / "cut.onnx"
    data = online[1].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="truncated/corrupt"):
        load_onnx_engine(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter's notice
def test_a_foreign_onnx_file_is_a_config_error(tmp_path):
    path = tmp_path / "linear.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),), str(path), dynamo=False)
    with pytest.raises(ConfigError, match="not a streamtsm export"):
        load_onnx_engine(path)


def _edit(src, dst, fn):
    model = onnx.load(str(src))
    fn(model.graph)
    onnx.save(model, str(dst))


def test_an_onnx_file_whose_inputs_do_not_match_its_metadata_is_a_config_error(online, tmp_path):
    def rename_frame(graph):
        graph.input[0].name = "image"
        for node in graph.node:
            node.input[:] = ["image" if i == "frame" else i for i in node.input]

    _edit(online[1], tmp_path / "renamed.onnx", rename_frame)
    with pytest.raises(ConfigError, match=r"input 'frame' \[batch, 3, 32, 32\] is missing.*unexpected input 'image'"):
        load_onnx_engine(tmp_path / "renamed.onnx")

    def fix_batch(graph):
        graph.input[1].type.tensor_type.shape.dim[0].dim_value = 4

    _edit(online[1], tmp_path / "fixed.onnx", fix_batch)
    with pytest.raises(StreamTSMError, match=r"input 'state_0' has shape \[4, .*expected \[batch, "):
        load_onnx_engine(tmp_path / "fixed.onnx")


def _with_metadata(src, dst, change):
    """A copy of ``src`` whose streamtsm metadata is ``change(meta)``'s, the graph untouched."""
    from streamtsm.formats import META_CONFIG, META_KIND, META_STATE, read_metadata, write_metadata

    dst.write_bytes(src.read_bytes())
    meta = read_metadata(src)
    change(meta)
    write_metadata(dst, {META_CONFIG: meta["config"], META_KIND: meta["kind"], META_STATE: meta["state"]})
    return dst


def _set_kind(kind):
    return lambda m: m.update(kind=kind)


def _drop_last_state(m):
    m["state"].pop()


def _grow_state_0(m):
    m["state"][0]["shape"][0] += 1


def _config(key, value):
    return lambda m: m["config"].update({key: value})


@pytest.mark.parametrize(("which", "change", "match"), [
    ("online", _set_kind("clip"), r"kind is 'clip' but the graph has no 'clip' input"),
    ("clip", _set_kind("online"), r"kind is 'online' but the graph has no 'frame' input"),
    ("online", _drop_last_state, r"metadata lists \d+ state tensors, the graph takes \d+"),
    ("online", _grow_state_0, r"state 'state_0' is \[batch, \d+, .*\] in the metadata, \[batch, .*\] in the graph"),
    ("clip", lambda m: m["state"].append({"name": "state_0", "output": "new_state_0", "shape": [1]}),
     r"kind is 'clip' but the metadata lists 1 state tensors"),
    ("online", _config("input_size", 48), r"config input_size is 48 but the graph's 'frame' is \[batch, 3, 32, 32\]"),
    ("clip", _config("input_size", 48), r"config input_size is 48 but the graph's 'clip' is"),
    ("online", _config("num_classes", 7), r"config num_classes is 7 but the graph's 'logits' is \[batch, 5\]"),
    ("clip", _config("num_classes", 3), r"config num_classes is 3 but the graph's 'logits' is \[batch, 5\]"),
])
def test_onnx_file_whose_metadata_disagrees_with_its_graph_is_one_error_naming_it(online, clip, tmp_path, which,
                                                                                  change, match):
    src = (online if which == "online" else clip)[1]
    path = _with_metadata(src, tmp_path / "edited.onnx", change)
    with pytest.raises(ConfigError, match=match) as info:
        load_onnx_engine(path)
    assert str(info.value).startswith(f"{path} does not match its streamtsm metadata")
    assert "\n" not in str(info.value)


def test_session_options_turn_spinning_off_unless_asked_and_use_one_inter_op_thread():
    from streamtsm.engine.onnxruntime_engine import session_options

    off = session_options(2)
    assert off.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert (off.intra_op_num_threads, off.inter_op_num_threads) == (2, 1)
    on = session_options(None, spinning=True)
    assert on.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert on.intra_op_num_threads == 0  # onnxruntime's default: one per core


def test_ort_online_engine_passes_spinning_to_its_session(online):
    engine = OrtOnlineEngine(online[1], "cpu", threads=1, spinning=True)
    assert engine.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
