"""Non-local blocks and NL-TSM: identity at initialization, the attention math, placement in the network, ONNX
export, and checkpoint layouts."""

from __future__ import annotations

import importlib
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from streamtsm.errors import CheckpointError, ConfigError
from streamtsm.models import create, load_checkpoint
from streamtsm.models.resnet import Bottleneck

from .conftest import randomize_
from .layouts import to_mit_han_lab_nl, to_mmaction2, to_mmaction2_nl

nonlocal_ = importlib.import_module("streamtsm.models.non_local")
NonLocal, NonLocalWrapper, MODES = nonlocal_.NonLocal, nonlocal_.NonLocalWrapper, nonlocal_.NON_LOCAL_MODES

SHAPES = {1: (2, 6, 8), 2: (2, 6, 4, 6), 3: (2, 6, 3, 4, 6)}


def _perturb_(block: NonLocal, seed: int = 0) -> NonLocal:
    """Weights large enough that the attention is far from uniform, and a non-zero W."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if block.bn_out is not None:
            block.bn_out.running_mean.copy_(torch.randn(block.in_channels, generator=g) * 0.1)
            block.bn_out.running_var.copy_(torch.rand(block.in_channels, generator=g) + 0.5)
    return block.eval()


@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_non_local_fresh_block_is_the_identity(mode, dim, sub_sample):
    x = torch.randn(SHAPES[dim])
    for use_bn in (True, False):
        block = NonLocal(6, dim=dim, mode=mode, sub_sample=sub_sample, use_bn=use_bn)
        block.train()  # also in training mode, where the BN normalizes with batch statistics
        with torch.no_grad():
            assert torch.equal(block(x), x)
            assert torch.equal(block.eval()(x), x)


def _slow_non_local(block: NonLocal, x: torch.Tensor) -> torch.Tensor:
    """z_i = x_i + BN(W sum_j f(x_i, x_j) g(x_j) / C(x)), one position pair at a time."""
    pool = block.pool if block.pool is not None else nn.Identity()

    def embed(conv, x):  # a 1x1 conv, position by position: [N, C, *S] -> [N, C', *S]
        w, b = conv.weight.flatten(1), conv.bias
        flat = x.flatten(2)
        out = torch.stack([torch.stack([w @ flat[n, :, p] + b for p in range(flat.shape[2])], 1)
                           for n in range(x.shape[0])])
        return out.view(x.shape[0], -1, *x.shape[2:])

    g = pool(embed(block.g, x)).flatten(2)  # [N, C', M]
    if block.mode == "gaussian":
        theta, phi = x.flatten(2), pool(x).flatten(2)
    else:
        theta, phi = embed(block.theta, x).flatten(2), pool(embed(block.phi, x)).flatten(2)
    n, p, m = x.shape[0], theta.shape[2], phi.shape[2]
    out = torch.empty_like(x.flatten(2))
    for b in range(n):
        for i in range(p):
            if block.mode == "concatenation":
                w = block.concat_project.weight.flatten()
                f = [max(0.0, float(w @ torch.cat([theta[b, :, i], phi[b, :, j]]))) / m for j in range(m)]
            else:
                dots = [float(theta[b, :, i] @ phi[b, :, j]) for j in range(m)]
                if block.mode == "dot_product":
                    f = [d / m for d in dots]
                else:
                    if block.use_scale and block.mode == "embedded_gaussian":  # as in mmcv
                        dots = [d / math.sqrt(block.inter_channels) for d in dots]
                    top = max(dots)
                    e = [math.exp(d - top) for d in dots]
                    f = [v / sum(e) for v in e]
            y = sum(f[j] * g[b, :, j] for j in range(m))
            z = block.conv_out.weight.flatten(1) @ y
            if block.bn_out is None:
                z = z + block.conv_out.bias
            else:
                bn = block.bn_out
                z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
            out[b, :, i] = x[b].flatten(1)[:, i] + z
    return out.view_as(x)


@pytest.mark.parametrize("dim,sub_sample,use_bn,use_scale", [(1, False, True, False), (2, True, True, True),
                                                             (3, True, False, False), (3, False, True, True)])
@pytest.mark.parametrize("mode", MODES)
def test_non_local_matches_a_slow_reference(mode, dim, sub_sample, use_bn, use_scale):
    block = _perturb_(NonLocal(4, dim=dim, mode=mode, sub_sample=sub_sample, use_bn=use_bn, use_scale=use_scale))
    shape = {1: (2, 4, 6), 2: (2, 4, 4, 5), 3: (1, 4, 2, 4, 4)}[dim]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast, slow = block(x), _slow_non_local(block, x)
    assert not torch.allclose(fast, x, atol=1e-2)  # the block does something
    assert torch.allclose(fast, slow, atol=1e-5), (fast - slow).abs().max()


def test_non_local_attention_rows_are_normalized():
    x = torch.randn(2, 6, 3, 4, 4)
    for mode in ("embedded_gaussian", "gaussian"):
        f = _perturb_(NonLocal(6, mode=mode, sub_sample=True)).attention(x)
        assert f.shape == (2, 3 * 4 * 4, 3 * 2 * 2)  # every frame kept, space pooled by 2
        assert torch.allclose(f.sum(-1), torch.ones(2, 48))


def test_non_local_rejects_unknown_mode_and_dim():
    with pytest.raises(ValueError, match="mode"):
        NonLocal(4, mode="cosine")
    with pytest.raises(ValueError, match="dim"):
        NonLocal(4, dim=4)


def _nl_model(seed: int = 0, **kw):
    """A tiny NL-TSM with random weights whose attention is neither uniform nor one-hot.

    The non-local blocks are randomized after the BN calibration, with their output BN at unit statistics: a BN
    calibrated on one batch would divide by the tiny spread of y over a batch where the attention happens to
    collapse, and amplify every rounding difference downstream.
    """
    model = randomize_(create("tsm_r50_nl", num_classes=6, width=8, **kw), seed=seed,
                       calibration=torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wrapper in model.non_local_blocks:
            nl = wrapper.non_local
            for name, p in nl.named_parameters():
                if not name.startswith("bn_out"):
                    fan_in = p[0].numel() if p.dim() > 1 else nl.in_channels
                    std = 1 / nl.in_channels if name.startswith(("theta", "phi")) else fan_in**-0.5
                    p.copy_(torch.randn(p.shape, generator=g) * std)
            if nl.bn_out is not None:
                nl.bn_out.weight.copy_(torch.rand(nl.in_channels, generator=g) * 0.5 + 0.25)
                nl.bn_out.bias.copy_(torch.randn(nl.in_channels, generator=g) * 0.1)
                nl.bn_out.reset_running_stats()
    return model


def _outputs(model) -> torch.Tensor:
    clip = torch.randn(2, model.num_segments, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(clip, per_frame=True)


def test_nl_tsm_inserts_blocks_after_layer2_0_2_and_layer3_0_2_4():
    model = create("tsm_r50_nl", num_classes=6, width=8)
    backbone = model.backbone
    wrapped = {(stage, i) for stage in (1, 2, 3, 4) for i, b in enumerate(getattr(backbone, f"layer{stage}"))
               if isinstance(b, NonLocalWrapper)}
    assert wrapped == {(2, 0), (2, 2), (3, 0), (3, 2), (3, 4)}
    assert [w for w in model.non_local_blocks] == [backbone.layer2[0], backbone.layer2[2], backbone.layer3[0],
                                                   backbone.layer3[2], backbone.layer3[4]]
    for w in model.non_local_blocks:
        assert isinstance(w.block, Bottleneck) and w.block.shift is not None
        nl = w.non_local
        assert nl.mode == "embedded_gaussian" and nl.sub_sample and not nl.use_scale and nl.dim == 3
        assert nl.in_channels == w.block.bn3.num_features and nl.inter_channels == nl.in_channels // 2
    assert len(model.shifted_blocks) == 16  # every block keeps its shift
    assert not model.online and model.cfg.kind == "clip"
    with pytest.raises(RuntimeError, match="no online form"):
        model.step(torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        assert model(torch.randn(2, 8, 3, 32, 32)).shape == (2, 6)
        assert model(torch.randn(16, 3, 32, 32), per_frame=True).shape == (2, 8, 6)


def test_fresh_non_local_blocks_leave_a_tsm_unchanged():
    """With W at zero, NL-TSM computes exactly the TSM it wraps: the [N*T] <-> [N, C, T] reshapes are lossless."""
    tsm = randomize_(create("tsm_r50", num_classes=6, width=8), calibration=torch.randn(16, 3, 32, 32))
    nl = create("tsm_r50_nl", num_classes=6, width=8)
    wrapped = {n.removesuffix(".block") for n, m in nl.named_modules() if n.endswith(".block")}
    state = {}
    for key, value in tsm.state_dict().items():
        prefix = ".".join(key.split(".")[:3])  # backbone.layerK.i
        state[f"{prefix}.block{key[len(prefix):]}" if prefix in wrapped else key] = value
    missing, unexpected = nl.load_state_dict(state, strict=False)
    assert not unexpected and all(".non_local." in k for k in missing)
    assert torch.equal(_outputs(nl), _outputs(tsm))


def test_nl_tsm_with_temporal_pool_attends_over_half_the_frames():
    model = create("tsm_r50_nl", num_classes=6, width=8, temporal_pool=True)
    assert {w.num_segments for w in model.non_local_blocks} == {4}
    with torch.no_grad():
        assert model(torch.randn(1, 8, 3, 32, 32), per_frame=True).shape == (1, 4, 6)


def test_nl_tsm_pattern_must_match_the_stages():
    with pytest.raises(ConfigError, match="non_local"):
        create("tsm_r50_nl", width=8, non_local=((1,), (1,), (1,), (1,)))
    model = create("tsm_r50_nl", width=8, non_local=[[0, 0, 0], [0, 0, 0, 1], [0] * 6, [1, 0, 0]])
    assert len(model.non_local_blocks) == 2


def _export_and_run(model, clip: torch.Tensor, path) -> np.ndarray:
    torch.onnx.export(model, (clip[:1],), str(path), dynamo=False, opset_version=17, input_names=["clip"],
                      output_names=["logits"], dynamic_axes={"clip": {0: "batch"}, "logits": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"clip": clip.numpy()})[0]


@pytest.mark.parametrize("mode", MODES)
def test_non_local_block_exports_to_onnx(tmp_path, mode):
    block = _perturb_(NonLocal(8, mode=mode, sub_sample=True))
    x = torch.randn(3, 8, 4, 6, 6)
    torch.onnx.export(block, (x[:1],), str(tmp_path / "nl.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    got = ort.InferenceSession(str(tmp_path / "nl.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, block(x).numpy(), atol=1e-4, rtol=0)


def test_nl_tsm_exports_to_onnx_with_dynamic_batch(tmp_path):
    model = _nl_model(seed=2)
    clip = torch.randn(2, 8, 3, 32, 32)
    with torch.no_grad():
        expected = model(clip).numpy()
    got = _export_and_run(model, clip, tmp_path / "nl.onnx")
    assert got.shape == (2, 6)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


# -- checkpoint layouts ------------------------------------------------------------------------------------


# Both forms of mmcv's g / phi names (Sequential(conv, pool) when sub-sampled), and the concatenation projection.
@pytest.mark.parametrize("mode,sub_sample", [("embedded_gaussian", True), ("concatenation", False)])
def test_mmaction2_nl_tsm_layout_loads_to_identical_outputs(tmp_path, mode, sub_sample):
    source = _nl_model(seed=3, non_local_mode=mode, sub_sample=sub_sample)
    torch.save(to_mmaction2_nl(source), tmp_path / "mma.pth")
    target = create("tsm_r50_nl", num_classes=6, width=8, non_local_mode=mode, sub_sample=sub_sample)
    info = load_checkpoint(target, tmp_path / "mma.pth")
    assert info["format"] == "mmaction2"
    assert torch.equal(_outputs(target), _outputs(source))


def test_official_nl_tsm_layout_loads_with_w_bias_folded_into_the_bn(tmp_path):
    source = _nl_model(seed=4)
    checkpoint = to_mit_han_lab_nl(source)
    assert any(k.endswith("nl.W.0.bias") for k in checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "official.pth")
    target = create("tsm_r50_nl", num_classes=6, width=8)
    assert load_checkpoint(target, tmp_path / "official.pth")["format"] == "mit-han-lab"
    assert torch.allclose(_outputs(target), _outputs(source), atol=1e-4)


def test_strict_loading_names_a_wrong_non_local_key():
    state = to_mmaction2_nl(_nl_model(seed=5))["state_dict"]
    state["backbone.layer3.2.non_local_block.thetta.conv.weight"] = state.pop(
        "backbone.layer3.2.non_local_block.theta.conv.weight")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(create("tsm_r50_nl", num_classes=6, width=8), {"state_dict": state})
    msg = str(err.value)
    assert "detected format: mmaction2" in msg and "tsm_r50_nl" in msg
    assert "missing keys: backbone.layer3.2.non_local.theta.weight" in msg
    assert "unexpected keys: backbone.layer3.2.non_local_block.thetta.conv.weight" in msg


def test_plain_tsm_checkpoint_does_not_fit_nl_tsm():
    tsm = create("tsm_r50", num_classes=6, width=8)
    with pytest.raises(CheckpointError, match="missing keys: backbone.layer2.0.block.conv1.weight"):
        load_checkpoint(create("tsm_r50_nl", num_classes=6, width=8), to_mmaction2(tsm))
