"""X3D (Feichtenhofer, "X3D: Expanding Architectures for Efficient Video Recognition", CVPR 2020).

A ResNet of channel-wise (depth-wise) 3x3x3 bottlenecks, expanded from a tiny base network along width
(``gamma_w``), bottleneck width (``gamma_b``) and depth (``gamma_d``); XS, S and M share the network
(gamma_w 2.0, gamma_b 2.25, gamma_d 2.2) and differ only in input, L is deeper (gamma_d 5.0):

    stem    1x3x3 conv, stride (1, 2, 2)  ->  5x1x1 channel-wise conv, BN, ReLU               24 ch
    res2-5  bottlenecks, spatial stride 2 in each stage's first block                     24/48/96/192 ch
            (1, 2, 5, 3) x gamma_d blocks: 3/5/11/7 (XS/S/M), 5/10/25/15 (L)
    conv5   1x1x1 conv to the bottleneck width, BN, ReLU                                     432 ch
    head    global average pool, 2048-wide pre-logits 1x1x1 conv (no BN), ReLU, dropout, classifier

``model(clip)`` takes ``[N, T, 3, H, W]`` (frames first, like TSM's 5D input) and returns ``[N, num_classes]``.
Any T >= 1 and H, W work (the head pools globally); the registered configurations name the T x tau the
published models were trained with.
"""

from __future__ import annotations

import math
import re
from typing import NoReturn

import torch
from torch import Tensor, nn

from .registry import register

# The base network that X3D expands: stem width before gamma_w and blocks per stage before gamma_d
# (pytorchvideo's create_x3d: stem_dim_in=12, stage_depths=(1, 2, 5, 3)).
_STEM_WIDTH = 12
_STAGE_DEPTHS = (1, 2, 5, 3)


def round_width(width: float, multiplier: float, min_width: int = 8, divisor: int = 8) -> int:
    """Scale a channel count and round it to a multiple of ``divisor`` (never below 90% of the exact value)."""
    width *= multiplier
    rounded = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * width:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, multiplier: float) -> int:
    return int(math.ceil(multiplier * repeats))


class SqueezeExcitation(nn.Module):
    """Channel gate from the clip's mean: ``x * sigmoid(fc2(relu(fc1(mean_thw(x)))))``, 1x1x1 convs with bias."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(channels, reduced, 1)
        self.fc2 = nn.Conv3d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = x.mean((2, 3, 4), keepdim=True)  # [N, C, 1, 1, 1]
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(scale))))


class X3DBlock(nn.Module):
    """Bottleneck: 1x1x1 conv, BN, ReLU; channel-wise 3x3x3 conv, BN, [SE], Swish; 1x1x1 conv, BN; + shortcut; ReLU.

    The shortcut is a strided 1x1x1 conv with BN in each stage's first block (the SlowFast and mmaction2 layout).
    """

    def __init__(self, inp: int, planes: int, out: int, spatial_stride: int = 1, se_ratio: float = 0.0) -> None:
        super().__init__()
        stride = (1, spatial_stride, spatial_stride)
        self.conv1 = nn.Conv3d(inp, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.se = SqueezeExcitation(planes, round_width(planes, se_ratio)) if se_ratio > 0 else None
        self.conv3 = nn.Conv3d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.downsample = None
        if spatial_stride != 1 or inp != out:
            self.downsample = nn.Sequential(nn.Conv3d(inp, out, 1, stride, bias=False), nn.BatchNorm3d(out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        out = self.bn3(self.conv3(nn.functional.silu(out)))  # SiLU is Swish
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class X3DBackbone(nn.Module):
    """Stem, four stages and conv5: ``[N, 3, T, H, W] -> [N, num_features, T, H/32, W/32]``.

    Args:
        gamma_w: width expansion of the base network (stem and stage widths).
        gamma_b: bottleneck (inner) width as a multiple of the stage width; also conv5's width.
        gamma_d: depth expansion of the base stages (1, 2, 5, 3).
        se_ratio: squeeze-excitation width as a fraction of the bottleneck width, in every second block of
            each stage (the first, third, ...); 0 disables SE.
    """

    def __init__(self, gamma_w: float = 2.0, gamma_b: float = 2.25, gamma_d: float = 2.2,
                 se_ratio: float = 1 / 16) -> None:
        super().__init__()
        if min(gamma_w, gamma_b, gamma_d) <= 0:
            raise ValueError(f"gamma_w, gamma_b and gamma_d must be > 0, got {gamma_w}, {gamma_b}, {gamma_d}")
        stem = round_width(_STEM_WIDTH, gamma_w)
        self.conv1_s = nn.Conv3d(3, stem, (1, 3, 3), (1, 2, 2), (0, 1, 1), bias=False)
        self.conv1_t = nn.Conv3d(stem, stem, (5, 1, 1), 1, (2, 0, 0), groups=stem, bias=False)
        self.bn1 = nn.BatchNorm3d(stem)
        # Stage widths double from the unexpanded stem width, then expand (pytorchvideo's create_x3d rounding).
        base, channels = _STEM_WIDTH, stem
        for stage, depth in enumerate(_STAGE_DEPTHS, start=1):
            width = round_width(base, gamma_w)
            planes = int(gamma_b * width)
            blocks = [X3DBlock(channels if i == 0 else width, planes, width, 2 if i == 0 else 1,
                               se_ratio if i % 2 == 0 else 0.0)
                      for i in range(round_repeats(depth, gamma_d))]
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
            base, channels = round_width(base, 2.0), width
        self.conv5 = nn.Conv3d(channels, planes, 1, bias=False)
        self.bn5 = nn.BatchNorm3d(planes)
        self.num_features = planes
        for m in self.modules():
            if isinstance(m, nn.Conv3d) and m.bias is None:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, X3DBlock):
                nn.init.zeros_(m.bn3.weight)  # each block starts as its shortcut (SlowFast's ZERO_INIT_FINAL_BN)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1_t(self.conv1_s(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.relu(self.bn5(self.conv5(x)))


class X3DHead(nn.Module):
    """Global average pool, ``fc1`` (the 2048-wide pre-logits 1x1x1 conv, no bias), ReLU, dropout, ``fc2``
    (the classifier)."""

    def __init__(self, in_features: int, num_classes: int, width: int = 2048, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(in_features, width, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, num_classes)
        nn.init.normal_(self.fc1.weight, 0, 0.01)
        nn.init.normal_(self.fc2.weight, 0, 0.01)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.fc1(x.mean((2, 3, 4), keepdim=True)))  # [N, width, 1, 1, 1]
        return self.fc2(self.dropout(x.flatten(1)))


class X3D(nn.Module):
    """X3D clip recognizer: ``[N, T, 3, H, W]`` clips to ``[N, num_classes]`` logits.

    Args:
        num_classes: classifier size.
        gamma_w, gamma_b, gamma_d, se_ratio: see :class:`X3DBackbone`.
        head_width: width of the pre-logits layer (2048 in the paper).
        dropout: dropout before the classifier (training only).
    """

    head_prefix = "head.fc2."
    online = False

    def __init__(self, num_classes: int, *, gamma_w: float = 2.0, gamma_b: float = 2.25, gamma_d: float = 2.2,
                 se_ratio: float = 1 / 16, head_width: int = 2048, dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone = X3DBackbone(gamma_w, gamma_b, gamma_d, se_ratio)
        self.head = X3DHead(self.backbone.num_features, num_classes, head_width, dropout)
        self.num_classes = num_classes

    def forward(self, clip: Tensor) -> Tensor:
        """Classify clips ``[N, T, 3, H, W]``."""
        if not torch.jit.is_tracing() and (clip.dim() != 5 or clip.shape[2] != 3):
            raise ValueError(f"clip must be [N, T, 3, H, W], got shape {tuple(clip.shape)}")
        x = clip.permute(0, 2, 1, 3, 4)  # [N, 3, T, H, W]
        return self.head(self.backbone(x))

    def step(self, frame: Tensor, state: object = None) -> NoReturn:
        """Clip models have no one-frame step; the pipeline runs them on a rolling window of frames."""
        raise RuntimeError(f"{type(self).__name__} is a clip model and has no online form; run it on a window "
                           "of clip_len frames")

    def checkpoint_converters(self) -> dict:
        """``format -> (state_dict) -> state_dict`` for every foreign layout this model loads (table below)."""
        return {"mmaction2": convert_mmaction2, "pytorchvideo": convert_pytorchvideo}


# -- checkpoint conversion ----------------------------------------------------------------------------------
#
#   mmaction2 (X3D + X3DHead)                        this package
#   backbone.conv1_s.conv                            backbone.conv1_s
#   backbone.conv1_t.conv / .bn                      backbone.conv1_t / backbone.bn1
#   backbone.layerK.i.convJ.conv / .bn               backbone.layerK.i.convJ / .bnJ          (J = 1, 2, 3)
#   backbone.layerK.i.se_module.fcJ                  backbone.layerK.i.se.fcJ
#   backbone.layerK.i.downsample.conv / .bn          backbone.layerK.i.downsample.0 / .1
#   backbone.conv5.conv / .bn                        backbone.conv5 / backbone.bn5
#   cls_head.fc1 [2048, C] (a linear layer)          head.fc1 [2048, C, 1, 1, 1]
#   cls_head.fc2                                     head.fc2
#
#   pytorchvideo (create_x3d; hub X3D_*.pyth)        this package
#   blocks.0.conv.conv_t  (the 1x3x3 conv: pytorchvideo's stem swaps the names)   backbone.conv1_s
#   blocks.0.conv.conv_xy (the 5x1x1 channel-wise conv)                            backbone.conv1_t
#   blocks.0.norm                                    backbone.bn1
#   blocks.K.res_blocks.i.branch2.conv_a / norm_a    backbone.layerK.i.conv1 / bn1
#   blocks.K.res_blocks.i.branch2.conv_b / norm_b.0  backbone.layerK.i.conv2 / bn2
#   blocks.K.res_blocks.i.branch2.norm_b.1.block.0/2 backbone.layerK.i.se.fc1 / fc2
#   blocks.K.res_blocks.i.branch2.conv_c / norm_c    backbone.layerK.i.conv3 / bn3
#   blocks.K.res_blocks.i.branch1_conv / branch1_norm backbone.layerK.i.downsample.0 / .1
#     (pytorchvideo has no branch1_norm where the width does not change, i.e. layer1.0: an identity BN is filled in)
#   blocks.5.pool.pre_conv / pre_norm                backbone.conv5 / backbone.bn5
#   blocks.5.pool.post_conv                          head.fc1
#   blocks.5.proj                                    head.fc2

_MMA_RULES = [
    (re.compile(r"^backbone\.conv1_s\.conv\."), "backbone.conv1_s."),
    (re.compile(r"^backbone\.conv1_t\.conv\."), "backbone.conv1_t."),
    (re.compile(r"^backbone\.conv1_t\.bn\."), "backbone.bn1."),
    (re.compile(r"^backbone\.conv5\.conv\."), "backbone.conv5."),
    (re.compile(r"^backbone\.conv5\.bn\."), "backbone.bn5."),
    (re.compile(r"^(backbone\.layer\d+\.\d+\.)conv(\d)\.conv\."), r"\1conv\2."),
    (re.compile(r"^(backbone\.layer\d+\.\d+\.)conv(\d)\.bn\."), r"\1bn\2."),
    (re.compile(r"^(backbone\.layer\d+\.\d+\.)se_module\."), r"\1se."),
    (re.compile(r"^(backbone\.layer\d+\.\d+\.)downsample\.conv\."), r"\1downsample.0."),
    (re.compile(r"^(backbone\.layer\d+\.\d+\.)downsample\.bn\."), r"\1downsample.1."),
    (re.compile(r"^cls_head\."), "head."),
]

_PTV_RULES = [
    (re.compile(r"^blocks\.0\.conv\.conv_t\."), "backbone.conv1_s."),
    (re.compile(r"^blocks\.0\.conv\.conv_xy\."), "backbone.conv1_t."),
    (re.compile(r"^blocks\.0\.norm\."), "backbone.bn1."),
    (re.compile(r"^blocks\.([1-4])\.res_blocks\.(\d+)\.branch2\.conv_a\."), r"backbone.layer\1.\2.conv1."),
    (re.compile(r"^blocks\.([1-4])\.res_blocks\.(\d+)\.branch2\.norm_a\."), r"backbone.layer\1.\2.bn1."),
    (re.compile(r"^blocks\.([1-4])\.res_blocks\.(\d+)\.branch2\.conv_b\."), r"backbone.layer\1.\2.conv2."),
    (re.compile(r"^blocks\.([1-4])\.res_blocks\.(\d+)\.branch2\.norm_b\.0\."), r"backbone.layer\1.\2.bn2."),
    (re.compile(r"^blocks\.([1-4])\.res_blocks\.(\d+)\.branch2\.norm_b\.1\.block\.0\."),
     r"backbone.layer\1.\2.se.fc1."),
    (re.compile(r"^blocks\.([1-4])\.res_blocks\.(\d+)\.branch2\.norm_b\.1\.block\.2\."),
     r"backbone.layer\1.\2.se.fc2."),
    (re.compile(r"^blocks\.([1-4])\.res_blocks\.(\d+)\.branch2\.conv_c\."), r"backbone.layer\1.\2.conv3."),
    (re.compile(r"^blocks\.([1-4])\.res_blocks\.(\d+)\.branch2\.norm_c\."), r"backbone.layer\1.\2.bn3."),
    (re.compile(r"^blocks\.([1-4])\.res_blocks\.(\d+)\.branch1_conv\."), r"backbone.layer\1.\2.downsample.0."),
    (re.compile(r"^blocks\.([1-4])\.res_blocks\.(\d+)\.branch1_norm\."), r"backbone.layer\1.\2.downsample.1."),
    (re.compile(r"^blocks\.5\.pool\.pre_conv\."), "backbone.conv5."),
    (re.compile(r"^blocks\.5\.pool\.pre_norm\."), "backbone.bn5."),
    (re.compile(r"^blocks\.5\.pool\.post_conv\."), "head.fc1."),
    (re.compile(r"^blocks\.5\.proj\."), "head.fc2."),
]


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, key, count=1)
        if n:
            return new
    return key  # left as is, so strict loading names it


def convert_mmaction2(state_dict: dict) -> dict:
    """mmaction2 Recognizer3D checkpoints of X3D (``backbone.*`` ConvModules, ``cls_head.fc1/fc2``)."""
    out = {}
    for key, value in state_dict.items():
        key = _rename(key, _MMA_RULES)
        if key == "head.fc1.weight" and value.dim() == 2:
            value = value[:, :, None, None, None]  # [2048, C] -> [2048, C, 1, 1, 1]
        out[key] = value
    return out


def convert_pytorchvideo(state_dict: dict) -> dict:
    """pytorchvideo / PySlowFast-pytorchvideo X3D checkpoints (``blocks.N.*``)."""
    out = {}
    for key, value in state_dict.items():
        out[_rename(key, _PTV_RULES)] = value
    # Where a stage's first block keeps its width (layer1), pytorchvideo's shortcut is a bare strided conv.
    for key in list(out):
        m = re.match(r"^(backbone\.layer\d+\.\d+\.downsample\.)0\.weight$", key)
        if m and not any(k.startswith(m.group(1) + "1.") for k in out):
            out.update(_identity_bn(m.group(1) + "1.", out[key].shape[0], out[key]))
    return out


def _identity_bn(prefix: str, channels: int, like: Tensor, eps: float = 1e-5) -> dict:
    """BatchNorm3d tensors (eps 1e-5) that pass their input through unchanged."""
    return {
        prefix + "weight": like.new_ones(channels),
        prefix + "bias": like.new_zeros(channels),
        prefix + "running_mean": like.new_zeros(channels),
        prefix + "running_var": like.new_full((channels,), 1.0 - eps),  # (x - 0) / sqrt(1 - eps + eps)
        prefix + "num_batches_tracked": torch.tensor(0),
    }


# -- named configurations -----------------------------------------------------------------------------------
#
# Parameter counts with 400 classes: pytorchvideo docs/source/model_zoo.md lists X3D XS/S/M at 3.79M and L at
# 6.15M. These models have 3,794,322 (XS/S/M) and 6,153,432 (L): pytorchvideo's plus the 48 parameters of the
# layer1.0 shortcut BN that SlowFast and mmaction2 have and pytorchvideo omits.

_X3D_DATA = {"num_classes": 400, "mean": (0.45, 0.45, 0.45), "std": (0.225, 0.225, 0.225)}


def _x3d(gamma_d: float):
    def build(num_classes: int, gamma_w: float = 2.0, gamma_b: float = 2.25, gamma_d: float = gamma_d,
              se_ratio: float = 1 / 16, head_width: int = 2048, dropout: float = 0.5) -> X3D:
        return X3D(num_classes, gamma_w=gamma_w, gamma_b=gamma_b, gamma_d=gamma_d, se_ratio=se_ratio,
                   head_width=head_width, dropout=dropout)

    return build


def _register_x3d(name: str, *, gamma_d: float, clip_len: int, frame_interval: int, input_size: int,
                  resize_size: int) -> None:
    description = (f"X3D-{name.rsplit('_', 1)[1].upper()}, {clip_len}x{frame_interval} clips at {input_size}px "
                   "(Kinetics-400 recipe)")
    register(name, kind="clip", description=description, input_size=input_size, resize_size=resize_size,
             clip_len=clip_len, num_segments=clip_len, frame_interval=frame_interval, **_X3D_DATA)(_x3d(gamma_d))


_register_x3d("x3d_xs", gamma_d=2.2, clip_len=4, frame_interval=12, input_size=160, resize_size=182)
_register_x3d("x3d_s", gamma_d=2.2, clip_len=13, frame_interval=6, input_size=160, resize_size=182)
_register_x3d("x3d_m", gamma_d=2.2, clip_len=16, frame_interval=5, input_size=224, resize_size=256)
_register_x3d("x3d_l", gamma_d=5.0, clip_len=16, frame_interval=5, input_size=312, resize_size=356)
