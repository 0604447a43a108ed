"""Catalog models from the command line: `download` (into the cache, or --to a folder for another machine),
`--offline` wherever it is written, catalog names in a site config, and the note `run` prints when the demo model
meets a camera.

Nothing leaves this machine: files are placed in a temporary STREAMTSM_HOME by hand, or the run is offline.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from streamtsm.cli import main
from streamtsm.hub import catalog
from streamtsm.hub.download import checkpoints_dir
from streamtsm.siteconfig import load_site_config

RUN = [sys.executable, "-m", "streamtsm.cli"]
JESTER = "tsm_mobilenetv2_jester_online"  # no publisher hash: a file placed by hand is taken and its hash recorded


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMTSM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STREAMTSM_OFFLINE", raising=False)
    return tmp_path / "home"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_download_offline_with_nothing_cached_is_one_line_naming_the_url_and_the_cache(home, capsys):
    assert main(["download", JESTER, "--offline"]) == 2
    err = _one_line_error(capsys)
    entry = catalog.get_entry(JESTER)
    assert entry.url in err and str(checkpoints_dir(home) / entry.filename) in err
    assert not any(checkpoints_dir(home).glob("*")) if checkpoints_dir(home).exists() else True


def test_download_of_a_cached_entry_prints_its_path_and_records_its_hash(home, capsys):
    entry = catalog.get_entry(JESTER)
    placed = checkpoints_dir(home) / entry.filename
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"weights placed by hand")
    assert main(["--offline", "download", JESTER]) == 0
    assert str(placed) in capsys.readouterr().out
    recorded = placed.with_name(placed.name + ".sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(b"weights placed by hand").hexdigest()


def test_download_to_a_folder_makes_a_home_another_machine_uses_offline(home, tmp_path, capsys):
    # --to DIR fetches into DIR's checkpoints folder, where a STREAMTSM_HOME copied to another machine is read.
    entry = catalog.get_entry(JESTER)
    site_home = tmp_path / "site_home"
    (site_home / "checkpoints").mkdir(parents=True)
    (site_home / "checkpoints" / entry.filename).write_bytes(b"fetched on the connected machine")
    assert main(["download", JESTER, "--to", str(site_home), "--offline"]) == 0
    out = capsys.readouterr().out
    assert f"STREAMTSM_HOME={site_home}" in out
    assert catalog.is_cached(entry, home=site_home) and not catalog.is_cached(entry, home=home)


def test_download_of_an_unknown_name_is_one_line_with_close_names_before_any_transfer(home, capsys):
    assert main(["download", "streamtsm_demo", "x3d_s_kinetic400"]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "x3d_s_kinetics400" in err
    assert "streamtsm_demo" not in out  # the names are checked before the first one is fetched


def test_offline_flag_after_the_command_is_honoured(home, capsys):
    # Written after the command, as users do: the download is refused without a request.
    assert main(["download", JESTER, "--offline"]) == 2
    assert "offline" in _one_line_error(capsys).lower()


def test_site_config_keeps_a_catalog_name_unless_a_file_of_that_name_is_beside_it(tmp_path):
    config = tmp_path / "site.toml"
    config.write_text(f'[[camera]]\nid = "door"\nsource = "synthetic"\nweights = "{JESTER}"\n'
                      '[[camera]]\nid = "yard"\nsource = "synthetic"\nweights = "mine.pth"\n')
    site = load_site_config(config)
    assert site.cameras[0].weights == JESTER
    assert site.cameras[1].weights == str(tmp_path / "mine.pth")
    (tmp_path / JESTER).write_bytes(b"")  # a file of that very name beside the config wins, as any path would
    assert load_site_config(config).cameras[0].weights == str(tmp_path / JESTER)


@pytest.mark.parametrize("source, noted", [("synthetic:64x48@30", False), ("clip", True)])
def test_run_with_the_demo_model_on_a_camera_names_catalog_models_in_one_line(tmp_path, source, noted):
    if source == "clip":
        import cv2
        import numpy as np

        source = str(tmp_path / "clip.avi")
        writer = cv2.VideoWriter(source, cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 48))
        for i in range(6):
            writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
        writer.release()
    proc = subprocess.run(RUN + ["run", "--source", source, "--max-frames", "2", "--publish", "none", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "knows only the synthetic scene" in line]
    assert len(notes) == (1 if noted else 0)
    if noted:
        assert JESTER in notes[0] and "streamtsm models" in notes[0]
        assert all(name in catalog.names() for name in (JESTER, "x3d_m_kinetics400"))


def test_site_camera_with_a_catalog_name_inherits_no_model_keys_from_defaults(tmp_path):
    # [defaults] names the site's own model; a camera naming a catalog entry gets none of its model, labels.
    (tmp_path / "site.pth").write_bytes(b"")
    (tmp_path / "site.txt").write_text("a\nb\n")
    config = tmp_path / "site.toml"
    config.write_text('[defaults]\nmodel = "tsm_mobilenetv2_online"\nweights = "site.pth"\nlabels = "site.txt"\n'
                      '[[camera]]\nid = "door"\nsource = "synthetic"\n'
                      '[[camera]]\nid = "yard"\nsource = "synthetic"\nweights = "x3d_s_kinetics400"\n')
    door, yard = load_site_config(config).cameras
    assert (door.model, door.labels) == ("tsm_mobilenetv2_online", str(tmp_path / "site.txt"))
    assert (yard.model, yard.weights, yard.labels) == (None, "x3d_s_kinetics400", None)
