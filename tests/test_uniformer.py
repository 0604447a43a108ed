"""UniFormer: published sizes, clip shapes, official and mmaction2 checkpoints, split attention, gradient
checkpointing, ONNX export."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from streamtsm.errors import CheckpointError
from streamtsm.models import create, load, load_checkpoint, save_checkpoint
from streamtsm.models import uniformer  # noqa: F401  (registers the UniFormer configurations)
from streamtsm.models.uniformer import CBlock, SABlock, SplitSABlock

from .conftest import randomize_
from .layouts import to_mmaction2_uniformer as to_mmaction2, to_official_uniformer as to_official

NAMES = ("uniformer_s", "uniformer_b")
# mmaction2 configs/recognition/uniformer/README.md (Kinetics-400, 16x4x1): UniFormer-S 21.4M, -B 49.8M.
PUBLISHED_PARAMS = {"uniformer_s": 21.4e6, "uniformer_b": 49.8e6}
# Four stages of one or two blocks, 16..64 channels, heads of 32: the same code paths at a fraction of the cost.
TINY = {"depth": (1, 1, 2, 1), "embed_dim": (16, 32, 64, 64), "head_dim": 32, "drop_path_rate": 0.0}
CLIP = (4, 3, 64, 64)


def _tiny(seed: int = 0, num_classes: int = 5, **kw):
    model = create("uniformer_s", num_classes=num_classes, **{**TINY, **kw})
    calibration = torch.randn(2, *CLIP, generator=torch.Generator().manual_seed(seed + 100))
    return randomize_(model, seed=seed, calibration=calibration)


def _clip(batch: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, *CLIP, generator=torch.Generator().manual_seed(seed))


def _outputs(model, clip: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(_clip() if clip is None else clip)


@pytest.mark.parametrize("name", NAMES)
def test_uniformer_config_classifies_its_published_clip_size(name):
    with torch.device("meta"):  # shapes and counts only: no memory, no compute
        model = create(name)
        cfg = model.cfg
        clip = torch.empty(2, cfg.clip_len, 3, cfg.input_size, cfg.input_size)
        features = model.forward_features(clip.permute(0, 2, 1, 3, 4))
        logits = model(clip)
    assert tuple(features.shape) == (2, 512, 8, 7, 7)
    assert tuple(logits.shape) == (2, 400)
    assert (cfg.kind, cfg.clip_len, cfg.frame_interval, cfg.input_size) == ("clip", 16, 4, 224)
    assert cfg.mean == (0.45, 0.45, 0.45) and cfg.std == (0.225, 0.225, 0.225)


@pytest.mark.parametrize("name", NAMES)
def test_uniformer_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = create(name, num_classes=400)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.02
    assert count == {"uniformer_s": 21_400_400, "uniformer_b": 49_813_200}[name]


def test_uniformer_stages_use_local_then_global_blocks():
    with torch.device("meta"):
        model = create("uniformer_b", num_classes=2)
    assert [len(getattr(model, f"blocks{i}")) for i in range(1, 5)] == [5, 8, 20, 7]
    assert isinstance(model.blocks2[-1], CBlock) and isinstance(model.blocks3[0], SABlock)
    assert model.blocks3[0].attn.num_heads == 5 and model.blocks4[0].attn.num_heads == 8
    assert model.blocks4[-1].drop_path.p == pytest.approx(0.3) and model.blocks1[0].drop_path.p == 0.0


def test_uniformer_rejects_frames_last_input():
    with pytest.raises(ValueError, match=r"\[N, T, 3, H, W\]"):
        create("uniformer_s", num_classes=2, **TINY)(torch.randn(1, 3, 4, 32, 32))


# -- foreign layouts (inverse key maps) ---------------------------------------------------------------------


LAYOUTS = [("official", to_official, ("streamtsm", "uniformer")), ("mmaction2", to_mmaction2, ("mmaction2",))]


@pytest.mark.parametrize("layout,convert,formats", LAYOUTS, ids=[name for name, _, _ in LAYOUTS])
def test_uniformer_foreign_layout_loads_to_identical_outputs(tmp_path, layout, convert, formats):
    source = _tiny(seed=1)
    torch.save(convert(source), tmp_path / "foreign.pth")
    target = create("uniformer_s", num_classes=5, **TINY)
    info = load_checkpoint(target, tmp_path / "foreign.pth")
    # A complete official checkpoint has exactly this package's keys, so it is recognised as this package's own.
    assert info["format"] in formats
    assert torch.equal(_outputs(target), _outputs(source))


def test_uniformer_official_converter_keeps_the_official_names():
    model = create("uniformer_s", num_classes=5, **TINY)
    state = model.state_dict()
    converted = model.checkpoint_converters()["uniformer"](state)
    assert converted.keys() == state.keys()
    for key in ("patch_embed1.proj.weight", "patch_embed2.norm.bias", "blocks1.0.pos_embed.weight",
                "blocks2.0.conv1.weight", "blocks2.0.attn.weight", "blocks1.0.mlp.fc2.bias",
                "blocks3.1.attn.qkv.bias", "blocks4.0.attn.proj.weight", "blocks4.0.norm2.weight",
                "norm.running_var", "head.weight"):
        assert key in converted


def test_uniformer_strict_loading_names_wrong_keys():
    state = to_mmaction2(_tiny())["state_dict"]
    del state["backbone.blocks3.1.attn.qkv.weight"]
    state["backbone.blocks3.1.atn.qkv.weight"] = torch.zeros(1)
    state["cls_head.fc_cls.bias"] = torch.zeros(9)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(create("uniformer_s", num_classes=5, **TINY), {"state_dict": state})
    msg = str(err.value)
    assert "detected format: mmaction2" in msg and "uniformer_s" in msg
    assert "missing keys: blocks3.1.attn.qkv.weight" in msg
    assert "unexpected keys: blocks3.1.atn.qkv.weight" in msg
    assert "head.bias checkpoint (9,) vs model (5,)" in msg


# -- variants -----------------------------------------------------------------------------------------------


def test_uniformer_split_attention_runs_and_starts_with_a_silent_temporal_attention():
    model = create("uniformer_s", num_classes=5, attention="split", **TINY)
    block = model.blocks3[0]
    assert isinstance(block, SplitSABlock)
    tokens = torch.randn(6, 4, TINY["embed_dim"][2])  # [N*H*W, T, C]
    assert torch.equal(block.t_attn(block.t_norm(tokens)), torch.zeros_like(tokens))
    randomize_(model, calibration=_clip())
    model.train()
    logits = model(_clip())
    logits.square().sum().backward()
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert model.blocks4[0].t_attn.qkv.weight.grad.abs().sum() > 0


def test_uniformer_split_attention_mixes_frames_only_through_the_temporal_attention():
    model = _tiny(attention="split", seed=2)
    block = model.blocks3[0].eval()
    x = torch.randn(1, TINY["embed_dim"][2], 4, 2, 2)  # [N, C, T, H, W]
    with torch.no_grad():
        base = block(x)
        x2 = x.clone()
        x2[:, :, 0] += 1.0
        changed = (block(x2) - base).abs().amax(dim=(0, 1, 3, 4))  # per frame
        assert (changed[1:] > 1e-4).all()  # frame 0 reaches the others (through DPE and temporal attention)
        block.t_attn.qkv.weight.zero_()
        block.t_attn.qkv.bias.zero_()
        block.pos_embed.weight.zero_()
        block.pos_embed.bias.zero_()
        base = block(x)
        assert torch.equal((block(x2) - base)[:, :, 1:], torch.zeros_like(base[:, :, 1:]))


def test_uniformer_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    kw = {**TINY, "drop_path_rate": 0.2}  # drop path draws random numbers: the recomputation must replay them
    plain = _tiny(seed=3, **kw)
    checkpointed = create("uniformer_s", num_classes=5, **{**kw, "use_checkpoint": True})
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    grads = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(11)
        model(_clip()).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == sum(TINY["depth"])
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    checkpointed.eval()
    with torch.no_grad():
        checkpointed(_clip())
    assert len(calls) == sum(TINY["depth"])  # inference never recomputes


def _export(model, example: torch.Tensor, path) -> ort.InferenceSession:
    """Export as the package does (legacy exporter, opset 17, dynamic batch) and open it with onnxruntime CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its deprecation
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["clip"],
                          output_names=["logits"], dynamic_axes={"clip": {0: "batch"}, "logits": {0: "batch"}})
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_uniformer_s_exports_to_onnx_with_dynamic_batch(tmp_path):
    model = create("uniformer_s", num_classes=5)
    randomize_(model, calibration=_clip(batch=1))
    path = tmp_path / "uniformer_s.onnx"
    session = _export(model, _clip(batch=1), path)
    clip = _clip(batch=2, seed=7)
    (logits,) = session.run(["logits"], {"clip": clip.numpy()})
    expected = _outputs(model, clip).numpy()
    assert logits.shape == (2, 5)
    assert np.abs(logits - expected).max() < 1e-4
    assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero logits


def test_uniformer_split_attention_exports_to_onnx(tmp_path):
    model = _tiny(attention="split", seed=4)
    path = tmp_path / "uniformer_split.onnx"
    session = _export(model, _clip(batch=1), path)
    clip = _clip(batch=3, seed=8)
    (logits,) = session.run(["logits"], {"clip": clip.numpy()})
    assert np.abs(logits - _outputs(model, clip).numpy()).max() < 1e-4


def test_uniformer_own_format_rebuilds_the_variant(tmp_path):
    source = _tiny(attention="split", seed=6)
    save_checkpoint(source, tmp_path / "m.pth")
    rebuilt = load(tmp_path / "m.pth")
    assert rebuilt.cfg.arch["attention"] == "split" and tuple(rebuilt.cfg.arch["depth"]) == TINY["depth"]
    assert torch.equal(_outputs(rebuilt), _outputs(source))
