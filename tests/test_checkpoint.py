"""Checkpoint loading: every public key layout round-trips to identical outputs, and bad files fail clearly."""

from __future__ import annotations

import pytest
import torch

from streamtsm.errors import CheckpointError, ConfigError
from streamtsm.models import create, load, load_checkpoint, read_checkpoint, save_checkpoint

from .conftest import randomize_
from .layouts import to_mit_han_lab, to_mmaction2, to_plain

SMALL = {"tsm_mobilenetv2_online": {"width_mult": 0.25}, "tsm_mobilenetv2": {"width_mult": 0.25},
         "tsm_r18": {"width": 8}, "tsm_r50": {"width": 8}, "tsn_r50": {"width": 8}}


def _model(name: str, seed: int = 0, **kw):
    model = create(name, num_classes=6, **{**SMALL[name], **kw})
    calibration = torch.randn(model.num_segments * 2, 3, 32, 32)
    return randomize_(model, seed=seed, calibration=calibration)


def _outputs(model) -> torch.Tensor:
    clip = torch.randn(2, model.num_segments, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(clip, per_frame=True)


LAYOUTS = [
    ("tsm_mobilenetv2_online", "plain", lambda m: to_plain(m, "classifier")),
    ("tsn_r50", "plain", lambda m: to_plain(m, "fc")),
    ("tsm_mobilenetv2", "plain", lambda m: to_plain(m, "classifier.1")),
    ("tsm_mobilenetv2", "mit-han-lab", to_mit_han_lab),
    ("tsm_r18", "mit-han-lab", to_mit_han_lab),
    ("tsm_r50", "mit-han-lab", to_mit_han_lab),
    ("tsm_mobilenetv2", "mmaction2", to_mmaction2),
    ("tsm_r18", "mmaction2", to_mmaction2),
    ("tsm_r50", "mmaction2", to_mmaction2),
    ("tsn_r50", "mmaction2", to_mmaction2),
]


@pytest.mark.parametrize("name,fmt,convert", LAYOUTS, ids=[f"{n}-{f}" for n, f, _ in LAYOUTS])
def test_foreign_layout_loads_to_identical_outputs(tmp_path, name, fmt, convert):
    source = _model(name, seed=1)
    path = tmp_path / "foreign.pth"
    torch.save(convert(source), path)
    target = create(name, num_classes=6, **SMALL[name])
    info = load_checkpoint(target, path)
    assert info["format"] == fmt
    assert torch.equal(_outputs(target), _outputs(source))


def test_mit_han_lab_temporal_pool_layout_loads(tmp_path):
    source = _model("tsm_r18", seed=2, temporal_pool=True)
    target = create("tsm_r18", num_classes=6, temporal_pool=True, width=8)
    load_checkpoint(target, to_mit_han_lab(source))
    assert torch.equal(_outputs(target), _outputs(source))


def test_own_format_round_trips_weights_config_and_labels(tmp_path):
    source = _model("tsm_mobilenetv2_online", seed=3)
    labels = [f"class {i}" for i in range(6)]
    save_checkpoint(source, tmp_path / "m.pth", labels=labels)
    rebuilt = load(tmp_path / "m.pth")
    assert rebuilt.cfg.labels == labels and rebuilt.cfg.arch == source.cfg.arch
    assert rebuilt.cfg.name == "tsm_mobilenetv2_online" and rebuilt.cfg.num_classes == 6
    assert torch.equal(_outputs(rebuilt), _outputs(source))
    info = load_checkpoint(create("tsm_mobilenetv2_online", num_classes=6, width_mult=0.25), tmp_path / "m.pth")
    assert info["format"] == "streamtsm" and info["labels"] == labels


class NotAWeight:
    pass


def test_checkpoint_file_is_read_with_weights_only(tmp_path):
    torch.save({"state_dict": {}, "payload": NotAWeight()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_checkpoint(tmp_path / "evil.pth")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(_model("tsm_r18"), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.pth")


def test_non_checkpoint_file_is_a_clear_error(tmp_path):
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "notes.pth")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")


def test_strict_loading_lists_missing_unexpected_and_misshapen_keys():
    state = to_mmaction2(_model("tsm_r18"))["state_dict"]
    del state["backbone.layer4.1.conv2.conv.weight"]
    state["backbone.layer9.0.conv1.conv.weight"] = torch.zeros(1)
    state["cls_head.fc_cls.bias"] = torch.zeros(9)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(create("tsm_r18", num_classes=6, width=8), {"state_dict": state})
    msg = str(err.value)
    assert "detected format: mmaction2" in msg and "tsm_r18" in msg
    assert "missing keys: backbone.layer4.1.conv2.weight" in msg
    assert "unexpected keys: backbone.layer9.0.conv1.weight" in msg
    assert "fc.bias checkpoint (9,) vs model (6,)" in msg


def test_other_class_count_needs_reset_head_and_keeps_the_backbone():
    source = _model("tsm_r18", seed=4)
    target = create("tsm_r18", num_classes=11, width=8)
    with pytest.raises(CheckpointError, match="reset_head"):
        load_checkpoint(target, to_mmaction2(source))
    fresh_head = target.fc.weight.clone()
    load_checkpoint(target, to_mmaction2(source), reset_head=True)
    assert torch.equal(target.fc.weight, fresh_head)
    assert torch.equal(target.backbone.layer1[0].conv1.weight, source.backbone.layer1[0].conv1.weight)


def test_bidirectional_checkpoint_into_online_model_needs_explicit_flag(tmp_path):
    offline = _model("tsm_mobilenetv2", seed=5)
    save_checkpoint(offline, tmp_path / "bi.pth")
    online = create("tsm_mobilenetv2_online", num_classes=6, width_mult=0.25)
    with pytest.raises(CheckpointError, match="bidirectional shift.*unidirectional"):
        load_checkpoint(online, tmp_path / "bi.pth")
    with pytest.raises(CheckpointError, match="bidirectional"):
        load_checkpoint(online, to_mit_han_lab(offline))
    load_checkpoint(online, tmp_path / "bi.pth", allow_shift_mismatch=True)
    assert torch.equal(online.fc.weight, offline.fc.weight)


def test_checkpoint_of_another_architecture_is_rejected():
    with pytest.raises(CheckpointError, match="does not fit tsm_r18"):
        load_checkpoint(create("tsm_r18", num_classes=6, width=8), to_mmaction2(_model("tsm_r50")))


def test_pytorchvideo_layout_is_named_when_a_tsm_cannot_load_it():
    with pytest.raises(CheckpointError, match="'pytorchvideo'"):
        load_checkpoint(create("tsm_r18", num_classes=6, width=8), {"blocks.0.conv.weight": torch.zeros(1)})


# -- the one loader: streamtsm.models.load --------------------------------------------------------------------


def test_load_rebuilds_a_streamtsm_checkpoint_without_a_model_name_or_architecture(tmp_path):
    source = _model("tsm_r18", seed=6, shift_div=2, num_segments=4)
    save_checkpoint(source, tmp_path / "m.pth", labels=list("abcdef"))
    rebuilt = load(tmp_path / "m.pth")
    assert rebuilt.cfg.arch == source.cfg.arch and rebuilt.cfg.labels == list("abcdef") and not rebuilt.training
    assert torch.equal(_outputs(rebuilt), _outputs(source))
    # An already read checkpoint loads alike, and the same name or the same architecture values are no contradiction.
    again = load(read_checkpoint(tmp_path / "m.pth"), model="tsm_r18", width=8, shift_div=2)
    assert torch.equal(_outputs(again), _outputs(source))


def test_load_model_name_contradicting_the_checkpoint_is_an_error_naming_both(tmp_path):
    save_checkpoint(_model("tsm_r18"), tmp_path / "m.pth")
    with pytest.raises(ConfigError, match="--model tsm_r50 does not match the checkpoint .*m.pth, which holds tsm_r18; leave --model out$"):
        load(tmp_path / "m.pth", model="tsm_r50")


def test_load_architecture_override_contradicting_the_checkpoint_is_an_error(tmp_path):
    save_checkpoint(_model("tsm_r18"), tmp_path / "m.pth")
    with pytest.raises(ConfigError, match=r"width=16 \(the checkpoint has 8\) contradicts the architecture of tsm_r18"):
        load(tmp_path / "m.pth", width=16)
    # How the model is fed, and the segment count TSM's parameter-free shift does not depend on, may change.
    model = load(tmp_path / "m.pth", input_size=64, resize_size=73, num_segments=4)
    assert (model.cfg.input_size, model.num_segments) == (64, 4)


def test_load_other_class_count_needs_reset_head_and_keeps_the_backbone(tmp_path):
    source = _model("tsm_r18", seed=7)
    save_checkpoint(source, tmp_path / "m.pth", labels=list("abcdef"))
    with pytest.raises(ConfigError, match="3 classes asked for but .*m.pth has 6 classes; pass reset_head"):
        load(tmp_path / "m.pth", num_classes=3)
    tuned = load(tmp_path / "m.pth", num_classes=3, reset_head=True)
    assert tuned.cfg.num_classes == 3 and tuned.cfg.labels is None, "the saved names are for the old classes"
    assert torch.equal(tuned.backbone.layer1[0].conv1.weight, source.backbone.layer1[0].conv1.weight)


def test_load_foreign_checkpoint_without_a_model_name_is_an_error(tmp_path):
    torch.save(to_mmaction2(_model("tsm_r18")), tmp_path / "foreign.pth")
    with pytest.raises(ConfigError, match="foreign.pth is not a streamtsm checkpoint.*--model"):
        load(tmp_path / "foreign.pth")
    model = load(tmp_path / "foreign.pth", model="tsm_r18", num_classes=6, width=8)
    assert model.cfg.name == "tsm_r18" and model.cfg.labels is None


def test_load_labels_file_names_the_classes_and_must_match_their_count(tmp_path):
    save_checkpoint(_model("tsm_r18"), tmp_path / "m.pth", labels=list("abcdef"))
    (tmp_path / "six.txt").write_text("".join(f"class {i}\n" for i in range(6)))
    (tmp_path / "two.txt").write_text("left\nright\n")
    assert load(tmp_path / "m.pth", labels_file=tmp_path / "six.txt").cfg.labels[5] == "class 5"
    with pytest.raises(ConfigError, match="two.txt has 2 classes but the model has 6 classes"):
        load(tmp_path / "m.pth", labels_file=tmp_path / "two.txt")
    # Without weights, or with reset_head, the label file sizes the classifier.
    assert load(model="tsm_r18", width=8, labels_file=tmp_path / "two.txt").cfg.num_classes == 2
    tuned = load(tmp_path / "m.pth", reset_head=True, labels_file=tmp_path / "two.txt")
    assert tuned.cfg.num_classes == 2 and tuned.cfg.labels == ["left", "right"]


def test_load_without_weights_or_model_is_an_error():
    with pytest.raises(ConfigError, match="give --model NAME, --weights CHECKPOINT, or both"):
        load()


def test_load_streamtsm_checkpoint_into_another_model_only_with_allow_shift_mismatch(tmp_path):
    offline = _model("tsm_mobilenetv2", seed=8)
    save_checkpoint(offline, tmp_path / "bi.pth")
    with pytest.raises(ConfigError, match="does not match the checkpoint .* pass --allow-shift-mismatch"):
        load(tmp_path / "bi.pth", model="tsm_mobilenetv2_online")
    online = load(tmp_path / "bi.pth", model="tsm_mobilenetv2_online", num_classes=6, width_mult=0.25,
                  allow_shift_mismatch=True)
    assert online.cfg.name == "tsm_mobilenetv2_online" and torch.equal(online.fc.weight, offline.fc.weight)


def _with_config(**changes):
    def change(config):
        for key, value in changes.items():
            if value is _DROP:
                config.pop(key)
            else:
                config[key] = value
    return change


_DROP = object()

IMPLAUSIBLE = [
    ("num_classes", _with_config(num_classes=0), "num_classes = 0, expected an integer from 1"),
    ("num_classes", _with_config(num_classes=-3), "num_classes = -3"),
    ("num_classes", _with_config(num_classes=10**9), "num_classes = 1000000000, expected an integer from 1 to 100000"),
    ("num_classes", _with_config(num_classes=2.5), "num_classes = 2.5"),
    ("num_classes", _with_config(num_classes=_DROP), "records no num_classes"),
    ("input_size", _with_config(input_size=0), "input_size = 0"),
    ("input_size", _with_config(input_size=-32), "input_size = -32"),
    ("input_size", _with_config(input_size=100_000), "input_size = 100000, expected an integer from 1 to 4096"),
    ("input_size", _with_config(input_size="32"), "input_size = '32'"),
    ("mean", _with_config(mean=[0.5, 0.5]), "mean = [0.5, 0.5], expected 3 finite numbers"),
    ("mean", _with_config(mean=[0.5, float("nan"), 0.5]), "mean = [0.5, nan, 0.5]"),
    ("std", _with_config(std=[0.2, 0.2, 0.2, 0.2]), "std = [0.2, 0.2, 0.2, 0.2]"),
    ("std", _with_config(std=[0.2, 0.0, 0.2]), "std = [0.2, 0.0, 0.2], expected 3 finite numbers above 0"),
    ("std", _with_config(std=None), "std = None"),
    ("clip_len", _with_config(clip_len=0), "clip_len = 0, expected an integer from 1"),
    ("frame_interval", _with_config(frame_interval=0), "frame_interval = 0"),
    ("frame_interval", _with_config(frame_interval=-1), "frame_interval = -1"),
    ("num_segments", _with_config(num_segments=0), "num_segments = 0"),
    ("name", _with_config(name="tsm_r999"), "name = 'tsm_r999', expected a registered model name"),
    ("name", _with_config(name=_DROP), "records no name"),
    ("kind", _with_config(kind="batch"), "kind = 'batch', expected one of online, clip"),
    ("labels", _with_config(labels="abc"), "labels = 'abc'"),
    ("arch", _with_config(arch=[1, 2]), "arch = [1, 2]"),
]


@pytest.mark.parametrize(("field", "change", "match"), IMPLAUSIBLE, ids=[f"{f}-{m}" for f, _, m in IMPLAUSIBLE])
def test_checkpoint_with_implausible_recorded_config_is_one_error_naming_the_field(tmp_path, field, change, match):
    save_checkpoint(_model("tsm_r18", num_segments=4), tmp_path / "m.pth", labels=list("abcdef"))
    checkpoint = read_checkpoint(tmp_path / "m.pth")
    change(checkpoint["config"])
    torch.save(checkpoint, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="^checkpoint .*bad.pth ") as info:
        load(tmp_path / "bad.pth")
    assert match in str(info.value) and field in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("config", [None, [1, 2], "tsm_r18"])
def test_checkpoint_without_a_config_table_is_one_error(tmp_path, config):
    save_checkpoint(_model("tsm_r18", num_segments=4), tmp_path / "m.pth")
    checkpoint = read_checkpoint(tmp_path / "m.pth")
    checkpoint["config"] = config
    with pytest.raises(CheckpointError, match="records no config table"):
        load(checkpoint)


def test_checkpoint_plausible_config_loads_as_before(tmp_path):
    save_checkpoint(_model("tsm_r18", num_segments=4), tmp_path / "m.pth")
    assert load(tmp_path / "m.pth").cfg.name == "tsm_r18"
