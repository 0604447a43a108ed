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
