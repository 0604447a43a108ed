"""TIN: the differentiable temporal sampler against a slow reference, the interlace's identity and direction,
placement in the network, ONNX export, and checkpoint layouts."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from streamtsm.errors import CheckpointError
from streamtsm.models import create, load_checkpoint
from streamtsm.models.tin import TemporalInterlace, linear_sampler

from .conftest import randomize_
from .layouts import to_mmaction2, to_mmaction2_tin, to_official_tin


def _slow_sampler(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The official op, frame by frame: tin_shift by k = floor(o) and by k + 1 (output frame t + k takes input
    frame t, zero where it falls outside the clip), mixed with weights 1 - (o - k) and o - k."""
    n, t, c = x.shape[:3]
    out = torch.zeros_like(x)
    for b in range(n):
        for ch in range(c):
            o = float(offset[b, ch])
            k = math.floor(o)
            for shift, weight in ((k, 1 - (o - k)), (k + 1, o - k)):
                for src in range(t):
                    if 0 <= src + shift < t:
                        out[b, src + shift, ch] += weight * x[b, src, ch]
    return out


def test_linear_sampler_matches_the_official_op_for_fractional_and_out_of_clip_offsets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 16, 2, 3, generator=g)
    offset = torch.rand(2, 16, generator=g) * 16 - 8  # (-8, 8): many reach partly or wholly outside T = 6
    offset[0, :4] = torch.tensor([0.0, 1.0, -2.0, 5.0])  # integers: one frame, no interpolation
    offset[1, :3] = torch.tensor([6.0, -6.5, 5.5])  # wholly outside, half outside
    assert torch.allclose(linear_sampler(x, offset), _slow_sampler(x, offset), atol=1e-6)
    assert torch.equal(linear_sampler(x, offset)[1, :, 0], torch.zeros(6, 2, 3))


def _zero_nets_(module: TemporalInterlace, offset_logit: float = 0.0) -> TemporalInterlace:
    """Constant offsets 4 (sigmoid(offset_logit) - 1/2) for both groups, weights exactly 1."""
    with torch.no_grad():
        for p in (module.offset_net.fc2.weight, module.weight_net.conv.weight, module.weight_net.conv.bias):
            p.zero_()
        module.offset_net.fc2.bias.fill_(offset_logit)
    return module


def test_interlace_with_zero_offsets_and_unit_weights_is_the_identity():
    module = _zero_nets_(TemporalInterlace(32, num_segments=4, shift_div=4))
    x = torch.randn(2 * 4, 32, 3, 3)
    offset, weight = module.offsets_and_weights(x.view(2, 4, 32, 3, 3))
    assert torch.equal(offset, torch.zeros(2, 8)) and torch.equal(weight, torch.ones(2, 4, 8))
    assert torch.equal(module(x), x)


def test_interlace_moves_four_groups_by_plus_and_minus_offsets():
    # 4 (sigmoid(ln 3) - 1/2) = 1: groups 0, 1 take frame t - 1, groups 2, 3 frame t + 1, like TSM's shift.
    module = _zero_nets_(TemporalInterlace(32, num_segments=4, shift_div=4), offset_logit=math.log(3))
    x5 = torch.randn(2, 4, 32, 3, 3)
    out = module(x5.view(8, 32, 3, 3)).view_as(x5)
    assert module.channel_group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(out[:, 1:, :4], x5[:, :-1, :4])
    torch.testing.assert_close(out[:, 0, :4], torch.zeros(2, 4, 3, 3))
    torch.testing.assert_close(out[:, :-1, 4:8], x5[:, 1:, 4:8])
    torch.testing.assert_close(out[:, -1, 4:8], torch.zeros(2, 4, 3, 3))
    assert torch.equal(out[:, :, 8:], x5[:, :, 8:])


def test_interlace_passes_the_other_channels_through_and_weights_frames():
    torch.manual_seed(0)
    module = TemporalInterlace(16, num_segments=8, shift_div=4)
    x = torch.randn(16, 16, 4, 4)
    out = module(x)
    assert out.shape == x.shape and torch.equal(out[:, 4:], x[:, 4:])
    offset, weight = module.offsets_and_weights(x.view(2, 8, 16, 4, 4))
    assert (offset.abs() < 2).all() and ((weight > 0) & (weight < 2)).all()
    assert torch.equal(offset[:, 2:], -offset[:, :2])  # fold of 4: one channel per group
    expected = linear_sampler(x.view(2, 8, 16, 4, 4)[:, :, :4], offset) * weight[..., None, None]
    torch.testing.assert_close(out.view(2, 8, 16, 4, 4)[:, :, :4], expected)


def _backward(module: TemporalInterlace) -> torch.Tensor:
    x = torch.randn(16, 16, 4, 4, requires_grad=True)
    (module(x) * torch.randn(16, 16, 4, 4)).sum().backward()
    return x.grad


def test_gradients_flow_to_offset_and_weight_nets():
    torch.manual_seed(1)
    module = TemporalInterlace(16, num_segments=8, shift_div=4)
    assert _backward(module).abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_offset_gradient_is_not_lost_at_whole_frame_offsets():
    # At an integer offset the sampler's one-sided derivative, as in the official op, is frame t-k-1 minus t-k.
    module = _zero_nets_(TemporalInterlace(16, num_segments=8, shift_div=4), offset_logit=math.log(3))
    _backward(module)
    assert module.offset_net.fc2.bias.grad.abs().min() > 0


def test_interlace_rejects_too_few_channels_and_bad_clips():
    with pytest.raises(ValueError, match="fold"):
        TemporalInterlace(3, num_segments=8, shift_div=4)
    with pytest.raises(ValueError, match="T=8"):
        TemporalInterlace(16, num_segments=8)(torch.randn(12, 16, 2, 2))


def _tin_model(seed: int = 0, **kw):
    model = create("tin_r50", num_classes=6, width=8, **kw)
    calibration = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return randomize_(model, seed=seed, calibration=calibration)  # also randomizes OffsetNet's fc layers


def _outputs(model) -> torch.Tensor:
    clip = torch.randn(2, model.num_segments, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(clip, per_frame=True)


def test_tin_r50_interlaces_every_residual_branch():
    model = create("tin_r50", num_classes=6, width=8)
    blocks = model.interlaced_blocks
    assert len(blocks) == 16 and model.shifted_blocks == []
    for block in blocks:
        assert isinstance(block.shift, TemporalInterlace) and block.shift_place == "blockres"
        assert block.shift.fold == block.in_channels // 4 and block.shift.num_segments == 8
    assert model.cfg.kind == "clip" and model.cfg.arch["shift_div"] == 4 and not model.online
    with pytest.raises(RuntimeError, match="no online form"):
        model.step(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="T=8"):
        model(torch.randn(1, 4, 3, 32, 32))
    with torch.no_grad():
        assert model(torch.randn(2, 8, 3, 32, 32)).shape == (2, 6)
        assert model(torch.randn(16, 3, 32, 32), per_frame=True).shape == (2, 8, 6)


def test_tin_r50_exports_to_onnx_with_dynamic_batch(tmp_path):
    model = _tin_model(seed=2)
    clip = torch.randn(2, 8, 3, 32, 32)
    with torch.no_grad():
        expected = model(clip).numpy()
    path = tmp_path / "tin.onnx"
    torch.onnx.export(model, (clip[:1],), str(path), dynamo=False, opset_version=17, input_names=["clip"],
                      output_names=["logits"], dynamic_axes={"clip": {0: "batch"}, "logits": {0: "batch"}})
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"clip": clip.numpy()})[0]
    assert got.shape == (2, 6)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


# -- checkpoint layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,convert", [("mmaction2", to_mmaction2_tin), ("mit-han-lab", to_official_tin)])
def test_foreign_tin_layout_loads_to_identical_outputs(tmp_path, fmt, convert):
    source = _tin_model(seed=3)
    torch.save(convert(source), tmp_path / "tin.pth")
    target = create("tin_r50", num_classes=6, width=8)
    assert load_checkpoint(target, tmp_path / "tin.pth")["format"] == fmt
    assert torch.equal(_outputs(target), _outputs(source))


def test_strict_loading_names_a_wrong_tin_key():
    state = to_mmaction2_tin(_tin_model(seed=4))["state_dict"]
    state["backbone.layer2.1.conv1.conv.net1.offset_net.fc3.weight"] = state.pop(
        "backbone.layer2.1.conv1.conv.net1.offset_net.fc2.weight")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(create("tin_r50", num_classes=6, width=8), {"state_dict": state})
    msg = str(err.value)
    assert "detected format: mmaction2" in msg and "tin_r50" in msg
    assert "missing keys: backbone.layer2.1.shift.offset_net.fc2.weight" in msg
    assert "unexpected keys: backbone.layer2.1.shift.offset_net.fc3.weight" in msg


def test_tsm_checkpoint_does_not_fit_tin():
    with pytest.raises(CheckpointError, match=r"missing keys: .*backbone\.layer1\.0\.shift\.offset_net"):
        load_checkpoint(create("tin_r50", num_classes=6, width=8), to_mmaction2(create("tsm_r50", width=8)))
