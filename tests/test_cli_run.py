"""`streamtsm run` and `listen` as a user meets them: clean shutdown on SIGTERM, one-line errors with exit code 2."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import zmq

from streamtsm.cli import main

RUN = [sys.executable, "-m", "streamtsm.cli"]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from ip_camera import IpCamera  # noqa: E402  (tools/: the IP camera the soak uses too)


def _free_port() -> int:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PUB)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(linger=0)
    return port


def test_sigterm_stops_run_cleanly_with_final_stats(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(RUN + ["run", "--source", "synthetic:96x72@30", "--publish", f"tcp://127.0.0.1:{port}",
                                   "--model", "tsm_mobilenetv2_online"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait for the first printed prediction: the pipeline is running.
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "synthetic #" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"run exited early: {proc.stderr.read()}")
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=15)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "synthetic:" in out and "frames processed" in out and "tsm_mobilenetv2_online (torch):" in out
    assert "Traceback" not in err


def _run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_model_is_one_line_and_exit_2(capsys):
    code, err = _run_cli(capsys, "run", "--model", "tsm_r77", "--publish", "none")
    assert code == 2 and err.count("\n") == 1 and "unknown model 'tsm_r77'" in err


def test_camera_that_does_not_exist_is_one_line_and_exit_2(capsys):
    code, err = _run_cli(capsys, "run", "--camera", "97", "--model", "tsn_mobilenetv2", "--publish", "none")
    assert code == 2 and "camera 97" in err and "Traceback" not in err


def test_undecodable_file_is_one_line_and_exit_2(capsys, tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_text("not a video")
    code, err = _run_cli(capsys, "run", "--source", str(bad), "--model", "tsn_mobilenetv2", "--publish", "none")
    assert code == 2 and str(bad) in err and "cannot decode" in err


def test_endpoint_in_use_is_one_line_and_exit_2(capsys):
    ctx = zmq.Context.instance()
    holder = ctx.socket(zmq.PUB)
    port = holder.bind_to_random_port("tcp://127.0.0.1")
    try:
        code, err = _run_cli(capsys, "run", "--publish", f"tcp://127.0.0.1:{port}", "--model", "tsn_mobilenetv2")
    finally:
        holder.close(linger=0)
    assert code == 2 and "address already in use" in err and str(port) in err


def test_debug_flag_shows_the_traceback():
    with pytest.raises(Exception, match="unknown model"):
        main(["--debug", "run", "--model", "nope", "--publish", "none"])


def test_run_on_a_file_prints_predictions_and_summary(capsys, shared_data):
    code = main(["run", "--source", str(shared_data / "videos" / "arm_wrestling.mp4"), "--model",
                 "tsm_mobilenetv2_online", "--publish", "none", "--max-frames", "12"])
    out = capsys.readouterr().out
    assert code == 0 and "arm_wrestling #0" in out and "arm_wrestling: 12 frames processed" in out


def test_run_makes_opencv_run_each_call_on_the_capture_thread_that_makes_it(capsys):
    # Capture threads are the parallelism; OpenCV's pool splitting each small resize over the cores again costs more.
    cv2.setNumThreads(2)
    try:
        code = main(["run", "--source", "synthetic:64x48@30", "--model", "tsn_mobilenetv2", "--publish", "none",
                     "--max-frames", "2"])
        assert code == 0 and cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(-1)  # OpenCV's default for the tests after this one


@pytest.mark.parametrize(("lanes", "said"), [("2", "in 2 lanes"), ("1", None)])
def test_run_lanes_option_steps_the_streams_in_that_many_lanes_and_says_so(capsys, lanes, said):
    code = main(["run", "--source", "synthetic:64x48@30", "--source", "synthetic:64x48@30", "--model",
                 "tsn_mobilenetv2", "--publish", "none", "--max-frames", "3", "--lanes", lanes])
    captured = capsys.readouterr()
    assert code == 0 and "synthetic: 3 frames processed" in captured.out and "synthetic-2: 3 frames" in captured.out
    banner = next(line for line in captured.err.splitlines() if " on synthetic, synthetic-2" in line)
    assert (said in banner) if said else "lanes" not in banner


def test_listen_prints_what_run_publishes(capsys):
    port = _free_port()
    proc = subprocess.Popen(RUN + ["run", "--source", "synthetic:64x48@30", "--model", "tsn_mobilenetv2",
                                   "--publish", f"tcp://127.0.0.1:{port}", "--duration", "30", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        code = main(["listen", "--connect", f"tcp://127.0.0.1:{port}", "--topic", "streamtsm.pred",
                     "--max-messages", "3", "--timeout", "40"])
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 3 and all("synthetic #" in ln for ln in lines)


def test_run_clip_model_on_rolling_windows(capsys):
    # X3D-XS: windows of 4 frames 12 apart (37 frames), a prediction every 5th frame after that.
    code = main(["run", "--model", "x3d_xs", "--source", "synthetic:96x72@60", "--publish", "none",
                 "--max-frames", "47", "--clip-stride", "5"])
    out = capsys.readouterr().out
    assert code == 0 and "synthetic: 47 frames processed" in out
    assert "x3d_xs (torch): 3 model steps" in out  # frames 37, 42, 47


# -- run --config beside command-line options ---------------------------------------------------------------

SITE = """\
[publish]
endpoint = "{endpoint}"
{metrics}
[defaults]
model = "tsm_mobilenetv2_online"
smooth = 4
topk = 2

[[camera]]
id = "door"
source = "synthetic:64x48@30"
"""


@pytest.fixture
def site(tmp_path):
    def write(endpoint: str = "none", metrics: str = "") -> str:
        path = tmp_path / "site.toml"
        path.write_text(SITE.format(endpoint=endpoint, metrics=metrics))
        return str(path)
    return write


@pytest.fixture
def resolved(monkeypatch):
    """What `run` ends up with: the pipeline's options and publisher, and where metrics would be served."""
    from streamtsm.pipeline import Pipeline
    from streamtsm.publish import Publisher
    from streamtsm.sinks.metrics import MetricsSink

    seen: dict = {}
    from_groups = Pipeline.from_groups

    def record(cls, groups, *, sinks, options):
        publishers = [s for s in sinks if isinstance(s, Publisher)]
        seen.update(options=options, endpoint=publishers[0].endpoint if publishers else None)
        return from_groups(groups, sinks=sinks, options=options)

    monkeypatch.setattr(Pipeline, "from_groups", classmethod(record))
    monkeypatch.setattr(MetricsSink, "serve", lambda self, port, addr: seen.update(metrics=(port, addr)))
    return seen


@pytest.mark.parametrize("flags", [
    ["--device", "cpu"], ["--labels", "labels.txt"], ["--providers", "cpu"], ["--frame-stride", "2"],
    ["--clip-stride", "2"], ["--backend", "torch"], ["--url", "gpu-host:8001"], ["--triton-model", "jester"],
    ["--source", "synthetic"], ["--camera", "0"], ["--name", "door"], ["--model", "tsn_mobilenetv2"],
    ["--weights", "w.pth"], ["--onnx", "m.onnx"], ["--device", "cpu", "--frame-stride", "2"],
])
def test_run_config_refuses_camera_and_model_options_naming_them(site, capsys, flags):
    code, err = _run_cli(capsys, "run", "--config", site(), "--max-frames", "1", "--quiet", *flags)
    assert code == 2 and err.count("\n") == 1 and "sets the cameras and their models per camera" in err, err
    assert all(f in err for f in flags if f.startswith("--"))


def test_run_command_line_options_override_the_config_which_overrides_the_defaults(site, capsys, resolved):
    from streamtsm.settings import RUN_DEFAULTS

    port = _free_port()
    path = site(endpoint=f"tcp://127.0.0.1:{_free_port()}", metrics="[metrics]\nport = 9\naddr = \"127.0.0.2\"\n")
    code = main(["run", "--config", path, "--max-frames", "2", "--quiet", "--publish", f"tcp://127.0.0.1:{port}",
                 "--smooth", "6", "--metrics-addr", "127.0.0.3", "--background", "still",
                 "--stats-interval", "0.5"])
    assert code == 0, capsys.readouterr().err
    o = resolved["options"]
    assert resolved["endpoint"] == f"tcp://127.0.0.1:{port}"  # the command line's
    assert resolved["metrics"] == (9, "127.0.0.3")  # the file's port, the command line's address
    assert (o.smooth, o.topk, o.hold) == (6, 2, RUN_DEFAULTS["hold"])  # command line, file, built in
    assert o.background == ["still"] and o.stats_interval == 0.5 and o.max_frames == 2


def test_run_publish_none_on_the_command_line_overrides_the_config(site, capsys, resolved):
    assert main(["run", "--config", site(endpoint=f"tcp://127.0.0.1:{_free_port()}"), "--publish", "none",
                 "--max-frames", "1", "--quiet"]) == 0
    assert resolved["endpoint"] is None and "publishing on" not in capsys.readouterr().err


def test_run_config_values_apply_where_the_command_line_is_silent(site, capsys, resolved):
    from streamtsm.settings import RUN_DEFAULTS

    port = _free_port()
    assert main(["run", "--config", site(endpoint=f"tcp://127.0.0.1:{port}", metrics="[metrics]\nport = 9\n"),
                 "--max-frames", "1", "--quiet"]) == 0
    o = resolved["options"]
    assert resolved["endpoint"] == f"tcp://127.0.0.1:{port}"
    assert resolved["metrics"] == (9, RUN_DEFAULTS["metrics_addr"])
    assert (o.smooth, o.topk, o.threshold) == (4, 2, RUN_DEFAULTS["threshold"])


@pytest.mark.parametrize("argv,message", [
    (["--publish", "tcp://127.0.0.1:1", "--connect", "tcp://127.0.0.1:2"], "give either --publish"),
    (["--metrics-addr", "0.0.0.0"], "--metrics-addr 0.0.0.0 needs a port"),
])
def test_run_contradictory_output_options_are_one_line_and_exit_2(capsys, argv, message):
    code, err = _run_cli(capsys, "run", "--model", "tsn_mobilenetv2", "--max-frames", "1", *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_run_single_camera_that_never_opens_is_one_line_after_the_startup_timeout(capsys):
    assert main(["run", "--camera", "97", "--startup-timeout", "0.3", "--publish", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "camera 97" in err and "--keep-trying" in err


def test_site_config_keys_startup_timeout_and_keep_trying_are_checked(tmp_path):
    from streamtsm.errors import ConfigError
    from streamtsm.siteconfig import load_site_config

    config = tmp_path / "site.toml"
    config.write_text('[defaults]\nstartup_timeout = 2.5\nkeep_trying = true\n[[camera]]\nid = "a"\nsource = 0\n')
    assert load_site_config(config).options == {"startup_timeout": 2.5, "keep_trying": True}
    config.write_text('[defaults]\nkeep_trying = "yes"\n[[camera]]\nid = "a"\nsource = 0\n')
    with pytest.raises(ConfigError, match="keep_trying must be true or false"):
        load_site_config(config)
    config.write_text('[defaults]\nstartup_timeout = -1\n[[camera]]\nid = "a"\nsource = 0\n')
    with pytest.raises(ConfigError, match="startup_timeout"):
        load_site_config(config)


@pytest.mark.parametrize("after_s", [1.0, 4.0])
def test_sigterm_while_loading_or_while_a_source_opens_exits_0_promptly(after_s):
    # camera 97 does not exist: a single source is waited for (startup timeout 15 s), so run sits in start().
    # 1 s lands in setup (torch importing, the model loading), 4 s in start(): either way a prompt, clean exit 0.
    proc = subprocess.Popen(RUN + ["run", "--camera", "97", "--publish", "none"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(after_s)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 3.0, "the stop waited for something"
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "error" not in err.lower()


@pytest.mark.parametrize("stalled_s", [1.0, 7.0], ids=["inside-a-read", "after-the-hung-reader-was-replaced"])
def test_sigterm_with_an_http_camera_stalled_in_the_decoder_exits_0_promptly(stalled_s):
    # 1 s: the capture thread is blocked in FFmpeg's read. 7 s: past the 5 s read timeout the hung reader was
    # abandoned and a new one connected and stalled too, so two threads sit in the decoder. The interpreter's
    # clean-up under such a thread used to abort the process (C++ terminate, exit 134) after seconds.
    with IpCamera("stall", frames=20) as camera:
        proc = subprocess.Popen(RUN + ["run", "--source", camera.url, "--publish", "none", "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stalled_at = camera.wait_stalls(1, timeout=60)
            time.sleep(max(0.0, stalled_at + stalled_s - time.monotonic()))
            if stalled_s > 5:
                camera.wait_stalls(2, timeout=30)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 3.0, "the stop waited for the stalled decoder"
    assert "frames processed" in out  # the final stats were printed
    assert "Traceback" not in err and "terminate" not in err


def test_sigterm_with_a_flapping_camera_among_many_streams_exits_0_promptly():
    # A camera that drops every 10 frames and answers 503 for a second, beside seven synthetic streams that keep
    # the model busy: the stop lands while that camera reconnects with back-off and the others are mid-batch.
    with IpCamera("flap", frames=10, down_s=1.0) as camera:
        sources = ["--source", camera.url]
        for _ in range(7):
            sources += ["--source", "synthetic:96x72@30"]
        proc = subprocess.Popen(RUN + ["run", *sources, "--publish", "none", "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            camera.wait_stalls(2, timeout=60)  # it has dropped twice: the run is up and the camera reconnects
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 3.0, "the stop waited for something"
    camera_line = next(line for line in out.splitlines() if line.startswith("127-0-0-1-"))
    assert " 0 reconnects" not in camera_line  # the drops were seen and counted
    assert out.count("frames processed") == 8
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["run"], ["synth", "--out", "x"]])
def test_a_command_without_opencv_installed_names_the_extras_in_one_line(command):
    # A plain `pip install streamtsm` has no OpenCV (its two builds break each other; an extra picks one). A cv2
    # that cannot be found stands in for it: the command is one line naming the extras and exit 2.
    code = ("import importlib.util, sys\n"
            "importlib.util.find_spec = (lambda f: lambda name, *a: None if name == 'cv2' else f(name, *a))"
            "(importlib.util.find_spec)\n"
            "from streamtsm.cli import main\n"
            f"sys.exit(main({command!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "OpenCV" in lines[0] and "streamtsm[cpu]" in lines[0], proc.stderr


@pytest.mark.parametrize("after_s", [0.3, 0.6, 0.9, 1.2, 1.5, 1.8])
def test_sigterm_while_the_interpreter_starts_run_exits_0(after_s):
    # Before `run` installs its handlers (the command line being read, onnxruntime importing) and while torch imports
    # and the model loads: the process's entry point catches the signal from its first line, and no handler raises
    # into an import that runs through C++ (that aborted the process), so this is a clean stop.
    proc = subprocess.Popen(RUN + ["run", "--source", "synthetic:96x72@30", "--publish", "none"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(after_s)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "terminate" not in err


def test_sigterm_to_another_command_is_not_reported_as_success(tmp_path):
    # Only `run` treats a stop as its normal end; an interrupted `synth` ends as any program killed by the signal.
    proc = subprocess.Popen(RUN + ["synth", "--out", str(tmp_path / "d"), "--clips-per-class", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM, err
