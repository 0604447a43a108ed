"""`run --config site.toml`: cameras grouped by model, and one clear error naming the key and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import streamtsm.siteconfig
from streamtsm.cli import main
from streamtsm.engine.torch_engine import TorchOnlineEngine
from streamtsm.errors import CheckpointError, ConfigError
from streamtsm.models import create, save_checkpoint
from streamtsm.siteconfig import build_groups, load_site_config

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
    ("[metrics]\nport = 9100\naddr = 127\n[[camera]]\nid = \"a\"\nsource = 0\n",
     r"site.toml:3: metrics.addr must be a string .*got 127"),
    ("[[camera]]\nid = \"a\"\nsource = 0\nbackend = \"tensorflow\"\n",
     r"site.toml:4: camera 1: backend must be one of auto, torch, onnxruntime, triton, got 'tensorflow'"),
    ("[defaults]\nurl = 8001\n[[camera]]\nid = \"a\"\nsource = 0\n", r"site.toml:2: \[defaults\] url must be a string"),
    ("[[camera]]\nid = \"a\"\nsource = 0\ntriton_model = 3\n", r"site.toml:4: camera 1: triton_model must be a string"),
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
    site = load_site_config(Path(__file__).resolve().parents[1] / "deploy" / "site.example.toml")
    assert [c.id for c in site.cameras] == ["demo", "lobby"] and site.metrics_port == 9100
    groups = build_groups(site, threads=1)
    try:  # the example's cameras share one model: one group, one engine built from what the file names
        assert [[s.name for s in g.streams] for g in groups] == [["demo", "lobby"]]
    finally:
        for g in groups:
            g.engine.close()


def _example_in_docstring() -> str:
    doc = streamtsm.siteconfig.__doc__
    block = doc[doc.index("::\n") + 3:]
    lines = block.splitlines()
    end = next(i for i, ln in enumerate(lines) if ln and not ln.startswith(" "))  # the indented block ends
    return textwrap.dedent("\n".join(lines[:end]))


def test_docstring_example_site_config_builds_every_camera_group(tmp_path, monkeypatch):
    # The example's checkpoints, tiny, at the paths it names; built from them, each group must load.
    monkeypatch.chdir(tmp_path)
    site = load_site_config(_write(tmp_path, _example_in_docstring()))
    (tmp_path / "models").mkdir()
    tiny = {"tsm_mobilenetv2_online": dict(width_mult=0.25, input_size=32, resize_size=36),
            "x3d_s": dict(gamma_w=0.5, gamma_d=0.5, head_width=16, input_size=32, resize_size=36)}
    for cam in site.cameras:
        if cam.weights and not Path(cam.weights).exists():
            save_checkpoint(create(cam.model, num_classes=3, **tiny[cam.model]), cam.weights)
    groups = build_groups(site, threads=1)
    try:
        assert [(g.engine.model_name, [s.name for s in g.streams]) for g in groups] == \
            [(c.model, [c.id]) for c in site.cameras]
        assert [g.clip_stride for g in groups] == [c.clip_stride for c in site.cameras]
    finally:
        for g in groups:
            g.engine.close()


def test_site_config_reads_triton_keys_and_groups_cameras_by_them(tmp_path):
    site = load_site_config(_write(tmp_path, """\
        [defaults]
        backend = "triton"
        url = "gpu-host:8001"
        [[camera]]
        id = "a"
        source = 0
        triton_model = "jester"
        [[camera]]
        id = "b"
        source = 1
        triton_model = "jester"
        [[camera]]
        id = "c"
        source = 2
        triton_model = "kinetics"
        """))
    a, b, c = site.cameras
    assert (a.backend, a.url, a.triton_model) == ("triton", "gpu-host:8001", "jester")
    assert a.model_key() == b.model_key() != c.model_key()


def test_site_config_passes_the_backend_url_and_triton_model_to_the_engine(tmp_path, monkeypatch):
    import streamtsm.engine.factory as factory

    calls = []

    def fake_build_engine(**kwargs):
        calls.append(kwargs)
        return TorchOnlineEngine(create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.25, input_size=32,
                                        resize_size=36))

    monkeypatch.setattr(factory, "build_engine", fake_build_engine)
    site = load_site_config(_write(tmp_path, """\
        [[camera]]
        id = "a"
        source = 0
        backend = "triton"
        url = "gpu-host:8001"
        triton_model = "jester"
        [[camera]]
        id = "b"
        source = 1
        """))
    groups = build_groups(site)
    assert len(groups) == 2
    assert [(k["backend"], k["url"], k["triton_model"]) for k in calls] == \
        [(c.backend, c.url, c.triton_model) for c in site.cameras]


def _camera_line(path: Path, camera_id: str) -> int:
    lines = path.read_text().splitlines()
    at = lines.index(f'id = "{camera_id}"')
    return max(i for i in range(at) if lines[i].strip() == "[[camera]]") + 1


@pytest.mark.parametrize("camera,error,message", [
    ('model = "tsn_mobilenetv2"\nweights = "WEIGHTS"', ConfigError, "does not match the checkpoint"),
    ('weights = "missing.pth"', CheckpointError, "checkpoint not found"),
    ('backend = "triton"\nurl = "127.0.0.1:1"', ConfigError, "needs --url HOST:PORT"),
])
def test_engine_errors_of_a_camera_name_the_file_line_and_camera(tmp_path, monkeypatch, camera, error, message):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "online.pth"
    save_checkpoint(create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.25), weights)
    path = _write(tmp_path, f'[[camera]]\nid = "ok"\nsource = 0\n\n[[camera]]\nid = "door"\nsource = 1\n'
                            f'{camera.replace("WEIGHTS", str(weights))}\n')
    with pytest.raises(error) as exc:
        build_groups(load_site_config(path), threads=1)
    text = str(exc.value)
    assert type(exc.value) is error and text.startswith(f"{path}:{_camera_line(path, 'door')}: camera 'door': ")
    assert message in text


def test_relative_paths_in_a_site_config_are_read_from_its_folder(tmp_path, monkeypatch):
    site_dir = tmp_path / "site"
    (site_dir / "clips").mkdir(parents=True)
    (site_dir / "clips" / "door.mp4").write_bytes(b"")
    (site_dir / "site.toml").write_text(textwrap.dedent("""\
        [defaults]
        weights = "models/site.pth"
        labels = "labels.txt"

        [[camera]]
        id = "door"
        source = "clips/door.mp4"

        [[camera]]
        id = "lobby"
        source = "rtsp://10.0.0.5/live"
        weights = "/abs/site.pth"

        [[camera]]
        id = "gone"
        source = "missing.mp4"
        """))
    monkeypatch.chdir(tmp_path)  # elsewhere than the config: the paths must not depend on where run starts
    door, lobby, gone = load_site_config("site/site.toml").cameras
    assert Path(door.source) == site_dir / "clips" / "door.mp4"
    assert Path(door.weights) == site_dir / "models" / "site.pth" and Path(door.labels) == site_dir / "labels.txt"
    assert lobby.source == "rtsp://10.0.0.5/live" and lobby.weights == "/abs/site.pth"
    assert gone.source == "missing.mp4", "a source not found beside the config is left for the capture to report"


def test_a_camera_with_another_model_inherits_none_of_the_default_models_keys(tmp_path):
    site = load_site_config(_write(tmp_path, """\
        [defaults]
        model = "tsm_mobilenetv2_online"
        weights = "/models/site.pth"
        labels = "/models/site.txt"
        frame_stride = 2

        [[camera]]
        id = "same"
        source = 0

        [[camera]]
        id = "reweighted"
        source = 1
        weights = "/models/door.pth"

        [[camera]]
        id = "other"
        source = 2
        model = "x3d_s"

        [[camera]]
        id = "served"
        source = 3
        backend = "triton"
        url = "gpu-host:8001"
        triton_model = "jester"
        """))
    same, reweighted, other, served = site.cameras
    assert (same.model, same.weights, same.labels) == ("tsm_mobilenetv2_online", "/models/site.pth",
                                                       "/models/site.txt")
    assert (reweighted.model, reweighted.weights, reweighted.labels) == ("tsm_mobilenetv2_online",
                                                                         "/models/door.pth", "/models/site.txt")
    assert (other.model, other.weights, other.labels) == ("x3d_s", None, None)
    assert (served.model, served.weights, served.triton_model) == (None, None, "jester")
    assert {c.frame_stride for c in site.cameras} == {2}, "keys that are not the model's are still inherited"


def test_load_site_config_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "site.toml"
    path.write_bytes(b"\xef\xbb\xbf" + '[[camera]]\nid = "door"\nsource = "synthetic"\n'.encode())
    assert [cam.id for cam in load_site_config(path).cameras] == ["door"]


def test_load_site_config_names_the_line_of_a_byte_that_is_not_utf8(tmp_path):
    path = tmp_path / "site.toml"
    path.write_bytes('[[camera]]\nid = "door"\n# caméra\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"site.toml:3: not UTF-8 text \(byte 0xe9"):
        load_site_config(path)


def _many_cameras(count: int) -> str:
    head = '[publish]\nendpoint = "tcp://*:5556"\n[defaults]\nsmooth = 4\n'
    return head + "".join(f'\n[[camera]]\nid = "cam{i}"\nsource = "synthetic"\nframe_stride = 2\n'
                          for i in range(count))


def test_load_site_config_of_10000_cameras_indexes_the_text_once(tmp_path, monkeypatch):
    scans = []
    original = streamtsm.siteconfig.index_lines

    def counting(lines):
        scans.append(len(lines))
        return original(lines)

    monkeypatch.setattr(streamtsm.siteconfig, "index_lines", counting)
    path = tmp_path / "site.toml"
    path.write_text(_many_cameras(10_000))
    site = load_site_config(path)
    assert len(site.cameras) == 10_000 and site.cameras[-1].id == "cam9999"
    assert site.cameras[9999].line == 4 + 5 * 9999 + 2  # the header of the last camera, from the one index
    assert len(scans) == 1


def test_index_lines_finds_camera_headers_tables_and_keys():
    lines = ['top = 1', '[metrics]', 'port = 1', '[[camera]]', 'id = "a"', ' [[ camera ]]', 'source = 0',
             'id = "b"', 'id = "c"', '[defaults]', 'x = 1']
    cameras, tables, keys = streamtsm.siteconfig.index_lines(lines)
    assert cameras == [3, 5] and tables == {"metrics": 1, "defaults": 9}
    assert keys == {-1: {"top": 0}, 1: {"port": 2}, 3: {"id": 4}, 5: {"source": 6, "id": 7}, 9: {"x": 10}}


def test_load_site_config_errors_point_at_the_line_of_the_key(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text('[metrics]\nport = 1\n[[camera]]\nid = "b"\nsource = 0\n[[camera]]\nsource = 0\nid = "b"\n')
    with pytest.raises(ConfigError, match=r"site.toml:8: camera id 'b' is used twice"):
        load_site_config(path)
    path.write_text('[metrics]\nport = 0\n[[camera]]\nid = "b"\nsource = 0\n')
    with pytest.raises(ConfigError, match=r"site.toml:2: metrics.port must be >= 1"):
        load_site_config(path)
    path.write_text('[[camera]]\nid = "a"\nsource = 0\n\n[[camera]]\nid = "b"\n')
    with pytest.raises(ConfigError, match=r"site.toml:5: camera 2: missing 'source'"):
        load_site_config(path)
