"""What a person sees of the command line: --version, global options on either side of the command, progress bars on
a terminal and epoch lines off one, "did you mean" for a mistyped model, listen's waiting line, --quiet, and
summaries without a None."""

from __future__ import annotations

import argparse
import os
import socket
import sys

import pytest

from streamtsm import __version__
from streamtsm.cli import build_parser, main
from streamtsm.errors import ConfigError
from streamtsm.models import create, save_checkpoint

CLASSES = ["move_left", "move_right", "still"]
TINY_TRAIN = ["--model", "tsm_mobilenetv2_online", "--width-mult", "0.25", "--input-size", "32", "--num-segments",
              "4", "--batch-size", "3", "--lr", "0.02", "--workers", "0", "--device", "cpu", "--seed", "1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root), "--clips-per-class", "3", "--frames", "8", "--size", "40x32",
                 "--val-fraction", "0.34", "--classes", *CLASSES]) == 0
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- --version and the global options --------------------------------------------------------------------------


def test_cli_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"streamtsm {__version__}\n"


@pytest.mark.parametrize("argv", [["--debug", "run", "--duration", "nan"], ["run", "--duration", "nan", "--debug"]])
def test_cli_global_debug_is_taken_before_or_after_the_command(argv):
    with pytest.raises(ConfigError, match="--duration"):  # --debug: the error is raised, not printed
        main(argv)


def test_cli_global_options_default_when_given_nowhere(capsys):
    assert main(["run", "--duration", "nan"]) == 2
    assert capsys.readouterr().err.startswith("streamtsm: error: --duration")


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_cli_global_options_are_accepted_after_every_command(command):
    parser = _commands()[command]
    given = [a.dest for a in parser._actions if a.dest in ("debug", "log_level", "offline")]  # noqa: SLF001
    assert sorted(given) == ["debug", "log_level", "offline"]


@pytest.mark.parametrize(("argv", "level"), [
    (["--log-level", "INFO", "models"], "INFO"),
    (["models", "--log-level", "ERROR"], "ERROR"),
    (["--log-level", "INFO", "models", "--log-level", "ERROR"], "ERROR"),  # after the command wins
    (["models"], "WARNING"),
    (["--debug", "models", "--log-level", "ERROR"], "ERROR"),  # one before, one after: both kept
])
def test_cli_global_log_level_either_place(argv, level):
    args = build_parser().parse_args(argv)
    assert args.log_level == level
    assert args.debug is ("--debug" in argv) and args.offline is False


@pytest.mark.parametrize("argv", [["--offline", "models"], ["models", "--offline"]])
def test_cli_global_offline_either_place_sets_the_environment(monkeypatch, capsys, argv):
    monkeypatch.delenv("STREAMTSM_OFFLINE", raising=False)
    assert main(argv) == 0
    assert os.environ.get("STREAMTSM_OFFLINE") == "1"
    monkeypatch.delenv("STREAMTSM_OFFLINE", raising=False)


# -- did you mean -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["run", "--publish", "none", "--max-frames", "1", "--model", "tsm_mobilenetv2_onlin"],
    ["export-onnx", "--model", "tsm_mobilenetv2_onlin", "-o", "x.onnx"],
    ["train", "--model", "tsm_mobilenetv2_onlin", "--train", "missing.txt"],
])
def test_cli_mistyped_model_suggests_the_closest_names(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "did you mean tsm_mobilenetv2_online" in lines[0], lines


def test_cli_model_given_a_catalog_name_says_to_use_weights(capsys):
    assert main(["run", "--publish", "none", "--max-frames", "1", "--model", "tsm_mobilenetv2_jester_online"]) == 2
    err = capsys.readouterr().err
    assert "--weights tsm_mobilenetv2_jester_online" in err and err.count("\n") == 1


# -- listen --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("json_out", [False, True])
def test_listen_says_once_on_stderr_that_it_waits(capsys, json_out):
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    assert main(["listen", "--connect", endpoint, "--timeout", "0.3", *(["--json"] if json_out else [])]) == 0
    out, err = capsys.readouterr()
    assert out == ""  # stdout holds the messages only (JSON Lines with --json)
    assert err.count(f"listen: waiting for messages on {endpoint}") == 1 and err.count("\n") == 1


def test_listen_quiet_prints_no_waiting_line(capsys):
    assert main(["listen", "--connect", f"tcp://127.0.0.1:{_free_port()}", "--timeout", "0.2", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_listen_bad_endpoint_is_one_line_without_the_waiting_line(capsys):
    assert main(["listen", "--connect", "nonsense", "--timeout", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "waiting" not in err


# -- --quiet and the summaries ----------------------------------------------------------------------------------


def _run_synthetic(capsys, *extra) -> tuple[str, str]:
    assert main(["run", "--source", "synthetic:64x48@30", "--max-frames", "2", "--publish", "none", *extra]) == 0
    return capsys.readouterr()


def test_run_quiet_prints_only_the_summary(capsys):
    out, err = _run_synthetic(capsys)
    assert "streamtsm: tsm_r18_online" in err  # the banner, without --quiet
    out, err = _run_synthetic(capsys, "--quiet")
    assert err == ""
    lines = out.strip().splitlines()
    assert lines[0].startswith("synthetic: 2 frames processed") and lines[-1].startswith("messages published")
    assert len(lines) == 3  # the stream, the model, the publisher: no predictions


def test_run_summary_of_a_model_that_never_stepped_has_no_none(capsys):
    # A camera that never opens (refused at once on the loopback), kept trying: no frame and no model step, so no
    # latency, step time or batch size to show.
    assert main(["run", "--source", f"rtsp://127.0.0.1:{_free_port()}/x", "--keep-trying", "--duration", "0.5",
                 "--publish", "none", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "latency p50/p99 -/- ms" in out and "0 model steps, p50 - ms, mean batch -" in out
    assert "None" not in out


def test_download_quiet_prints_only_the_paths(capsys):
    assert main(["download", "streamtsm_demo", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("streamtsm_demo: ") and out.count("\n") == 1 and err == ""


# -- train, eval, synth, export: epoch lines and progress bars -------------------------------------------------


def test_train_prints_one_line_per_epoch_when_not_a_terminal(dataset, tmp_path, capsys):
    assert main(["train", *TINY_TRAIN, "--train", str(dataset / "train.txt"), "--epochs", "2",
                 "--out", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    epochs = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in epochs] == ["epoch 1/2", "epoch 2/2"], out
    assert all("loss" in ln and "train top-1" in ln and ln.endswith(" s") for ln in epochs)
    assert "None" not in out and "epoch 1/2" not in err  # no bar: stderr is not a terminal


def test_train_on_a_terminal_shows_a_bar_and_no_plain_lines(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # in the test: capsys swaps sys.stderr after set-up
    assert main(["train", *TINY_TRAIN, "--train", str(dataset / "train.txt"), "--epochs", "1",
                 "--out", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "it/s" in err or "s/it" in err, (out, err)  # tqdm's bar
    assert sum(ln.startswith("epoch 1/1: loss") for ln in out.splitlines()) == 1  # once, written past the bar


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY_TRAIN, "--train", str(dataset / "train.txt"), "--epochs", "1", "--out",
                 str(out), "--no-progress"]) == 0
    return out / "best.pth"


@pytest.mark.parametrize("on_terminal", [False, True])
def test_eval_progress_bar_only_on_a_terminal(dataset, trained, capsys, monkeypatch, on_terminal):
    if on_terminal:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["eval", "--weights", str(trained), "--val", str(dataset / "val.txt"), "--num-clips", "1",
                 "--workers", "0", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert ("eval offline" in err and "eval online" in err) == on_terminal
    assert "None" not in out


@pytest.mark.parametrize("on_terminal", [False, True])
def test_synth_progress_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch, on_terminal):
    if on_terminal:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["synth", "--out", str(tmp_path / "d"), "--clips-per-class", "1", "--frames", "4", "--size", "32",
                 "--classes", "still", "move_left"]) == 0
    assert ("rendering" in capsys.readouterr().err) == on_terminal


@pytest.mark.parametrize("on_terminal", [False, True])
def test_export_onnx_verification_and_calibration_bars_only_on_a_terminal(tmp_path, capsys, monkeypatch,
                                                                          on_terminal):
    if on_terminal:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    weights = tmp_path / "tiny.pth"
    save_checkpoint(create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.25, input_size=32,
                           resize_size=36), weights)
    assert main(["export-onnx", "--weights", str(weights), "-o", str(tmp_path / "m.onnx"), "--int8",
                 "--calib-frames", "12"]) == 0
    out, err = capsys.readouterr()
    assert ("verifying" in err) == on_terminal and ("calibrating" in err) == on_terminal
    assert "None" not in out and "verified with onnxruntime" in out and "top-1 agreement" in out
