"""Bad input from a user: each is one clear line on stderr and exit code 2; --debug shows the traceback."""

from __future__ import annotations

import socket

import pytest
import torch

from streamtsm.cli import main
from streamtsm.models import create, save_checkpoint


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["run", "--publish", "none", "--max-frames", "1", *argv])
    err = capsys.readouterr().err
    return code, err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("streamtsm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_weights_of_another_architecture(tmp_path, capsys):
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in
                               create("tsm_r18", num_classes=5, width=8).backbone.state_dict().items()}},
               path)
    code, err = _run(capsys, "--model", "tsm_mobilenetv2_online", "--weights", str(path))
    assert code == 2 and "does not fit tsm_mobilenetv2_online" in _one_error_line(err)


def test_truncated_checkpoint(tmp_path, capsys):
    path = tmp_path / "demo.pth"
    save_checkpoint(create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.25), path)
    path.write_bytes(path.read_bytes()[:5000])
    code, err = _run(capsys, "--weights", str(path))
    assert code == 2 and "truncated or corrupt" in _one_error_line(err)


def test_missing_checkpoint(tmp_path, capsys):
    code, err = _run(capsys, "--weights", str(tmp_path / "nope.pth"))
    assert code == 2 and "checkpoint not found" in _one_error_line(err)


def test_label_file_with_the_wrong_number_of_lines(tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    path = tmp_path / "m.pth"
    save_checkpoint(create("tsm_mobilenetv2_online", num_classes=5, width_mult=0.25), path)
    code, err = _run(capsys, "--weights", str(path), "--labels", str(labels))
    assert code == 2 and "3" in _one_error_line(err) and "5 classes" in err


def test_foreign_checkpoint_without_model_name(tmp_path, capsys):
    path = tmp_path / "foreign.pth"
    torch.save({"features.0.0.weight": torch.zeros(1)}, path)
    code, err = _run(capsys, "--weights", str(path))
    assert code == 2 and "--model" in _one_error_line(err)


def test_bad_option_value_is_an_argparse_error_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--max-frames", "many"])
    assert exc.value.code == 2 and "invalid int value" in capsys.readouterr().err


def test_names_beyond_the_sources(capsys):
    code, err = _run(capsys, "--source", "synthetic", "--name", "a", "--name", "b")
    assert code == 2 and "2 --name values for 1 sources" in _one_error_line(err)


def test_malformed_synthetic_spec(capsys):
    code, err = _run(capsys, "--source", "synthetic:big", "--model", "tsn_mobilenetv2")
    assert code == 2 and "synthetic:WIDTHxHEIGHT@FPS" in _one_error_line(err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("camera,message", [
    ('weights = "{tmp}/nope.pth"', "checkpoint not found"),
    ('backend = "triton"\nurl = "127.0.0.1:{port}"\ntriton_model = "tiny"', "is unreachable"),
])
def test_engine_error_of_a_config_camera_names_the_file_line_and_camera(tmp_path, capsys, camera, message):
    path = tmp_path / "site.toml"
    text = f'[[camera]]\nid = "gate"\nsource = "synthetic"\n{camera.format(tmp=tmp_path, port=_free_port())}\n'
    path.write_text(text)
    code, err = _run(capsys, "--config", str(path))
    header = text.splitlines().index("[[camera]]") + 1
    line = _one_error_line(err)
    assert code == 2 and line.startswith(f"streamtsm: error: {path}:{header}: camera 'gate': ") and message in line


# Every malformed value of `run` (and `listen`): one line naming the option, exit 2, decided before anything starts.
# A --model that does not exist makes a case that got past the checks fail differently, and nothing loads a model.
_BAD_OPTIONS = [
    (["--camera", "-1"], "--camera"),
    (["--camera", "99999999999999999999"], "--camera"),
    (["--duration", "nan"], "--duration"),
    (["--duration", "inf"], "--duration"),
    (["--duration", "0"], "--duration"),
    (["--duration", "-3"], "--duration"),
    (["--duration", "1e300"], "--duration"),
    (["--max-frames", "0"], "--max-frames"),
    (["--max-frames", "-5"], "--max-frames"),
    (["--stats-interval", "0"], "--stats-interval"),
    (["--stats-interval", "nan"], "--stats-interval"),
    (["--stats-interval=-inf"], "--stats-interval"),
    (["--threshold", "1.5"], "--threshold"),
    (["--threshold", "-0.1"], "--threshold"),
    (["--threshold", "nan"], "--threshold"),
    (["--topk", "0"], "--topk"),
    (["--topk", "-2"], "--topk"),
    (["--hold", "0"], "--hold"),
    (["--smooth", "0"], "--smooth"),
    (["--smooth", "1000000000000"], "--smooth"),
    (["--frame-stride", "0"], "--frame-stride"),
    (["--frame-stride", "-1"], "--frame-stride"),
    (["--clip-stride", "0"], "--clip-stride"),
    (["--threads", "0"], "--threads"),
    (["--threads", "-4"], "--threads"),
    (["--lanes", "0"], "--lanes"),
    (["--lanes", "1000"], "--lanes"),
    (["--live-buffer", "0"], "--live-buffer"),
    (["--live-buffer", "65"], "--live-buffer"),
    (["--metrics-port", "0"], "--metrics-port"),
    (["--metrics-port", "70000"], "--metrics-port"),
    (["--metrics-port", "-1"], "--metrics-port"),
    (["--name", "cam0.pred"], "--name"),
    (["--name", "a\nb"], "--name"),
    (["--name", "x" * 65], "--name"),
    (["--name", ""], "--name"),
]


@pytest.mark.parametrize("argv,option", _BAD_OPTIONS, ids=[" ".join(a)[:40] for a, _ in _BAD_OPTIONS])
def test_run_option_out_of_range_is_one_line_and_exit_2(capsys, argv, option):
    code = main(["run", "--publish", "none", "--model", "no_such_model", *argv])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and option in line and "no_such_model" not in line, line


@pytest.mark.parametrize("argv,option", [(["--timeout", "nan"], "--timeout"), (["--timeout", "0"], "--timeout"),
                                         (["--max-messages", "0"], "--max-messages")])
def test_listen_option_out_of_range_is_one_line_and_exit_2(capsys, argv, option):
    code = main(["listen", "--connect", "tcp://127.0.0.1:1", *argv])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and option in line, line


@pytest.mark.parametrize("option", ["--labels", "--weights", "--onnx", "--config"])
def test_run_file_option_that_is_a_folder_is_one_line_and_exit_2(tmp_path, capsys, option):
    code = main(["run", "--publish", "none", option, str(tmp_path)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and option in line and "folder" in line, line


_BAD_SITE_CONFIGS = [
    ('[[camera]]\nid = "a"\nsource = -1\n', "source"),
    ('[[camera]]\nid = "a"\nsource = 123456789012\n', "source"),
    ('[defaults]\nthreshold = nan\n[[camera]]\nid = "a"\nsource = 0\n', "threshold"),
    ('[defaults]\nthreshold = 2.0\n[[camera]]\nid = "a"\nsource = 0\n', "threshold"),
    ('[defaults]\nsmooth = 1000000000000\n[[camera]]\nid = "a"\nsource = 0\n', "smooth"),
    ('[defaults]\ntopk = -1\n[[camera]]\nid = "a"\nsource = 0\n', "topk"),
    ('[metrics]\nport = 70000\n[[camera]]\nid = "a"\nsource = 0\n', "metrics.port"),
    ('[metrics]\nport = 0\n[[camera]]\nid = "a"\nsource = 0\n', "metrics.port"),
    ('[[camera]]\nid = "a"\nsource = 0\nclip_stride = 0\n', "clip_stride"),
    ('[[camera]]\nid = "a.b"\nsource = 0\n', "id"),
    ('[[camera]]\nid = "a"\nsource = 0\nlabels = "."\n', "labels"),
    ("camera = [1, 2]\n", "camera 1"),
    ("camera = [[1]]\n", "camera 1"),
    ('[[camera]]\nid = "a"\nsource = {x = [1, {y = 2}]}\n', "source"),
    ('[[camera]]\nid = ["a"]\nsource = 0\n', "id"),
    ('[defaults]\nbackground = [[["x"]]]\n[[camera]]\nid = "a"\nsource = 0\n', "background"),
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("x = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n", "nested"),
]


@pytest.mark.parametrize("text,key", _BAD_SITE_CONFIGS, ids=[t[:30] for t, _ in _BAD_SITE_CONFIGS])
def test_run_bad_site_config_is_one_line_and_exit_2(tmp_path, capsys, text, key):
    path = tmp_path / "site.toml"
    path.write_text(text)
    code = main(["run", "--publish", "none", "--config", str(path)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and key in line and str(path) in line, line


@pytest.mark.parametrize("data", ["caméra = 1\n".encode("latin-1"), "id = 'é'\n".encode("utf-16"), b"\xff\xfe\x00",
                                  b"\x00\x01\x02"])
def test_run_site_config_of_another_encoding_is_one_line_and_exit_2(tmp_path, capsys, data):
    path = tmp_path / "site.toml"
    path.write_bytes(data)
    code = main(["run", "--publish", "none", "--config", str(path)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and str(path) in line, line
