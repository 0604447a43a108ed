"""Triton Inference Server: the exported repository parses with Triton's own protobufs and passes its onnxruntime
backend's load rules, the served graph equals torch with the sequence controls at work, and the Triton engine
(through an in-process fake server that emulates the sequence batcher's implicit state) gives the answers of the
onnxruntime and torch engines across resets; `run --backend triton` publishes over ZeroMQ; bad servers and models
are one clear error."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from streamtsm.cli import main
from streamtsm.config import ModelConfig
from streamtsm.engine.online import OnlineRunner, StepError
from streamtsm.engine.onnxruntime_engine import OrtOnlineEngine
from streamtsm.engine.torch_engine import TorchOnlineEngine
from streamtsm.engine.triton_engine import SEQUENCE_STATE, SequenceToken, TritonError, TritonOnlineEngine
from streamtsm.errors import ConfigError
from streamtsm.export import ExportError, export_onnx
from streamtsm.export.triton import export_triton, torch_reference, verify_served_graph
from streamtsm.formats import read_metadata
from streamtsm.models import save_checkpoint
from streamtsm.publish import Subscriber

from .fake_triton import FakeTriton, check_model
from .conftest import scaled_diff
from .test_onnx_export import SIZE, TOL, cli, tiny_clip, tiny_online

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = [f"act{i}" for i in range(5)]
Kind = mc.ModelSequenceBatching.Control




@pytest.fixture(scope="module")
def model():
    return tiny_online(seed=3)


@pytest.fixture(scope="module")
def repo(model, tmp_path_factory):
    """A repository with the tiny model as "tiny" (5 s idle timeout) and as "short_idle" (0.3 s)."""
    root = tmp_path_factory.mktemp("triton") / "model_repository"
    report = export_triton(model, root, name="tiny", labels=LABELS, max_batch_size=8, max_sequences=32,
                           queue_delay_us=500)
    export_triton(model, root, name="short_idle", labels=LABELS, idle_timeout_us=300_000, verify=False)
    return root, report


@pytest.fixture(scope="module")
def plain_onnx(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("triton") / "plain.onnx"
    export_onnx(model, path, labels=LABELS)
    return path


@pytest.fixture(scope="module")
def fake(repo):
    with FakeTriton(repo[0]) as server:
        yield server


def parse_config(path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def frames(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)


# -- the repository -----------------------------------------------------------------------------------------


def test_export_triton_config_declares_sequence_batching_with_implicit_zero_state(repo, model):
    root, report = repo
    config = parse_config(root / "tiny" / "config.pbtxt")
    assert (root / "tiny" / "1" / "model.onnx").is_file() and report.config_path == str(root / "tiny" / "config.pbtxt")
    assert config.name == "tiny" and config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    # dims exclude the batch (max_batch_size > 0); the folds are not inputs or outputs the client sees
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("frame", mc.TYPE_FP32, [3, SIZE, SIZE])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("logits", mc.TYPE_FP32, [5]), ("sequence_id", mc.TYPE_UINT64, [1])]
    assert config.output[0].label_filename == "labels.txt"
    assert (root / "tiny" / "labels.txt").read_text().splitlines() == LABELS

    seq = config.sequence_batching
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    assert seq.WhichOneof("strategy_choice") == "oldest"
    assert seq.oldest.max_candidate_sequences == 32 and seq.oldest.max_queue_delay_microseconds == 500
    assert seq.max_sequence_idle_microseconds == 5_000_000
    controls = {ci.name: ci.control[0] for ci in seq.control_input}
    assert all(len(ci.control) == 1 for ci in seq.control_input)
    assert {n: c.kind for n, c in controls.items()} == {
        "START": Kind.CONTROL_SEQUENCE_START, "END": Kind.CONTROL_SEQUENCE_END, "CORRID": Kind.CONTROL_SEQUENCE_CORRID}
    assert list(controls["START"].bool_false_true) == [False, True] == list(controls["END"].bool_false_true)
    assert controls["CORRID"].data_type == mc.TYPE_UINT64

    shapes = model.state_shapes(SIZE, SIZE)
    assert [(s.input_name, s.output_name) for s in seq.state] == [
        (f"state_{i}", f"new_state_{i}") for i in range(len(shapes))]
    for state, shape in zip(seq.state, shapes):
        assert state.data_type == mc.TYPE_FP32 and tuple(state.dims) == shape
        (initial,) = state.initial_state
        assert initial.WhichOneof("state_data") == "zero_data" and initial.zero_data
        assert initial.data_type == mc.TYPE_FP32 and tuple(initial.dims) == shape
    assert {s.input_name for s in seq.state}.isdisjoint(i.name for i in config.input)
    assert {s.output_name for s in seq.state}.isdisjoint(o.name for o in config.output)
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_AUTO, 1)]

    params = {k: json.loads(v.string_value) for k, v in config.parameters.items()}
    cfg = ModelConfig.from_dict(params["streamtsm.config"])
    assert (cfg.name, cfg.kind, cfg.input_size, cfg.labels) == (model.cfg.name, "online", SIZE, LABELS)
    assert params["streamtsm.kind"] == "online" and len(params["streamtsm.state"]) == len(shapes)
    assert report.num_state == len(shapes) and report.state_bytes == 4 * sum(int(np.prod(s)) for s in shapes)


def test_exported_repository_passes_the_onnxruntime_backends_load_rules(repo, tmp_path):
    config = parse_config(repo[0] / "tiny" / "config.pbtxt")
    graph = onnx.load(str(repo[0] / "tiny" / "1" / "model.onnx")).graph
    assert check_model(config, graph) == []
    names = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert names["START"] == names["END"] == names["CORRID"] == ["batch", 1]
    assert len(graph.input) == 1 + 3 + len(config.sequence_batching.state)

    # The rules are real: the mistakes they exist for are refused.
    listed = mc.ModelConfig()
    listed.CopyFrom(config)
    listed.input.add(name="state_0", data_type=mc.TYPE_FP32, dims=config.sequence_batching.state[0].dims)
    assert any("configuration expects" in p for p in check_model(listed, graph))
    extra = mc.ModelConfig()
    extra.CopyFrom(config)
    extra.sequence_batching.control_input.add(name="READY").control.add(
        kind=Kind.CONTROL_SEQUENCE_READY, bool_false_true=[False, True])
    assert any("'READY', but model does not provide that input" in p for p in check_model(extra, graph))


def test_served_graph_matches_torch_with_start_end_and_corrid_at_work(repo, model):
    session = ort.InferenceSession(str(repo[0] / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    torch_engine = TorchOnlineEngine(model)
    shapes = model.state_shapes(SIZE, SIZE)
    corrid = np.array([[2**64 - 1], [12345]], np.uint64)  # [2, 1]: values a float or int64 would garble
    state = [np.full((2, *s), 1e30, np.float32) for s in shapes]  # garbage the START guard must discard
    reference = torch_engine.zero_state(2)
    for t in range(4):
        feeds = {"frame": frames(2, t), "START": np.full((2, 1), t == 0), "END": np.full((2, 1), t == 3),
                 "CORRID": corrid, **{f"state_{i}": s for i, s in enumerate(state)}}
        logits, echoed, *state = session.run(None, feeds)
        expected, reference = torch_engine.step(frames(2, t), reference)
        assert scaled_diff(logits, expected) <= TOL
        assert echoed.dtype == np.uint64 and np.array_equal(echoed, corrid)
        if t < 3:
            assert max(scaled_diff(a, b.numpy()) for a, b in zip(state, reference.values())) <= TOL
    assert all(not s.any() for s in state)  # END: nothing of the camera stays in the buffers


def test_verification_catches_a_served_graph_whose_start_guard_is_missing(repo, model, tmp_path):
    path = repo[0] / "tiny" / "1" / "model.onnx"
    broken = onnx.load(str(path))
    for node in broken.graph.node:
        if node.name.startswith("triton/start_guard"):
            node.op_type, node.input[:] = "Identity", [node.input[2]]  # pass the incoming state through
    out = tmp_path / "broken.onnx"
    onnx.save(broken, str(out))
    meta = read_metadata(path)
    assert verify_served_graph(torch_reference(model), path, meta)["max_scaled_diff"] <= TOL
    with pytest.raises(ExportError, match="differs from the reference"):
        verify_served_graph(torch_reference(model), out, meta)


def test_export_triton_refuses_clip_models_and_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="clip model; export-triton serves online models"):
        export_triton(tiny_clip(), tmp_path)
    clip_file = tmp_path / "clip.onnx"
    export_onnx(tiny_clip(), clip_file, verify=False)
    with pytest.raises(ConfigError, match="holds a clip model"):
        export_triton(clip_file, tmp_path / "repo")
    for kwargs, message in (({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
                            ({"name": "a/b"}, "plain directory name"),
                            ({"instance_kind": "tpu"}, "instance_kind must be one of auto, gpu, cpu")):
        with pytest.raises(ConfigError, match=message):
            export_triton(tiny_online(), tmp_path / "repo", verify=False, **kwargs)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_export_triton_from_an_onnx_file_replaces_a_previous_export(plain_onnx, tmp_path):
    root = tmp_path / "repo"
    first = export_triton(plain_onnx, root, name="m", max_batch_size=4)
    second = export_triton(plain_onnx, root, name="m", max_batch_size=2, labels=list("vwxyz"))
    config = parse_config(root / "m" / "config.pbtxt")
    assert first.max_scaled_diff <= TOL and second.max_scaled_diff <= TOL
    assert config.max_batch_size == 2 and (root / "m" / "labels.txt").read_text().split() == list("vwxyz")
    assert [p.name for p in root.iterdir()] == ["m"] and list(tmp_path.iterdir()) == [root]  # nothing left behind
    assert check_model(config, onnx.load(second.model_path).graph) == []


# -- the engine, through the fake server --------------------------------------------------------------------


def test_triton_engine_module_imports_without_torch():
    code = "import streamtsm.engine.triton_engine, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_triton_engine_matches_onnxruntime_and_torch_engines_across_resets(fake, model, plain_onnx):
    engines = {"triton": TritonOnlineEngine(fake.url, "tiny"), "ort": OrtOnlineEngine(plain_onnx, providers="cpu"),
               "torch": TorchOnlineEngine(model)}
    held = {name: {} for name in engines}  # stream -> its single-stream state, per engine
    triton_ids: dict[str, list[int]] = {}  # stream -> the sequence ids it used, in order
    log_start = len(fake.models["tiny"].log)

    def step(ids: list[str], t: int) -> None:
        x = np.concatenate([frames(1, 100 * ord(sid) + t) for sid in ids])  # [B, 3, S, S], row b: stream b
        out = {}
        for name, engine in engines.items():
            for sid in ids:
                if sid not in held[name]:
                    held[name][sid] = engine.zero_state(1)
            logits, new_state = engine.step(x, engine.stack([held[name][sid] for sid in ids]))
            held[name].update(zip(ids, engine.split(new_state, len(ids))))
            out[name] = logits
        for sid in ids:
            seq = held["triton"][sid][SEQUENCE_STATE][0].sequence_id
            if triton_ids.setdefault(sid, [])[-1:] != [seq]:
                triton_ids[sid].append(seq)
        assert out["triton"].shape == (len(ids), 5) and out["triton"].dtype == np.float32
        assert np.abs(out["triton"] - out["ort"]).max() <= 1e-4  # the same graph, with the controls
        # Against torch in units of max(1, |logits|): two fp32 implementations of the network differ by ~1e-5 of
        # the logits' scale, which reaches ~5 here (see streamtsm.export.onnx.TOLERANCE).
        assert scaled_diff(out["triton"], out["torch"]) <= TOL

    for t in range(2):
        step(["a", "b", "c"], t)
    for name in engines:
        del held[name]["b"]  # b's source reconnected: its state restarts
    for t in range(2, 4):
        step(["a", "b", "c"], t)
    for name in engines:
        del held[name]["c"]
    for t in range(4, 6):
        step(["a", "d", "b", "c"], t)

    log = fake.models["tiny"].log[log_start:]
    per_sequence: dict[int, list[tuple[bool, bool]]] = {}
    for sid, start, end, _ in log:
        per_sequence.setdefault(sid, []).append((start, end))
    assert [len(triton_ids[s]) for s in "abcd"] == [1, 2, 2, 1]  # the reset streams restarted once each
    steps = {triton_ids["a"][0]: 6, triton_ids["b"][0]: 2, triton_ids["b"][1]: 4, triton_ids["c"][0]: 4,
             triton_ids["c"][1]: 2, triton_ids["d"][0]: 2}
    assert {sid: len(v) for sid, v in per_sequence.items()} == steps
    for requests in per_sequence.values():
        assert requests[0] == (True, False) and all(r == (False, False) for r in requests[1:])  # started once
    batches = {}
    for sid, _, _, number in log:
        batches.setdefault(number, set()).add(sid)
    assert max(len(b) for b in batches.values()) >= 2  # cameras shared executions

    replaced = {triton_ids["b"][0], triton_ids["c"][0]}
    assert replaced <= set(fake.models["tiny"].sequences)  # while running, replaced ones wait for the idle timeout
    engines["triton"].close()
    ended = [sid for sid, _, end, _ in fake.models["tiny"].log[log_start:] if end]
    assert sorted(ended) == sorted(steps)  # close() ends every sequence the server may still hold, once
    assert set(steps).isdisjoint(fake.models["tiny"].sequences)


def test_triton_engine_builds_its_config_and_labels_from_the_server(fake, model, tmp_path):
    engine = TritonOnlineEngine(fake.url, "tiny")
    try:
        assert engine.backend == "triton" and engine.model_name == model.cfg.name
        assert (engine.cfg.input_size, engine.cfg.num_classes, engine.cfg.mean, engine.cfg.std) == (
            SIZE, 5, model.cfg.mean, model.cfg.std)
        assert engine.labels == LABELS and engine.idle_timeout_s == 5.0 and engine.max_batch_size == 8
        tokens = engine.zero_state(3)[SEQUENCE_STATE]
        assert all(isinstance(t, SequenceToken) and t.start for t in tokens)
        assert len({t.sequence_id for t in tokens}) == 3 and all(0 < t.sequence_id < 2**63 for t in tokens)
        parts = [{SEQUENCE_STATE: tokens[:1]}, {SEQUENCE_STATE: tokens[1:]}]
        assert engine.split(engine.stack(parts), 3) == [{SEQUENCE_STATE: [t]} for t in tokens]
        with pytest.raises(ValueError, match=r"\[B, 3, H, W\] array with H = W = 32"):
            engine.step(np.zeros((1, 3, 64, 64), np.float32), engine.zero_state(1))
        with pytest.raises(ValueError, match="holds 1 streams but the frame batch has 2"):
            engine.step(frames(2, 0), engine.zero_state(1))
        with pytest.raises(ValueError, match="appears twice"):
            engine.step(frames(2, 0), {SEQUENCE_STATE: tokens[:1] * 2})
    finally:
        engine.close()
    assert TritonOnlineEngine(fake.url, "tiny", labels=list("vwxyz")).labels == list("vwxyz")
    with pytest.raises(ConfigError, match="2 labels given for a model with 5 classes"):
        TritonOnlineEngine(fake.url, "tiny", labels=["a", "b"])


def test_triton_engine_state_is_named_and_the_server_state_has_the_onnx_graphs_names(fake, plain_onnx):
    engine = TritonOnlineEngine(fake.url, "tiny")
    try:
        assert engine.state_names == (SEQUENCE_STATE,) and list(engine.zero_state(2)) == [SEQUENCE_STATE]
        assert engine.server_state_spec == OrtOnlineEngine(plain_onnx, providers="cpu").state_spec
        with pytest.raises(ValueError, match=r"missing \['sequence'\], unexpected \['state_0'\]"):
            engine.step(frames(1, 0), {"state_0": engine.zero_state(1)[SEQUENCE_STATE]})
        with pytest.raises(ValueError, match=r"float32 \[B, 3, H, W\] array with H = W = 32, got float64"):
            engine.step(frames(1, 0).astype(np.float64), engine.zero_state(1))
    finally:
        engine.close()


def test_triton_engine_restarts_a_sequence_the_server_has_idled_out(fake, model):
    engine = TritonOnlineEngine(fake.url, "short_idle")  # the config's idle timeout: 0.3 s
    reference = TorchOnlineEngine(model)
    try:
        _, state = engine.step(frames(1, 0), engine.zero_state(1))
        tokens = state[SEQUENCE_STATE]
        time.sleep(0.35)
        logits, new_state = engine.step(frames(1, 1), state)
        new_tokens = new_state[SEQUENCE_STATE]
        expected, _ = reference.step(frames(1, 1), reference.zero_state(1))  # a fresh stream's answer
        assert new_tokens[0].sequence_id != tokens[0].sequence_id
        assert scaled_diff(logits, expected) <= TOL
        log = {sid: start for sid, start, _, _ in fake.models["short_idle"].log}
        assert log[new_tokens[0].sequence_id] is True
    finally:
        engine.close()


def test_a_sequence_lost_on_the_server_is_an_error_naming_it_and_the_runner_recovers(repo, model):
    # The server drops sequences after 0.2 s although its config promises 5 s: the engine cannot see it coming.
    with FakeTriton(repo[0], idle_timeout_s=0.2) as server:
        engine = TritonOnlineEngine(server.url, "tiny")
        runner = OnlineRunner(engine)
        try:
            runner.step(["cam"], [0], frames(1, 0))
            (token,) = runner.state_of("cam")[SEQUENCE_STATE]
            time.sleep(0.3)
            with pytest.raises(StepError) as failure:
                runner.step(["cam"], [0], frames(1, 1))
            assert isinstance(failure.value.__cause__, TritonError)
            assert f"row 0 (sequence {token.sequence_id})" in str(failure.value)
            assert "must specify the START flag" in str(failure.value)
            logits = runner.step(["cam"], [0], frames(1, 2))  # the stream restarted from zeros
            expected, _ = TorchOnlineEngine(model).step(frames(1, 2), TorchOnlineEngine(model).zero_state(1))
            assert scaled_diff(logits, expected) <= TOL
        finally:
            engine.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_triton_engine_errors_name_what_is_wrong(fake, repo, tmp_path):
    with pytest.raises(ConfigError, match=r"Triton at 127\.0\.0\.1:\d+ is unreachable"):
        TritonOnlineEngine(f"127.0.0.1:{_free_port()}", "tiny", connect_timeout_s=2)
    with pytest.raises(ConfigError, match="has no ready model 'nope'; the server has: short_idle, tiny"):
        TritonOnlineEngine(fake.url, "nope")
    with pytest.raises(ConfigError, match="must be HOST:PORT"):
        TritonOnlineEngine("grpc://localhost:8001", "tiny")

    # A model of another origin: the same graph, its config without the streamtsm parameters.
    foreign = tmp_path / "repo"
    shutil.copytree(repo[0] / "tiny", foreign / "other")
    config = parse_config(foreign / "other" / "config.pbtxt")
    config.name = "other"
    config.ClearField("parameters")
    (foreign / "other" / "config.pbtxt").write_text(text_format.MessageToString(config))
    with FakeTriton(foreign) as server:
        with pytest.raises(ConfigError, match="'other' .* is not an online streamtsm model written by"):
            TritonOnlineEngine(server.url, "other")


# -- commands -----------------------------------------------------------------------------------------------


def test_cli_export_triton_writes_a_repository_from_a_checkpoint(tmp_path, capsys):
    weights = tmp_path / "tiny.pth"
    save_checkpoint(tiny_online(seed=4), weights)
    (tmp_path / "labels.txt").write_text("".join(f"class {i}\n" for i in range(5)))
    root = tmp_path / "model_repository"
    assert cli(["export-triton", "--weights", str(weights), "--labels", str(tmp_path / "labels.txt"),
                       "-o", str(root), "--name", "door", "--max-batch-size", "4", "--idle-timeout", "2.5",
                       "--queue-delay", "1", "--instance-kind", "cpu"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {root / 'door'}" in text and "verified the served graph" in text and "--triton-model door" in text
    config = parse_config(root / "door" / "config.pbtxt")
    assert config.max_batch_size == 4 and config.sequence_batching.max_sequence_idle_microseconds == 2_500_000
    assert config.sequence_batching.oldest.max_queue_delay_microseconds == 1000
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert (root / "door" / "labels.txt").read_text().splitlines() == [f"class {i}" for i in range(5)]
    with pytest.raises(ConfigError, match="drop --model/--weights"):
        cli(["export-triton", "--onnx", "x.onnx", "--weights", str(weights), "-o", str(root)])


def test_run_backend_triton_publishes_predictions_through_the_server(fake, capsys):
    port = _free_port()
    received: list[tuple[str, dict]] = []
    done = threading.Event()

    def listen() -> None:  # a real subscriber, in its own thread (run() must own the main thread's signals)
        with Subscriber(f"tcp://127.0.0.1:{port}", ["streamtsm"]) as sub:
            while not done.is_set():
                if (message := sub.recv(timeout=0.1)) is not None:
                    received.append(message)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    log_start = len(fake.models["tiny"].log)
    try:
        code = main(["run", "--backend", "triton", "--url", fake.url, "--triton-model", "tiny", "--source",
                     "synthetic:64x48@30", "--name", "door", "--publish", f"tcp://127.0.0.1:{port}",
                     "--max-frames", "30", "--stats-interval", "0.2", "--quiet"])
        time.sleep(0.3)  # let the last messages arrive
    finally:
        done.set()
        listener.join(timeout=5)
    out = capsys.readouterr().out
    assert code == 0 and "door: 30 frames processed" in out and "tsm_mobilenetv2_online (triton)" in out
    preds = [p for topic, p in received if topic == "streamtsm.pred.door"]
    assert len(preds) >= 5 and all({e["label"] for e in p["topk"]} <= set(LABELS) for p in preds)
    stats = [p for topic, p in received if topic == "streamtsm.stats"]
    assert stats and all(m["backend"] == "triton" for s in stats for m in s["models"].values())
    log = fake.models["tiny"].log[log_start:]
    assert sum(start for _, start, _, _ in log) == 1 and log[-1][2]  # one sequence, ended when run closed
    assert len(log) == 31  # 30 frames and the END


def test_run_backend_triton_errors_are_one_line_and_exit_2(fake, capsys):
    for argv, message in (
            (["--url", f"127.0.0.1:{_free_port()}", "--triton-model", "tiny"], "is unreachable"),
            (["--url", fake.url, "--triton-model", "nope"], "has no ready model 'nope'"),
            (["--url", fake.url], "needs --url HOST:PORT"),
            (["--url", fake.url, "--triton-model", "tiny", "--onnx", "m.onnx"], "drop --model/--weights/--onnx")):
        code = main(["run", "--backend", "triton", *argv, "--publish", "none"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    code = main(["run", "--url", fake.url, "--triton-model", "nope", "--publish", "none"])  # auto: the url
    assert code == 2 and "has no ready model 'nope'" in capsys.readouterr().err
    code = main(["run", "--backend", "onnxruntime", "--publish", "none"])
    assert code == 2 and "give --onnx FILE" in capsys.readouterr().err
