"""X3D: published sizes, clip shapes, mmaction2 and pytorchvideo checkpoints, ONNX export."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from streamtsm.errors import CheckpointError
from streamtsm.models import create, load_checkpoint
from streamtsm.models import x3d  # noqa: F401  (registers the X3D configurations)

from .conftest import randomize_
from .layouts import to_mmaction2_x3d as to_mmaction2, to_pytorchvideo

NAMES = ("x3d_xs", "x3d_s", "x3d_m", "x3d_l")
# pytorchvideo docs/source/model_zoo.md (Kinetics-400, 400 classes): XS/S/M 3.79M, L 6.15M parameters.
PUBLISHED_PARAMS = {"x3d_xs": 3.79e6, "x3d_s": 3.79e6, "x3d_m": 3.79e6, "x3d_l": 6.15e6}
CLIP = (4, 3, 48, 48)


def _model(seed: int = 0, num_classes: int = 6):
    model = create("x3d_xs", num_classes=num_classes)
    calibration = torch.randn(2, *CLIP, generator=torch.Generator().manual_seed(seed + 100))
    return randomize_(model, seed=seed, calibration=calibration)


def _outputs(model, clip: torch.Tensor | None = None) -> torch.Tensor:
    if clip is None:
        clip = torch.randn(2, *CLIP, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(clip)


@pytest.mark.parametrize("name", NAMES)
def test_x3d_config_classifies_its_published_clip_size(name):
    with torch.device("meta"):  # shapes and counts only: no memory, no compute
        model = create(name)
        cfg = model.cfg
        clip = torch.empty(2, cfg.clip_len, 3, cfg.input_size, cfg.input_size)
        features = model.backbone(clip.permute(0, 2, 1, 3, 4))
        logits = model(clip)
    side = cfg.input_size // 32 + (cfg.input_size % 32 > 0)
    assert tuple(features.shape) == (2, 432, cfg.clip_len, side, side)
    assert tuple(logits.shape) == (2, 400)
    assert cfg.kind == "clip" and cfg.mean == (0.45, 0.45, 0.45) and cfg.std == (0.225, 0.225, 0.225)


def test_x3d_clip_settings_follow_the_paper():
    xs, large = create("x3d_xs", num_classes=2).cfg, create("x3d_l", num_classes=2).cfg
    assert (xs.clip_len, xs.frame_interval, xs.input_size, xs.resize_size) == (4, 12, 160, 182)
    assert (large.clip_len, large.frame_interval, large.input_size, large.resize_size) == (16, 5, 312, 356)


@pytest.mark.parametrize("name", NAMES)
def test_x3d_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = create(name, num_classes=400)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.02
    # Exactly: pytorchvideo's create_x3d has the same layers but the layer1.0 shortcut BN (2 x 24 parameters),
    # so 3,794,274 / 6,153,384 there.
    assert count == {"x3d_l": 6_153_432}.get(name, 3_794_322)


def test_x3d_depths_and_squeeze_excitation_placement():
    backbone = create("x3d_xs", num_classes=2).backbone
    assert [len(getattr(backbone, f"layer{i}")) for i in range(1, 5)] == [3, 5, 11, 7]
    large = create("x3d_l", num_classes=2).backbone
    assert [len(getattr(large, f"layer{i}")) for i in range(1, 5)] == [5, 10, 25, 15]
    assert [block.se is not None for block in backbone.layer2] == [True, False, True, False, True]
    assert backbone.layer4[0].conv2.groups == backbone.layer4[0].conv2.in_channels == 432


def test_x3d_rejects_frames_last_input():
    with pytest.raises(ValueError, match=r"\[N, T, 3, H, W\]"):
        create("x3d_xs", num_classes=2)(torch.randn(1, 3, 4, 32, 32))


# -- foreign layouts (inverse key maps) ---------------------------------------------------------------------


def _with_identity_layer1_shortcut_bn(model):
    bn = model.backbone.layer1[0].downsample[1]
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
    return model


LAYOUTS = [("mmaction2", to_mmaction2), ("pytorchvideo", to_pytorchvideo)]


@pytest.mark.parametrize("fmt,convert", LAYOUTS, ids=[f for f, _ in LAYOUTS])
def test_x3d_foreign_layout_loads_to_identical_outputs(tmp_path, fmt, convert):
    source = _with_identity_layer1_shortcut_bn(_model(seed=1))
    torch.save(convert(source), tmp_path / "foreign.pth")
    target = create("x3d_xs", num_classes=6)
    info = load_checkpoint(target, tmp_path / "foreign.pth")
    assert info["format"] == fmt
    assert torch.equal(_outputs(target), _outputs(source))


def test_x3d_pytorchvideo_layout_names_match_the_hub_model():
    keys = set(to_pytorchvideo(create("x3d_xs", num_classes=400)))
    for expected in ("blocks.0.conv.conv_t.weight", "blocks.0.conv.conv_xy.weight", "blocks.0.norm.running_var",
                     "blocks.1.res_blocks.0.branch1_conv.weight", "blocks.2.res_blocks.0.branch1_norm.weight",
                     "blocks.1.res_blocks.0.branch2.norm_b.1.block.0.bias",
                     "blocks.4.res_blocks.6.branch2.conv_c.weight",
                     "blocks.5.pool.pre_conv.weight", "blocks.5.pool.post_conv.weight", "blocks.5.proj.bias"):
        assert expected in keys
    assert "blocks.1.res_blocks.0.branch1_norm.weight" not in keys
    assert not any(k.startswith("blocks.1.res_blocks.1.branch2.norm_b.1") for k in keys)  # SE in every 2nd block


def test_x3d_strict_loading_names_wrong_keys():
    state = to_mmaction2(_model())["state_dict"]
    del state["backbone.layer3.4.conv2.bn.weight"]
    state["backbone.layer3.4.se_modul.fc1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(create("x3d_xs", num_classes=6), {"state_dict": state})
    msg = str(err.value)
    assert "detected format: mmaction2" in msg and "x3d_xs" in msg
    assert "missing keys: backbone.layer3.4.bn2.weight" in msg
    assert "unexpected keys: backbone.layer3.4.se_modul.fc1.weight" in msg


def test_x3d_other_class_count_loads_with_reset_head():
    source = _model(seed=2)
    target = create("x3d_xs", num_classes=9)
    with pytest.raises(CheckpointError, match="reset_head"):
        load_checkpoint(target, to_pytorchvideo(source))
    load_checkpoint(target, to_pytorchvideo(source), reset_head=True)
    assert torch.equal(target.head.fc1.weight, source.head.fc1.weight)
    assert target.head.fc2.weight.shape == (9, 2048)


def _export(model, example: torch.Tensor, path) -> ort.InferenceSession:
    """Export as the package does (legacy exporter, opset 17, dynamic batch) and open it with onnxruntime CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its deprecation
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["clip"],
                          output_names=["logits"], dynamic_axes={"clip": {0: "batch"}, "logits": {0: "batch"}})
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_x3d_xs_exports_to_onnx_with_dynamic_batch(tmp_path):
    model = _model(seed=3)
    path = tmp_path / "x3d_xs.onnx"
    session = _export(model, torch.randn(1, *CLIP), path)
    clip = torch.randn(3, *CLIP, generator=torch.Generator().manual_seed(7))
    (logits,) = session.run(["logits"], {"clip": clip.numpy()})
    expected = _outputs(model, clip).numpy()
    assert logits.shape == (3, 6)
    assert np.abs(logits - expected).max() < 1e-4
    assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero logits
