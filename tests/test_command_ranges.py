"""Every numeric option of every command has a range (streamtsm.settings.RANGES) and is checked before anything
starts: a value out of it (negative, zero where meaningless, NaN, infinite, absurdly large) is one line on stderr and
exit 2. The options are read from the parser itself, so a numeric option added later without a range fails here."""

from __future__ import annotations

import argparse

import pytest

from streamtsm.cli import build_parser, main
from streamtsm.errors import ConfigError
from streamtsm.settings import RANGES, check_setting, check_settings

# The arguments each command needs besides the option under test; none of the files exist, so a command that got
# past its range checks would fail on them with another message (which the tests would notice).
REQUIRED = {
    "run": ["--publish", "none", "--max-frames", "1"],
    "listen": ["--connect", "tcp://127.0.0.1:1", "--timeout", "0.01"],
    "export-onnx": ["-o", "never/written.onnx"],
    "quantize": ["--onnx", "missing.onnx", "-o", "never/written.onnx"],
    "export-triton": ["-o", "never/repo"],
    "train": ["--train", "missing/train.txt", "--model", "tsm_r18"],
    "eval": ["--weights", "missing.pth", "--val", "missing/val.txt"],
    "synth": ["--out", "never/synth"],
    "download": ["streamtsm_demo"],
    "models": [],
    "broker": [],
    "bridge mqtt": ["--connect", "tcp://127.0.0.1:1", "--mqtt", "127.0.0.1:1"],
}


def _subparsers(parser: argparse.ArgumentParser | None = None, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its words (``"run"``, ``"bridge mqtt"``): a command with commands of its own is
    replaced by them."""
    parser = parser or build_parser()
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)  # noqa: SLF001
    if action is None:
        return {prefix.strip(): parser}
    out = {}
    for name, sub in action.choices.items():
        out.update(_subparsers(sub, f"{prefix}{name} "))
    return out


def _numeric_options() -> list[tuple[str, str, str, type]]:
    """(command, option string, setting name, int or float) for every option parsed as a number (but those with
    choices, which argparse checks itself)."""
    out = []
    for command, parser in _subparsers().items():
        for action in parser._actions:  # noqa: SLF001
            if action.type in (int, float) and action.option_strings and action.choices is None:
                flag = max(action.option_strings, key=len)
                out.append((command, flag, action.dest, action.type))
    return out


NUMERIC = _numeric_options()
# Options checked before anything starts by their library's own option check, with its own message.
CHECKED_ELSEWHERE = {("train", "scales"): "crop scales must be fractions in (0, 1]"}


def test_command_ranges_table_knows_every_command():
    assert set(REQUIRED) == set(_subparsers())


@pytest.mark.parametrize(("command", "flag", "name", "kind"), NUMERIC, ids=[f"{c} {f}" for c, f, _, _ in NUMERIC])
def test_command_ranges_every_numeric_option_has_a_range_of_its_type(command, flag, name, kind):
    if (command, name) in CHECKED_ELSEWHERE:
        return
    assert name in RANGES, f"{command} {flag} has no range in streamtsm.settings.RANGES"
    assert RANGES[name].kind is kind


def _bad_values(name: str, kind: type) -> list[str]:
    """Values out of the setting's range that the option's type still parses."""
    if name == "scales":  # fractions in (0, 1]
        return ["-1", "0", "1.5", "nan", "inf", "1e300"]
    rule = RANGES.get(name)
    if rule is None:  # reported by the test above
        return []
    values = ["-1", str(10**13)]  # every range starts at or above 0 and ends below 10**13
    if kind is float:
        values += ["nan", "inf", "-inf", "1e300"]
    if rule.low > 0 or rule.low_open:
        values.append("0")
    if rule.high_open:
        values.append(str(rule.high) if kind is float else str(int(rule.high)))
    return values


CASES = [(c, f, n, v) for c, f, n, k in NUMERIC for v in _bad_values(n, k)]


@pytest.mark.parametrize(("command", "flag", "name", "value"), CASES, ids=[f"{c} {f} {v}" for c, f, _, v in CASES])
def test_command_ranges_out_of_range_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, command, flag, name, value):
    monkeypatch.chdir(tmp_path)
    code = main([*command.split(), *REQUIRED[command], f"{flag}={value}"])  # = : "-inf" would read as an option
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    named = CHECKED_ELSEWHERE.get((command, name), flag)
    assert lines[0].startswith("streamtsm: error:") and named in lines[0] and value in lines[0].replace("+", "")
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []  # nothing started: nothing written


def test_command_ranges_list_options_are_checked_item_by_item():
    check_settings({"lr_steps": [5, 10]}, ["lr_steps"])
    with pytest.raises(ConfigError, match=r"--lr-steps must be >= 1 .*got nan"):
        check_settings({"lr_steps": [5, float("nan")]}, ["lr_steps"])
    with pytest.raises(ConfigError, match="--lr-steps"):
        check_settings({"lr_steps": [5, 0]}, ["lr_steps"])


def test_command_ranges_open_high_end_is_refused_and_described():
    assert check_setting("dropout", 0.5) == 0.5
    with pytest.raises(ConfigError, match=r"dropout must be >= 0 and < 1 .*got 1.0"):
        check_setting("dropout", 1.0)


def test_command_ranges_values_in_range_pass_the_check(capsys, tmp_path, monkeypatch):
    # In range, the command goes on to its next step: here the missing data, not a range.
    monkeypatch.chdir(tmp_path)
    assert main(["train", *REQUIRED["train"], "--lr", "0.5", "--dropout", "0.3", "--scales", "1", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "missing/train.txt" in err and "must be" not in err
