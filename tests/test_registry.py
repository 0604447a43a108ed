"""Every registered model builds, runs its forms at a small input, and reports its config."""

import pytest
import torch

from streamtsm.errors import ConfigError
from streamtsm.models import TSM, create, get_spec, list_models


def _clip_for(model) -> torch.Tensor:
    cfg = model.cfg
    frames = cfg.num_segments if isinstance(model, TSM) else min(cfg.clip_len, 4)
    return torch.randn(1, frames, 3, 64, 64)


@pytest.mark.parametrize("name", list_models())
def test_registered_model_classifies_a_clip_with_its_config(name):
    model = create(name, num_classes=5)
    cfg = model.cfg
    assert cfg.name == name and cfg.num_classes == 5 and cfg.kind == get_spec(name).kind
    assert cfg.resize_size >= cfg.input_size >= 112 and len(cfg.mean) == 3 and len(cfg.std) == 3
    assert cfg.clip_len >= 1 and cfg.frame_interval >= 1
    clip = _clip_for(model)
    with torch.no_grad():
        assert model(clip).shape == (1, 5)
        if isinstance(model, TSM):
            assert model(clip, per_frame=True).shape == (1, cfg.num_segments, 5)


@pytest.mark.parametrize("name", list_models(kind="online"))
def test_online_model_steps_one_frame_per_stream(name):
    model = create(name, num_classes=4)
    state = model.init_state(2, 64, 64)
    with torch.no_grad():
        logits, new_state = model.step(torch.randn(2, 3, 64, 64), state)
    assert logits.shape == (2, 4)
    assert [tuple(s.shape) for s in new_state] == [tuple(s.shape) for s in state]


@pytest.mark.parametrize("name", list_models(kind="clip"))
def test_clip_model_has_no_online_form(name):
    with pytest.raises(RuntimeError, match="no online form"):
        create(name, num_classes=3).step(torch.randn(1, 3, 64, 64), None)


def test_list_models_names_the_tsm_and_tsn_configs():
    names = list_models()
    for expected in ("tsm_mobilenetv2_online", "tsm_r50", "tsn_r50", "tsm_r18", "tsm_r34", "tsm_r101"):
        assert expected in names
    assert "tsm_mobilenetv2_online" in list_models(kind="online") and "tsm_r50" in list_models(kind="clip")


def test_shifted_block_counts_follow_the_paper():
    assert len(create("tsm_mobilenetv2_online").shifted_blocks) == 10
    assert len(create("tsm_r50").shifted_blocks) == 16
    # ResNet-101's layer3 has 23 blocks and is shifted every second block: 3 + 4 + 12 + 3.
    assert len(create("tsm_r101").shifted_blocks) == 22
    assert create("tsn_r50").shifted_blocks == []


def test_published_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(create("tsm_r50", num_classes=400)) == 23_508_032 + 2048 * 400 + 400
    assert count(create("tsm_mobilenetv2_online", num_classes=1000)) == 3_504_872


def test_create_applies_overrides_to_architecture_and_config():
    model = create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.5, input_size=112, shift_div=4)
    assert model.cfg.input_size == 112 and model.cfg.arch["width_mult"] == 0.5
    assert model.shifted_blocks[0].shift.fold == model.shifted_blocks[0].in_channels // 4


def test_temporal_pool_halves_frames_after_layer1():
    model = create("tsm_r18", num_classes=3, temporal_pool=True, width=8)
    with torch.no_grad():
        assert model(torch.randn(1, 8, 3, 32, 32), per_frame=True).shape == (1, 4, 3)
    assert not model.online


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown model 'tsm_r77'.*tsm_r50"):
        create("tsm_r77")


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match="wdth"):
        create("tsm_r50", wdth=3)


def test_bad_architecture_value_is_a_config_error():
    with pytest.raises(ConfigError, match="shift_mode"):
        create("tsm_r50", shift_mode="sideways")


@pytest.mark.parametrize("name, overrides, kind", [
    ("tsm_r18", {"shift_mode": "unidirectional"}, "online"),
    ("tsm_r18", {"shift_mode": "none"}, "online"),
    ("tsm_mobilenetv2_online", {"shift_mode": "bidirectional"}, "clip"),
    ("tsm_r18_online", {"temporal_pool": True}, "clip"),
    ("tsm_r18_online", {}, "online"),
])
def test_kind_follows_whether_the_built_network_has_a_step_form(name, overrides, kind):
    model = create(name, num_classes=3, width=8, **overrides) if "r18" in name else create(
        name, num_classes=3, width_mult=0.25, **overrides)
    assert model.cfg.kind == kind and model.online == (kind == "online")
