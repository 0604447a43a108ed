"""The catalog of published checkpoints: every entry loads strictly from its publisher's layout into its network with
the publisher's settings and class names, the data is well-formed, and names resolve as the loader promises.

Nothing downloads: each file is built here in its publisher's key layout and placed in a temporary STREAMTSM_HOME's
checkpoints folder, with STREAMTSM_OFFLINE=1.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from streamtsm.cli import main
from streamtsm.errors import CheckpointError, ConfigError, StreamTSMError
from streamtsm.hub import catalog
from streamtsm.labels import read_labels
from streamtsm.models import create, list_models, load, save_checkpoint

from .layouts import (to_mit_han_lab, to_mit_han_lab_nl, to_mmaction2, to_mmaction2_tin, to_plain, to_pytorchvideo,
                      to_torchvision_mobilenetv2)

ENTRIES = catalog.entries()
LAYOUTS = ("plain", "mit-han-lab", "mmaction2", "pytorchvideo", "uniformer", "streamtsm")

# (layout, arch) -> the checkpoint as its publisher's file holds it, built from a model of that architecture.
PUBLISHED = {
    ("plain", "tsm_mobilenetv2_online"): lambda m: to_plain(m, "classifier"),  # online demo: classifier = Linear
    ("plain", "tsm_mobilenetv2"): to_torchvision_mobilenetv2,
    **{("plain", f"tsm_r{d}"): (lambda m: to_plain(m, "fc")) for d in (18, 34, 50, 101)},
    ("mit-han-lab", "tsm_r50"): to_mit_han_lab,
    ("mit-han-lab", "tsm_r50_nl"): to_mit_han_lab_nl,
    ("mmaction2", "tsm_r50"): to_mmaction2,
    ("mmaction2", "tin_r50"): to_mmaction2_tin,
    **{("pytorchvideo", f"x3d_{s}"): (lambda m: {"model_state": to_pytorchvideo(m)}) for s in ("xs", "s", "m", "l")},
    **{("uniformer", f"uniformer_{s}"): (lambda m: dict(m.state_dict())) for s in ("s", "b")},  # a bare OrderedDict
}
# Tensors a layout does not hold, which the converter makes up (pytorchvideo's X3D has no layer1.0 shortcut BN).
MADE_UP = {"pytorchvideo": "backbone.layer1.0.downsample.1."}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty cache, offline: a test that would download fails instead."""
    monkeypatch.setenv("STREAMTSM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STREAMTSM_OFFLINE", "1")
    (tmp_path / "home" / "checkpoints").mkdir(parents=True)
    return tmp_path / "home"


def _place(home, entry: catalog.Entry, checkpoint: dict) -> None:
    torch.save(checkpoint, home / "checkpoints" / entry.filename)


def _unhashed(entry: catalog.Entry) -> catalog.Entry | str:
    """What to load: the entry's name, or, where the publisher gives a hash (which a file built here cannot have),
    the entry without it, so the file placed by hand is taken as it is."""
    return entry.name if entry.sha256 is None else dataclasses.replace(entry, sha256=None)


def _built(entry: catalog.Entry, **kw):
    return create(entry.arch, num_classes=entry.num_classes, **{**entry.overrides, **kw})


# -- every entry ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_catalog_entry_loads_strictly_from_its_publishers_layout(home, entry):
    if entry.packaged:
        net = load(entry.name)  # the file ships in the package: nothing to place
        source = None
    else:
        assert (entry.layout, entry.arch) in PUBLISHED, f"no {entry.layout} layout builder for {entry.arch}"
        source = _built(entry)
        _place(home, entry, PUBLISHED[entry.layout, entry.arch](source))
        net = load(_unhashed(entry))
    cfg = net.cfg
    assert (cfg.name, cfg.num_classes) == (entry.arch, entry.num_classes)
    assert cfg.labels == catalog.label_names(entry)
    for key, value in entry.overrides.items():
        assert getattr(cfg, key, cfg.arch.get(key)) == value, key
    if source is not None:  # every tensor of the publisher's file landed where it belongs
        made_up = MADE_UP.get(entry.layout, "\0")
        loaded = net.state_dict()
        for key, value in source.state_dict().items():
            if not key.startswith(made_up) and not key.endswith("num_batches_tracked"):
                assert torch.allclose(loaded[key], value, atol=1e-6), key


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_catalog_entry_labels_are_its_class_count_of_unique_names(entry):
    names = catalog.label_names(entry)
    assert len(names) == entry.num_classes == len(set(names))
    if entry.labels:
        assert read_labels(catalog.label_path(entry)) == names


# -- the data -------------------------------------------------------------------------------------------------------


def test_catalog_data_is_well_formed():
    registered = set(list_models())
    assert [e.name for e in ENTRIES] == catalog.names() and len(set(catalog.names())) == len(ENTRIES)
    for e in ENTRIES:
        where = f"catalog entry {e.name}"
        assert re.fullmatch(r"[a-z0-9_]+", e.name), where
        assert e.name not in registered, f"{where}: an entry's name must not be an architecture's"
        assert e.arch in registered, where
        assert e.layout in LAYOUTS, where
        assert all(getattr(e, f).strip() for f in ("dataset", "license", "accuracy", "source", "description")), where
        assert e.filename and "/" not in e.filename, where
        assert e.num_classes >= 1, where
        if e.packaged:
            assert catalog.local_path(e).is_file(), where
        else:
            assert e.url.startswith("https://") and e.url.rsplit("/", 1)[1] == e.filename, where
        if e.sha256 is not None:
            assert re.fullmatch(r"[0-9a-f]{8,64}", e.sha256), where
            assert len(e.sha256) == 64 or e.sha256 in e.filename, f"{where}: a hash prefix comes from the file name"
        assert e.size is None or e.size > 0, where
        assert e.labels is not None or e.layout == "streamtsm", f"{where}: only our checkpoints name their classes"
        assert e.backbone == (e.dataset == "ImageNet-1K"), where


def test_every_label_file_belongs_to_an_entry():
    used = {e.labels for e in ENTRIES if e.labels}
    assert used == {p.name for p in catalog.LABELS_DIR.glob("*.txt")}


def test_imagenet_labels_are_the_wordnet_ids_in_class_index_order():
    wnids = catalog.label_names("resnet50_imagenet")
    # torchvision's class index is the sorted order of the 1000 ILSVRC-2012 synsets: n01440764 (tench) ... .
    assert wnids == sorted(wnids) and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert (wnids[0], wnids[1], wnids[-1]) == ("n01440764", "n01443537", "n15075141")


def test_uniformer_order_is_its_publishers_not_alphabetical():
    uniformer = catalog.label_names("uniformer_s_kinetics400")
    alphabetical = catalog.label_names("x3d_s_kinetics400")
    assert sorted(uniformer) == alphabetical
    assert (uniformer[0], uniformer[341], uniformer[399]) == ("riding a bike", "abseiling", "playing badminton")


# The shared label maps are mmaction2's orders (and the online demo's for Jester). They agree with the shipped files
# where the publishers' orders agree: Kinetics-400 (mmaction2, pytorchvideo, mit-han-lab: alphabetical), SSv2
# (labels.json index order = mmaction2's), Jester (the online demo's). UniFormer's Kinetics order does not.
SHARED_ORDERS = [("kinetics400.txt", "kinetics_label_map_k400.txt"), ("sthv2.txt", "sthv2_label_map.txt"),
                 ("jester_tsm_online.txt", "jester_tsm_online_order.txt")]


@pytest.mark.parametrize("shipped,shared", SHARED_ORDERS, ids=[s for s, _ in SHARED_ORDERS])
def test_shipped_labels_agree_with_the_shared_label_maps(shared_data, shipped, shared):
    assert read_labels(catalog.LABELS_DIR / shipped) == read_labels(shared_data / "labels" / shared)


# -- name resolution ------------------------------------------------------------------------------------------------


def test_unknown_name_is_one_error_naming_close_entries(home):
    with pytest.raises(CheckpointError, match=r"checkpoint not found: x3d_s_kinetics is no file.*x3d_s_kinetics400"):
        load("x3d_s_kinetics")
    with pytest.raises(ConfigError, match=r"unknown catalog entry 'jester'; did you mean tsm_mobilenetv2_jester"):
        catalog.get_entry("jester")


def test_existing_path_named_like_an_entry_is_a_path(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_checkpoint(create("tsm_r18_online", num_classes=3, width=8), tmp_path / "tsm_r50_kinetics400")
    net = load("tsm_r50_kinetics400")  # offline and nothing cached: a fetch would fail
    assert (net.cfg.name, net.cfg.num_classes) == ("tsm_r18_online", 3)


def test_missing_entry_file_offline_names_the_url_and_the_cache(home):
    entry = catalog.get_entry("x3d_xs_kinetics400")
    with pytest.raises(StreamTSMError) as err:
        load(entry.name)
    assert type(err.value).__name__ == "DownloadError"
    assert entry.url in str(err.value) and str(home / "checkpoints" / entry.filename) in str(err.value)


def test_cached_file_that_does_not_match_the_publishers_hash_is_refused(home):
    entry = catalog.get_entry("tsm_r50_kinetics400_mmaction2")
    (home / "checkpoints" / entry.filename).write_bytes(b"not the published file")
    with pytest.raises(StreamTSMError, match="sha256"):
        load(entry.name)


def test_entry_into_another_architecture_needs_a_backbone_entry_or_allow_shift_mismatch(home):
    with pytest.raises(ConfigError, match="holds tsm_mobilenetv2_online.*--allow-shift-mismatch"):
        load("tsm_mobilenetv2_jester_online", model="tsm_mobilenetv2")
    with pytest.raises(ConfigError, match="has 27 classes; pass reset_head=True"):
        load("tsm_mobilenetv2_jester_online", num_classes=5)


def test_backbone_entry_starts_another_architecture_with_a_fresh_head(home, tmp_path):
    entry = catalog.get_entry("resnet18_imagenet")
    source = _built(entry)
    _place(home, entry, to_plain(source, "fc"))
    labels = tmp_path / "classes.txt"
    labels.write_text("open\nclose\nwave\n")
    net = load(_unhashed(entry), model="tsm_r18_online", reset_head=True, labels_file=labels)
    assert (net.cfg.name, net.cfg.kind, net.cfg.num_classes) == ("tsm_r18_online", "online", 3)
    assert net.cfg.labels == ["open", "close", "wave"] and net.cfg.input_size == 224
    assert torch.equal(net.state_dict()["backbone.layer4.1.conv2.weight"],
                       source.state_dict()["backbone.layer4.1.conv2.weight"])


def test_entry_settings_give_way_to_explicit_ones(home, tmp_path):
    entry = catalog.get_entry("tsm_mobilenetv2_jester_online")
    _place(home, entry, to_plain(_built(entry), "classifier"))
    names = [f"gesture {i}" for i in range(27)]
    (tmp_path / "mine.txt").write_text("\n".join(names))
    net = load(entry.name, labels_file=tmp_path / "mine.txt", frame_interval=1)
    assert net.cfg.labels == names and net.cfg.frame_interval == 1


def test_models_command_lists_the_catalog_beside_the_architectures(home, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tsm_mobilenetv2_online" in out and "published accuracy" in out
    for entry in ENTRIES:
        row = next(line for line in out.splitlines() if line.startswith(entry.name + " "))
        assert entry.arch in row and entry.accuracy in row
        assert ("packaged" if entry.packaged else " no ") in row


def test_create_with_pretrained_is_load_through_the_catalog():
    # The packaged demo entry: no download. create(name, pretrained=...) is load(pretrained, model=name).
    built = create("tsm_r18_online", pretrained="streamtsm_demo")
    loaded = load("streamtsm_demo")
    assert built.cfg == loaded.cfg
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(StreamTSMError, match="tsm_mobilenetv2_online"):
        create("tsm_mobilenetv2_online", pretrained="streamtsm_demo")  # another architecture than the entry's


def test_models_page_is_what_the_catalog_gives():
    # docs/models.md is written from the catalog; a catalog change without re-running the tool fails here.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "tools/make_models_doc.py", "--check"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
