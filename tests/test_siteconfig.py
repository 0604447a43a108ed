"""`run --config site.toml`: cameras grouped by model, and one clear error naming the key and line."""

from __future__ import annotations

import textwrap

import pytest

from streamtsm.cli import main
from streamtsm.errors import ConfigError
from streamtsm.siteconfig import load_site_config

GOOD = """\
[publish]
connect = "tcp://127.0.0.1:5559"

[defaults]
model = "tsn_mobilenetv2"
smooth = 4

[[camera]]
id = "door"
source = "synthetic:64x48@30"
frame_stride = 2
crop = [0, 0, 32, 32]

[[camera]]
id = "yard"
source = 3
model = "tsm_mobilenetv2_online"
"""


def _write(tmp_path, text):
    path = tmp_path / "site.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_site_config_reads_cameras_defaults_and_publisher(tmp_path):
    site = load_site_config(_write(tmp_path, GOOD))
    door, yard = site.cameras
    assert (door.id, door.source, door.model, door.frame_stride, door.crop) == \
        ("door", "synthetic:64x48@30", "tsn_mobilenetv2", 2, (0, 0, 32, 32))
    assert (yard.source, yard.model) == (3, "tsm_mobilenetv2_online")
    assert door.model_key() != yard.model_key()
    assert site.connect == "tcp://127.0.0.1:5559" and site.publish is None and site.options == {"smooth": 4}


@pytest.mark.parametrize("text,expected", [
    ("[[camera]]\nid = \"a\"\nsource = 0\nfps = 3\n", r"site.toml:4: camera 1: unknown key 'fps'"),
    ("[[camera]]\nid = \"a\"\nsource = 0\n\n[[camera]]\nid = \"b\"\nframe_stride = \"2\"\nsource = 1\n",
     r"site.toml:7: camera 2: frame_stride must be an integer, got '2'"),
    ("[[camera]]\nid = \"a\"\n", r"site.toml:1: camera 1: missing 'source'"),
    ("[[camera]]\nid = \"a b\"\nsource = 0\n", r"site.toml:2: camera id 'a b'"),
    ("[[camera]]\nid = \"a\"\nsource = 0\n[[camera]]\nid = \"a\"\nsource = 1\n", r"site.toml:5: .*used twice"),
    ("[defaults]\nsmooth = 0\n[[camera]]\nid = \"a\"\nsource = 0\n", r"site.toml:2: \[defaults\] smooth must be >= 1"),
    ("[publish]\nendpoint = \"tcp://*:1\"\nconnect = \"tcp://b:2\"\n[[camera]]\nid=\"a\"\nsource=0\n",
     r"site.toml:3: give either"),
    ("camera = 3\n", r"site.toml.*no cameras"),
    ("[[camera]\nid = 1\n", r"site.toml: not valid TOML.*line 1"),
    ("[[camera]]\nid = \"a\"\nsource = 0\ncrop = [1, 2]\n", r"site.toml:4: camera 1: crop must be"),
])
def test_bad_site_config_names_the_line_and_key(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_site_config(_write(tmp_path, text))


def test_run_with_a_config_runs_two_models_side_by_side(tmp_path, capsys):
    path = _write(tmp_path, """\
        [publish]
        endpoint = "none"
        [defaults]
        model = "tsn_mobilenetv2"
        [[camera]]
        id = "a"
        source = "synthetic:64x48@30"
        [[camera]]
        id = "b"
        source = "synthetic:64x48@30"
        [[camera]]
        id = "c"
        source = "synthetic:64x48@30"
        model = "tsm_mobilenetv2_online"
        """)
    assert main(["run", "--config", str(path), "--max-frames", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "a: 3 frames processed" in out and "c: 3 frames processed" in out
    assert "tsn_mobilenetv2 (torch)" in out and "tsm_mobilenetv2_online (torch)" in out


def test_run_with_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    path = _write(tmp_path, "[[camera]]\nid = \"a\"\nsource = 0\nfps = 3\n")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ":4:" in err and "fps" in err


def test_shipped_example_site_config_is_valid():
    from pathlib import Path

    site = load_site_config(Path(__file__).resolve().parents[1] / "deploy" / "site.example.toml")
    assert [c.id for c in site.cameras] == ["demo", "lobby"] and site.metrics_port == 9100
