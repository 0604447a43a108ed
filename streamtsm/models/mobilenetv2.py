"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018), the
backbone of the online TSM.

Parameter names follow the official TSM online checkpoint (torchvision's nest each conv + BN + ReLU6 one level
deeper; :func:`from_torchvision` renames them)::

    features.0.{0,1}        stem: 3x3 conv stride 2, BN (ReLU6 at .2)
    features.1..17.conv.M   inverted residual blocks (M indexes conv/BN/ReLU6 inside the block)
    features.18.{0,1}       last 1x1 conv, BN

The shift goes before the first 1x1 conv of every block that has a residual connection (10 blocks at width 1.0).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import Tensor, nn

from .shift import ShiftableBlock, TemporalShift

# expand ratio t, output channels c, repeats n, first stride s
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never going more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    ]


class InvertedResidual(ShiftableBlock):
    """1x1 expand -> 3x3 depth-wise -> 1x1 linear projection, with a residual when stride 1 and in == out."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.in_channels = inp
        self.use_res_connect = stride == 1 and inp == oup
        hidden = round(inp * expand_ratio)
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += _conv_bn_relu(inp, hidden, 1, 1)
        layers += _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden)
        layers += [nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def _body(self, identity: Tensor, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return identity + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor: ``[N, 3, H, W] -> [N, num_features]`` (global average pooled).

    Args:
        width_mult: channel width multiplier (1.0 is the published network).
    """

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()
        channels = make_divisible(32 * width_mult)
        self.num_features = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(3, channels, 3, 2))]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(nn.Sequential(*_conv_bn_relu(channels, self.num_features, 1, 1)))
        self.features = nn.Sequential(*features)
        _init_weights(self)

    def insert_shift(self, num_segments: int, shift_div: int, mode: str, place: str = "blockres",
                     temporal_pool: bool = False) -> list[ShiftableBlock]:
        """Put a temporal shift into every inverted residual block that has a residual connection."""
        if temporal_pool:
            raise ValueError("temporal_pool is only supported for ResNet backbones")
        shifted = []
        for block in self.features:
            if isinstance(block, InvertedResidual) and block.use_res_connect:
                block.shift = TemporalShift(num_segments, block.in_channels // shift_div, mode)
                block.shift_place = place
                shifted.append(block)
        return shifted

    def step_modules(self) -> Iterator[nn.Module]:
        """Modules in execution order, for the online step loop."""
        return iter(self.features)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean((2, 3))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint keys. mmaction2's MobileNetV2 names stages and wraps each conv with its BN in a ConvModule:
#
#   mmaction2                          this package (backbone.*)
#   conv1.conv / conv1.bn              features.0.0 / features.0.1
#   layerK.i.conv.M.conv / .bn         features.N.conv.(3M) / features.N.conv.(3M+1), N counts blocks from 1
#   conv2.conv / conv2.bn              features.18.0 / features.18.1
# ---------------------------------------------------------------------------------------------------------------

_STAGE_OFFSETS = [1]
for _t, _c, _n, _s in INVERTED_RESIDUAL_SETTING:
    _STAGE_OFFSETS.append(_STAGE_OFFSETS[-1] + _n)
_LAST_FEATURE = _STAGE_OFFSETS[-1]
_MMA_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.conv\.(\d+)\.(conv|bn)\.(.+)$")
_MMA_STEM = re.compile(r"^conv([12])\.(conv|bn)\.(.+)$")


def mmaction2_key(key: str) -> str:
    """Map one mmaction2 MobileNetV2 backbone key (without ``backbone.``) to this package's layout."""
    m = _MMA_BLOCK.match(key)
    if m:
        stage, index, module, kind, rest = m.groups()
        feature = _STAGE_OFFSETS[int(stage) - 1] + int(index)
        position = 3 * int(module) + (1 if kind == "bn" else 0)
        return f"features.{feature}.conv.{position}.{rest}"
    m = _MMA_STEM.match(key)
    if m:
        which, kind, rest = m.groups()
        feature = 0 if which == "1" else _LAST_FEATURE
        return f"features.{feature}.{1 if kind == 'bn' else 0}.{rest}"
    return key


def to_mmaction2_key(key: str) -> str:
    """Inverse of :func:`mmaction2_key` (used to build test checkpoints in mmaction2's layout)."""
    m = re.match(r"^features\.(\d+)\.(conv\.)?(\d+)\.(.+)$", key)
    if not m:
        return key
    feature, in_block, position, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
    kind = "bn" if position % 3 == 1 else "conv"
    if in_block:
        stage = max(i for i, off in enumerate(_STAGE_OFFSETS[:-1]) if off <= feature)
        return f"layer{stage + 1}.{feature - _STAGE_OFFSETS[stage]}.conv.{position // 3}.{kind}.{rest}"
    return f"conv{1 if feature == 0 else 2}.{kind}.{rest}"


# ---------------------------------------------------------------------------------------------------------------
# torchvision (0.3 and later) wraps each conv + BN + ReLU6 of a block in a Sequential of its own, and leaves the
# projection conv and its BN flat after them; k is the number of wrapped groups in the block (1 or 2):
#
#   torchvision                        this package
#   features.N.conv.A.B (A < k)        features.N.conv.(3A + B)
#   features.N.conv.J   (J = k, k + 1) features.N.conv.(2k + J)
#   features.0.*, features.18.*        the same
# ---------------------------------------------------------------------------------------------------------------

_TV_WRAPPED = re.compile(r"^(features\.\d+\.conv\.)(\d+)\.(\d+)\.(.+)$")
_TV_FLAT = re.compile(r"^(features\.\d+\.conv\.)(\d+)\.(.+)$")


def from_torchvision(state_dict: dict) -> dict:
    """torchvision's MobileNetV2 keys renamed to this package's; keys of any other layout are left as they are."""
    wrapped: dict[str, set[int]] = {}
    for key in state_dict:
        m = _TV_WRAPPED.match(key)
        if m:
            wrapped.setdefault(m.group(1), set()).add(int(m.group(2)))
    out = {}
    for key, value in state_dict.items():
        m = _TV_WRAPPED.match(key)
        if m:
            key = f"{m.group(1)}{3 * int(m.group(2)) + int(m.group(3))}.{m.group(4)}"
        elif (m := _TV_FLAT.match(key)) and m.group(1) in wrapped:
            key = f"{m.group(1)}{2 * len(wrapped[m.group(1)]) + int(m.group(2))}.{m.group(3)}"
        out[key] = value
    return out
