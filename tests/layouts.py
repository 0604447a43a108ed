"""Checkpoints in each publisher's key layout, built from this package's models (the inverse of the converters in
streamtsm/models): what the loading tests and the catalog test feed the loader."""

from __future__ import annotations

import re

import torch

from streamtsm.models import mobilenetv2, resnet


def shifted_prefixes(model) -> list[str]:
    names = {id(m): n for n, m in model.backbone.named_modules()}
    return [names[id(b)] + "." for b in model.shifted_blocks]


def own_backbone(model):
    """(backbone key, tensor, shifted?) without the `backbone.` prefix, as older torch saved them (no BN counters)."""
    shifted = shifted_prefixes(model)
    for key, value in model.state_dict().items():
        if key.startswith("backbone.") and not key.endswith("num_batches_tracked"):
            k = key.removeprefix("backbone.")
            yield k, value, any(k.startswith(p) for p in shifted)


def to_mit_han_lab(model) -> dict:
    """The official offline TSN wrapper: module.base_model.*, `.net` inside shifted first convs, module.new_fc."""
    out = {}
    for key, value, shifted in own_backbone(model):
        if shifted:
            key = re.sub(r"(\.conv1|\.conv\.0)\.", r"\1.net.", key, count=1)
        if model.temporal_pool:
            key = re.sub(r"^layer2\.", "layer2.net.", key)
        out["module.base_model." + key] = value
    out["module.new_fc.weight"], out["module.new_fc.bias"] = model.fc.weight, model.fc.bias
    return {"epoch": 50, "arch": "resnet50", "best_prec1": 71.2, "state_dict": out}


def to_mmaction2(model) -> dict:
    """mmaction2 Recognizer2D: backbone.* with ConvModule names and `.net` shifts, cls_head.fc_cls.*."""
    family = mobilenetv2 if isinstance(model.backbone, mobilenetv2.MobileNetV2) else resnet
    out = {}
    for key, value, shifted in own_backbone(model):
        key = family.to_mmaction2_key(key)
        if shifted:  # the TemporalShift wraps the whole first ConvModule (conv and BN)
            key = re.sub(r"(\.conv1|\.conv\.0)\.(conv|bn)\.", r"\1.net.\2.", key, count=1)
        out["backbone." + key] = value
    out["cls_head.fc_cls.weight"], out["cls_head.fc_cls.bias"] = model.fc.weight, model.fc.bias
    return {"meta": {"mmaction2_version": "1.2.0", "epoch": 50}, "state_dict": out}


def to_plain(model, head: str) -> dict:
    """The official online demo (features.*, classifier.*) and torchvision (classifier.1.* / fc.*) layouts."""
    out = {k: v for k, v, _ in own_backbone(model)}
    out[f"{head}.weight"], out[f"{head}.bias"] = model.fc.weight, model.fc.bias
    return out


def to_mmaction2_x3d(model) -> dict:
    """mmaction2 X3D + X3DHead: ConvModule names (.conv/.bn), se_module, cls_head.fc1/fc2 (linear layers)."""
    rules = [
        (r"^backbone\.conv1_([st])\.", r"backbone.conv1_\1.conv."),
        (r"^backbone\.bn1\.", "backbone.conv1_t.bn."),
        (r"^backbone\.conv5\.", "backbone.conv5.conv."),
        (r"^backbone\.bn5\.", "backbone.conv5.bn."),
        (r"^(backbone\.layer\d\.\d+\.)conv(\d)\.", r"\1conv\2.conv."),
        (r"^(backbone\.layer\d\.\d+\.)bn(\d)\.", r"\1conv\2.bn."),
        (r"^(backbone\.layer\d\.\d+\.)se\.", r"\1se_module."),
        (r"^(backbone\.layer\d\.\d+\.)downsample\.0\.", r"\1downsample.conv."),
        (r"^(backbone\.layer\d\.\d+\.)downsample\.1\.", r"\1downsample.bn."),
        (r"^head\.", "cls_head."),
    ]
    out = {}
    for key, value in model.state_dict().items():
        for pattern, repl in rules:
            key, n = re.subn(pattern, repl, key, count=1)
            if n:
                break
        out[key] = value.flatten(1) if key == "cls_head.fc1.weight" else value
    return {"meta": {"mmaction2_version": "1.2.0"}, "state_dict": out}


def to_pytorchvideo(model) -> dict:
    """pytorchvideo create_x3d: blocks.N.*, swapped stem names, no layer1.0 shortcut BN."""
    rules = [
        (r"^backbone\.conv1_s\.", "blocks.0.conv.conv_t."),
        (r"^backbone\.conv1_t\.", "blocks.0.conv.conv_xy."),
        (r"^backbone\.bn1\.", "blocks.0.norm."),
        (r"^backbone\.conv5\.", "blocks.5.pool.pre_conv."),
        (r"^backbone\.bn5\.", "blocks.5.pool.pre_norm."),
        (r"^head\.fc1\.", "blocks.5.pool.post_conv."),
        (r"^head\.fc2\.", "blocks.5.proj."),
    ]
    inner = {"conv1": "branch2.conv_a", "bn1": "branch2.norm_a", "conv2": "branch2.conv_b",
             "bn2": "branch2.norm_b.0", "se.fc1": "branch2.norm_b.1.block.0", "se.fc2": "branch2.norm_b.1.block.2",
             "conv3": "branch2.conv_c", "bn3": "branch2.norm_c", "downsample.0": "branch1_conv",
             "downsample.1": "branch1_norm"}
    out = {}
    for key, value in model.state_dict().items():
        m = re.match(r"^backbone\.layer(\d)\.(\d+)\.(.+)\.(\w+)$", key)
        if m:
            stage, i, module, param = m.groups()
            if (stage, i, module) == ("1", "0", "downsample.1"):
                continue  # pytorchvideo's layer1.0 shortcut has no BN
            key = f"blocks.{stage}.res_blocks.{i}.{inner[module]}.{param}"
        else:
            for pattern, repl in rules:
                key, n = re.subn(pattern, repl, key, count=1)
                if n:
                    break
        out[key] = value
    return out


def to_official_uniformer(model) -> dict:
    """Sense-X/UniFormer video_classification: this package's names, as saved by the official training code."""
    return {"model": dict(model.state_dict())}


def to_mmaction2_uniformer(model) -> dict:
    """mmaction2 1.x UniFormer (v1) backbone + I3DHead: backbone.<official name>, cls_head.fc_cls.*."""
    out = {}
    for key, value in model.state_dict().items():
        out["cls_head.fc_cls." + key[5:] if key.startswith("head.") else "backbone." + key] = value
    return {"meta": {"mmaction2_version": "1.2.0"}, "state_dict": out}


def backbone_items(model):
    for key, value in model.state_dict().items():
        if key.startswith("backbone.") and not key.endswith("num_batches_tracked"):
            yield key.removeprefix("backbone."), value


def to_mmaction2_tin(model) -> dict:
    """mmaction2 ResNetTIN: conv1.conv = CombineNet(net1 = TemporalInterlace, net2 = the conv), ConvModule names."""
    out = {}
    for key, value in backbone_items(model):
        if ".shift." in key:
            block, rest = key.split(".shift.")
            key = f"{block}.conv1.conv.net1.{rest}"
        else:
            key = resnet.to_mmaction2_key(key).replace(".conv1.conv.", ".conv1.conv.net2.", 1)
        out["backbone." + key] = value
    out["cls_head.fc_cls.weight"], out["cls_head.fc_cls.bias"] = model.fc.weight, model.fc.bias
    return {"meta": {"mmaction2_version": "1.2.0"}, "state_dict": out}


def to_official_tin(model) -> dict:
    """deepcs233/TIN: module.base_model.*, conv1 = CombinNet(net1 = TemporalDeform(biasnet, weightnet), net2)."""
    names = {"offset_net.conv.": "biasnet.net.conv.", "offset_net.fc1.": "biasnet.net.fc.",
             "offset_net.fc2.": "biasnet.net.lastlayer.", "weight_net.conv.": "weightnet.net.lastlayer."}
    out = {}
    for key, value in backbone_items(model):
        if ".shift." in key:
            block, rest = key.split(".shift.")
            old = next(o for o in names if rest.startswith(o))
            key = f"{block}.conv1.net1.{names[old]}{rest[len(old):]}"
        elif key.startswith("layer"):
            key = key.replace(".conv1.", ".conv1.net2.", 1)
        out["module.base_model." + key] = value
    out["module.new_fc.weight"], out["module.new_fc.bias"] = model.fc.weight, model.fc.bias
    return {"epoch": 40, "arch": "resnet50", "state_dict": out}


def to_mmaction2_nl(model) -> dict:
    """mmaction2 NL-TSM: NL3DWrapper(.block, .non_local_block = mmcv NonLocal3d), ConvModule names, shifts
    wrapping conv1.conv as `.net`, mmcv's Sequential(conv, pool) for sub-sampled g / phi."""
    sub = ".0" if model.non_local_blocks[0].non_local.sub_sample else ""
    out = {}
    for key, value, shifted in own_backbone(model):
        if ".non_local." in key:
            prefix, rest = key.split(".non_local.")
            name, param = rest.split(".", 1)
            mma = {"g": f"g{sub}.conv", "phi": f"phi{sub}.conv", "theta": "theta.conv", "conv_out": "conv_out.conv",
                   "bn_out": "conv_out.bn", "concat_project": "concat_project.conv"}[name]
            key = f"{prefix}.non_local_block.{mma}.{param}"
        else:
            key = resnet.to_mmaction2_key(key)
            if shifted:
                key = key.replace(".conv1.conv.", ".conv1.conv.net.", 1)
        out["backbone." + key] = value
    out["cls_head.fc_cls.weight"], out["cls_head.fc_cls.bias"] = model.fc.weight, model.fc.bias
    return {"meta": {"mmaction2_version": "1.2.0"}, "state_dict": out}


def to_mit_han_lab_nl(model, seed: int = 0) -> dict:
    """The official NL-TSM: module.base_model.*, `.nl` = NONLocalBlock3D (g.0, theta, phi.0, W = [conv with a
    bias, BN3d]), `.net` inside shifted conv1, new_fc. W's bias is drawn at random and the BN mean moved by it, so
    the checkpoint computes the same function as ``model``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value, shifted in own_backbone(model):
        if ".non_local." in key:
            prefix, rest = key.split(".non_local.")
            name, param = rest.split(".", 1)
            mit = {"g": "g.0", "phi": "phi.0", "theta": "theta", "conv_out": "W.0", "bn_out": "W.1"}[name]
            if name == "conv_out":
                bias = torch.randn(value.shape[0], generator=gen)
                out[f"module.base_model.{prefix}.nl.W.0.bias"] = bias
                mean_key = f"backbone.{prefix}.non_local.bn_out.running_mean"
                out[f"module.base_model.{prefix}.nl.W.1.running_mean"] = model.state_dict()[mean_key] + bias
            if name == "bn_out" and param == "running_mean":
                continue
            key = f"{prefix}.nl.{mit}.{param}"
        elif shifted:
            key = key.replace(".conv1.", ".conv1.net.", 1)
        out["module.base_model." + key] = value
    out["module.new_fc.weight"], out["module.new_fc.bias"] = model.fc.weight, model.fc.bias
    return {"epoch": 100, "arch": "resnet50", "state_dict": out}


def to_torchvision_mobilenetv2(model) -> dict:
    """torchvision's MobileNetV2: each conv + BN (+ ReLU6) of a block wrapped one level deeper (features.N.conv.A.B),
    the projection conv and its BN flat after them, classifier.1.* (Dropout at classifier.0)."""
    positions: dict[str, set[int]] = {}
    own = {k: v for k, v, _ in own_backbone(model)}
    for key in own:
        m = re.match(r"^(features\.\d+\.conv\.)(\d+)\.", key)
        if m:
            positions.setdefault(m.group(1), set()).add(int(m.group(2)))
    out = {}
    for key, value in own.items():
        m = re.match(r"^(features\.\d+\.conv\.)(\d+)\.(.+)$", key)
        if m:
            position, wrapped = int(m.group(2)), (max(positions[m.group(1)]) - 1) // 3  # the last BN sits at 3k+1
            key = (f"{m.group(1)}{position // 3}.{position % 3}.{m.group(3)}" if position < 3 * wrapped
                   else f"{m.group(1)}{position - 2 * wrapped}.{m.group(3)}")
        out[key] = value
    out["classifier.1.weight"], out["classifier.1.bias"] = model.fc.weight, model.fc.bias
    return out
