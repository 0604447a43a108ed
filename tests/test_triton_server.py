"""Triton on a real server: the ``tritonserver`` of the nvidia-pytriton wheel (2.51, python backend only), started
on 127.0.0.1 from the venv tools/setup_triton.sh makes, serves a repository written by ``export-triton --runtime
python``; ``run --backend triton`` gives the predictions of ``run --onnx`` on real clips with two streams at once
and a third joining from another client while they run; the same server parses the onnxruntime-backend
repository's config as written; the client names a config without state. The python-backend model's sequence
bookkeeping (START resets, END and idle drop) is tested in-process too.

The server tests skip only when the server's environment is absent (the reason is printed); the clip test also
needs the clips in ../shared/data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from streamtsm.cli import main
from streamtsm.engine.onnxruntime_engine import OrtOnlineEngine
from streamtsm.engine.triton_engine import SEQUENCE_STATE, TritonError, TritonOnlineEngine
from streamtsm.engine.triton_server import LocalTritonServer, TritonServerError, find_install, free_port
from streamtsm.errors import ConfigError
from streamtsm.export import export_onnx
from streamtsm.export import triton_python_model as pm
from streamtsm.export.triton import export_triton, python_model_source
from streamtsm.publish import Subscriber

from .test_onnx_export import SIZE, tiny_online

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT.parent / "shared" / "data" / "videos"
LABELS = [f"act{i}" for i in range(5)]
TOL = 1e-4


@pytest.fixture(scope="module")
def plain_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton_server") / "tiny.onnx"
    export_onnx(tiny_online(seed=3), path, labels=LABELS)
    return path


def _rewrite_config(model_dir: Path, edit) -> None:
    path = model_dir / "config.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    edit(config)
    path.write_text(text_format.MessageToString(config))


@pytest.fixture(scope="module")
def repo(plain_onnx, tmp_path_factory):
    """``tsm``: --runtime python; ``tsm_ort``: the onnxruntime-backend export as written; ``broken``: that config
    with a field Triton does not know; ``no_state``: the python model whose config claims Triton keeps the state
    (it lists none)."""
    root = tmp_path_factory.mktemp("triton_server") / "model_repository"
    export_triton(plain_onnx, root, name="tsm", runtime="python", max_batch_size=8, idle_timeout_us=3_000_000)
    export_triton(plain_onnx, root, name="tsm_ort", max_batch_size=8, idle_timeout_us=3_000_000)
    shutil.copytree(root / "tsm_ort", root / "broken")
    config = (root / "broken" / "config.pbtxt").read_text().replace('name: "tsm_ort"', 'name: "broken"')
    (root / "broken" / "config.pbtxt").write_text(config + "\nno_such_field: 1\n")
    shutil.copytree(root / "tsm", root / "no_state")

    def claim_triton_keeps_state(config):
        config.name = "no_state"
        meta = json.loads(config.parameters["streamtsm.triton"].string_value)
        meta.pop("state_keeper")  # absent: Triton keeps the state, which this config does not declare
        config.parameters["streamtsm.triton"].string_value = json.dumps(meta)

    _rewrite_config(root / "no_state", claim_triton_keeps_state)
    return root


@pytest.fixture(scope="module")
def server(repo):
    try:
        install = find_install()
    except TritonServerError as e:
        pytest.skip(f"no real Triton server here: {e}")
    with LocalTritonServer(repo, install=install) as running:
        running.wait_model_ready("tsm")
        yield running


# -- the repository and the python-backend model, in-process ------------------------------------------------


def test_export_triton_python_runtime_writes_model_py_under_the_same_sequence_batcher(repo):
    py = text_format.Parse((repo / "tsm" / "config.pbtxt").read_text(), mc.ModelConfig())
    ort_cfg = text_format.Parse((repo / "tsm_ort" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert (py.backend, py.platform) == ("python", "") and ort_cfg.backend == "onnxruntime"
    assert (repo / "tsm" / "1" / "model.py").read_text() == python_model_source()
    assert (repo / "tsm" / "1" / "model.onnx").read_bytes() == (repo / "tsm_ort" / "1" / "model.onnx").read_bytes()
    assert not py.sequence_batching.state and len(ort_cfg.sequence_batching.state) > 0
    same = mc.ModelSequenceBatching()
    same.CopyFrom(ort_cfg.sequence_batching)
    same.ClearField("state")
    assert py.sequence_batching == same  # strategy, controls, idle timeout: one batcher for both runtimes
    assert (list(py.input), list(py.output), py.max_batch_size) == (
        list(ort_cfg.input), list(ort_cfg.output), ort_cfg.max_batch_size)
    keeper = {name: json.loads(c.parameters["streamtsm.triton"].string_value)["state_keeper"]
              for name, c in (("py", py), ("ort", ort_cfg))}
    assert keeper == {"py": "model", "ort": "triton"}
    with pytest.raises(ConfigError, match="runtime must be one of onnxruntime, python, got 'java'"):
        export_triton(repo / "tsm" / "1" / "model.onnx", repo.parent / "other", runtime="java", verify=False)


def test_cli_export_triton_runtime_python_writes_model_py(plain_onnx, tmp_path, capsys):
    root = tmp_path / "repo"
    assert main(["export-triton", "--onnx", str(plain_onnx), "-o", str(root), "--name", "cam", "--runtime", "python",
                 "--idle-timeout", "2"]) == 0
    out = capsys.readouterr().out
    assert "1/model.py" in out and "python backend" in out and "kept by the python model" in out, out
    config = text_format.Parse((root / "cam" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.backend == "python" and config.sequence_batching.max_sequence_idle_microseconds == 2_000_000
    assert (root / "cam" / "1" / "model.py").read_text() == python_model_source()


def test_find_install_says_what_is_missing_and_how_to_make_it(tmp_path):
    with pytest.raises(TritonServerError, match=r"no Triton server environment at .*run tools/setup_triton.sh"):
        find_install(tmp_path / "absent")
    (tmp_path / "env" / "bin").mkdir(parents=True)
    (tmp_path / "env" / "bin" / "python").touch()
    with pytest.raises(TritonServerError, match="has no nvidia-pytriton wheel"):
        find_install(tmp_path / "env")
    wheel = tmp_path / "env" / "lib" / "python3.12" / "site-packages" / "pytriton" / "tritonserver"
    wheel.mkdir(parents=True)
    with pytest.raises(TritonServerError, match="is Python 3.12; Triton's python backend stub loads only under 3.11"):
        find_install(tmp_path / "env")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _request(frame, corrid: int, start: bool = False, end: bool = False) -> dict:
    return {"frame": frame, "START": np.array([[start]]), "END": np.array([[end]]),
            "CORRID": np.array([[corrid]], np.uint64)}


def test_python_model_keeps_state_by_corrid_resets_on_start_drops_on_end_and_idle(repo, plain_onnx):
    written = text_format.Parse((repo / "tsm" / "config.pbtxt").read_text(), mc.ModelConfig())
    # the config as Triton hands it to initialize(): JSON, uint64 fields as strings
    config = {"parameters": {k: {"string_value": v.string_value} for k, v in written.parameters.items()},
              "sequence_batching": {"max_sequence_idle_microseconds": "2000000"}}
    names, outputs, shapes, idle_s = pm.read_model_config(config)
    assert idle_s == 2.0 and names[0] == "state_0" and outputs[0] == "new_state_0"
    session = pm.make_session(str(repo / "tsm" / "1" / "model.onnx"))
    clock = Clock()
    states = pm.SequenceStates(shapes, idle_s, clock=clock)
    reference = OrtOnlineEngine(plain_onnx, providers="cpu")
    ref_state = {1: reference.zero_state(1), 2: reference.zero_state(1)}
    rng = np.random.default_rng(0)

    def step(rows: list[tuple[int, bool, bool]]) -> list:
        frames = {cid: rng.standard_normal((1, 3, SIZE, SIZE), dtype=np.float32) for cid, _, _ in rows}
        out = pm.run_requests(session, states, names, outputs, [_request(frames[c], c, s, e) for c, s, e in rows])
        for (cid, start, _), result in zip(rows, out):
            if start:
                ref_state[cid] = reference.zero_state(1)
            expected, ref_state[cid] = reference.step(frames[cid], ref_state[cid])
            if not isinstance(result, pm.SequenceError):
                assert np.abs(result[0] - expected).max() <= TOL
                assert result[1].dtype == np.uint64 and int(result[1][0, 0]) == cid
        return out

    step([(1, True, False), (2, True, False)])  # two sequences in one execution
    step([(1, False, False), (2, False, False)])
    step([(2, True, False), (1, False, False)])  # START again: 2 restarts from zeros, 1 goes on
    assert len(states) == 2
    step([(1, False, True)])  # END: answered, then dropped
    assert 1 not in states and 2 in states
    (lost,) = step([(1, False, False)])
    assert isinstance(lost, pm.SequenceError) and "sequence 1 is not held" in str(lost)
    clock.now += 2.5  # longer than the idle timeout with no request for 2
    (late,) = step([(2, False, False)])
    assert isinstance(late, pm.SequenceError) and len(states) == 0
    (restarted,) = step([(2, True, False)])  # the client's answer to the error: START again
    assert not isinstance(restarted, pm.SequenceError) and 2 in states


# -- the real server ----------------------------------------------------------------------------------------


def test_real_triton_parses_the_onnxruntime_backend_config_as_written(server):
    states = server.model_states()
    assert states["tsm"][0] == "READY"
    # Loaded with --disable-auto-complete-config: the config was parsed and taken as written; what fails is only
    # the missing backend library (the wheel has no onnxruntime backend).
    state, reason = states["tsm_ort"]
    assert state == "UNAVAILABLE" and "unable to find backend library for backend 'onnxruntime'" in reason, reason
    log = server.log_text()
    assert "Poll failed for model directory 'tsm_ort'" not in log
    # The check can fail: a config Triton cannot parse never reaches the backend; the repository poll refuses it.
    assert "Poll failed for model directory 'broken': failed to read text proto" in log
    assert states["broken"][0] != "READY" and "backend library" not in states["broken"][1]


def test_real_triton_client_says_a_config_without_state_has_none(server):
    server.wait_model_ready("no_state")
    with pytest.raises(ConfigError) as error:
        TritonOnlineEngine(server.grpc_url, "no_state")
    message = str(error.value)
    assert "sequence_batching has no `state` entries" in message and "it is a online" not in message, message
    with pytest.raises(ConfigError, match="has no ready model 'tsm_ort'.*tsm_ort \\(UNAVAILABLE\\)"):
        TritonOnlineEngine(server.grpc_url, "tsm_ort")


def test_real_triton_python_model_matches_onnxruntime_across_clients_restarts_and_end(server, plain_onnx):
    a, b = TritonOnlineEngine(server.grpc_url, "tsm"), TritonOnlineEngine(server.grpc_url, "tsm")
    reference = OrtOnlineEngine(plain_onnx, providers="cpu")
    assert a.server_state_spec == reference.state_spec and a.state_keeper == "model"
    rng = np.random.default_rng(1)
    held = {"a": (a.zero_state(2), reference.zero_state(2)), "b": (b.zero_state(1), reference.zero_state(1))}
    try:
        for t in range(4):
            if t == 2:  # client a's streams restart (a reconnect): new sequences, zero state
                held["a"] = (a.zero_state(2), reference.zero_state(2))
            for client, engine in (("a", a), ("b", b)):
                state, ref = held[client]
                x = rng.standard_normal((len(state[SEQUENCE_STATE]), 3, SIZE, SIZE), dtype=np.float32)
                logits, state = engine.step(x, state)
                expected, ref = reference.step(x, ref)
                assert np.abs(logits - expected).max() <= TOL, (client, t)
                held[client] = (state, ref)
        (token,) = held["b"][0][SEQUENCE_STATE]
    finally:
        a.close()
        b.close()  # ENDs b's sequence: the model drops it
    again = TritonOnlineEngine(server.grpc_url, "tsm")
    try:
        with pytest.raises(TritonError, match=f"sequence {token.sequence_id}"):
            again.step(rng.standard_normal((1, 3, SIZE, SIZE), dtype=np.float32), {SEQUENCE_STATE: [token]})
    finally:
        again.close()


def _listen(endpoint: str, received: list, done: threading.Event) -> None:
    # Bound here, the runs connect to it (`run --connect`): their connection and its subscription are made when each
    # run's publisher starts, before its first frame. A subscriber connecting to a run's bound port would retry
    # every 100 ms and, on a loaded machine, miss the first dozens of messages of a run that is not paced.
    with Subscriber(endpoint, ["streamtsm.pred"], bind=True) as sub:
        while not done.is_set():
            if (message := sub.recv(timeout=0.1)) is not None:
                received.append(message)


def _run_cli(args: list[str]) -> subprocess.Popen:
    code = "import sys; from streamtsm.cli import entry; sys.argv[0] = 'streamtsm'; entry()"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _by_frame(received: list, streams: list[str]) -> dict[str, dict[int, dict[str, float]]]:
    out: dict[str, dict[int, dict[str, float]]] = {s: {} for s in streams}
    for topic, payload in received:
        stream = topic.removeprefix("streamtsm.pred.")
        if stream in out:
            out[stream][payload["frame"]] = {e["label"]: e["score"] for e in payload["topk"]}
    return out


def test_real_triton_run_equals_run_onnx_on_real_clips_with_a_stream_joining_late(server, plain_onnx):
    clips = {"arm": VIDEOS / "arm_wrestling.mp4", "sample": VIDEOS / "sample.mp4", "late": VIDEOS / "sample.avi"}
    missing = [str(p) for p in clips.values() if not p.is_file()]
    if missing:
        pytest.skip(f"the real clips are absent: {', '.join(missing)} (../shared/data, see its README)")
    common = ["--topk", "5", "--quiet", "--stats-interval", "5"]

    def sources(*names: str) -> list[str]:
        return [a for n in names for a in ("--source", str(clips[n]), "--name", n)]

    ports = {"onnx": free_port(), "first": free_port(), "late": free_port()}
    received: dict[str, list] = {k: [] for k in ports}
    done = threading.Event()
    listeners = [threading.Thread(target=_listen, args=(f"tcp://127.0.0.1:{port}", received[k], done), daemon=True)
                 for k, port in ports.items()]
    for listener in listeners:
        listener.start()
    time.sleep(0.3)  # the subscribers bind
    try:
        # Two streams through Triton at their native frame rate (~10 s), and, once they are running, a third from
        # another client (its own sequence ids) that comes and goes while they run.
        first = _run_cli(["run", "--backend", "triton", "--url", server.grpc_url, "--triton-model", "tsm",
                          *sources("arm", "sample"), "--realtime", "--connect", f"tcp://127.0.0.1:{ports['first']}",
                          *common])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and first.poll() is None:
            seen = {t for t, _ in received["first"]}
            if {"streamtsm.pred.arm", "streamtsm.pred.sample"} <= seen:
                break
            time.sleep(0.05)
        late = _run_cli(["run", "--backend", "triton", "--url", server.grpc_url, "--triton-model", "tsm",
                         *sources("late"), "--connect", f"tcp://127.0.0.1:{ports['late']}", *common])
        late_out, _ = late.communicate(timeout=60)
        first_running = first.poll() is None
        first_out, _ = first.communicate(timeout=60)
        local = _run_cli(["run", "--onnx", str(plain_onnx), *sources("arm", "sample", "late"),
                          "--connect", f"tcp://127.0.0.1:{ports['onnx']}", *common])
        local_out, _ = local.communicate(timeout=60)
        time.sleep(0.5)  # the last messages arrive
    finally:
        done.set()
        for listener in listeners:
            listener.join(timeout=5)
    assert (first.returncode, late.returncode, local.returncode) == (0, 0, 0), (first_out, late_out, local_out)
    assert first_running, "the late client finished after the first had ended: it did not join while they ran"
    served = {**_by_frame(received["first"], ["arm", "sample"]), **_by_frame(received["late"], ["late"])}
    expected = _by_frame(received["onnx"], ["arm", "sample", "late"])
    for stream, frames in {"arm": 280, "sample": 300, "late": 164}.items():
        both = sorted(set(served[stream]) & set(expected[stream]))
        # ZeroMQ may lose a publisher's first messages before the subscription reaches it, never later ones.
        assert len(both) >= frames - 30, (stream, len(served[stream]), len(expected[stream]))
        for index in both:
            got, want = served[stream][index], expected[stream][index]
            assert got.keys() == want.keys() == set(LABELS), (stream, index)
            assert max(abs(got[k] - want[k]) for k in want) <= TOL, (stream, index, got, want)
