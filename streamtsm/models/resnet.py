"""ResNet-18/34/50/101 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016), the backbone of
the offline TSM checkpoints.

Parameter names follow torchvision and the official TSM releases: ``conv1``, ``bn1``, ``layerK.i.conv1..3``,
``layerK.i.bn1..3``, ``layerK.i.downsample.{0,1}``. The stride sits on the 3x3 conv (the "v1.5" layout that both
torchvision and mmaction2's ``style='pytorch'`` use).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from .shift import ShiftableBlock, TemporalShift


def _conv3x3(inp: int, oup: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, oup, 3, stride, 1, bias=False)


class BasicBlock(ShiftableBlock):
    expansion = 1

    def __init__(self, inp: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.in_channels = inp
        self.conv1 = _conv3x3(inp, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def _body(self, identity: Tensor, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(identity)
        return self.relu(out + identity)


class Bottleneck(ShiftableBlock):
    expansion = 4

    def __init__(self, inp: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.in_channels = inp
        self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def _body(self, identity: Tensor, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(identity)
        return self.relu(out + identity)


RESNET_SETTINGS: dict[int, tuple[type[ShiftableBlock], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet feature extractor: ``[N, 3, H, W] -> [N, num_features]`` (global average pooled).

    Args:
        depth: 18, 34, 50 or 101.
        width: channels of the stem and of layer1's 3x3 convs (64 in the published networks; smaller for tests).
    """

    def __init__(self, depth: int = 50, width: int = 64) -> None:
        super().__init__()
        if depth not in RESNET_SETTINGS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_SETTINGS)}, got {depth}")
        block, repeats = RESNET_SETTINGS[depth]
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = width
        layers = []
        for stage, n in enumerate(repeats):
            planes, stride = width * 2**stage, 1 if stage == 0 else 2
            downsample = None
            if stride != 1 or channels != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(channels, planes * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            blocks = [block(channels, planes, stride, downsample)]
            channels = planes * block.expansion
            blocks += [block(channels, planes) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.num_features = channels
        # Offline only: number of frames per clip entering layer2, which max-pools time by 2 (TSM's temporal_pool).
        self.temporal_pool_segments = 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def insert_shift(self, num_segments: int, shift_div: int, mode: str, place: str = "blockres",
                     temporal_pool: bool = False) -> list[ShiftableBlock]:
        """Shift every block; in a stage of >= 23 blocks (ResNet-101's layer3) every second block, as in TSM."""
        if temporal_pool:
            if num_segments % 2:
                raise ValueError(f"temporal_pool needs an even num_segments, got {num_segments}")
            self.temporal_pool_segments = num_segments
        shifted = []
        for stage, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            segments = num_segments // 2 if temporal_pool and stage > 0 else num_segments
            every = 2 if len(layer) >= 23 else 1
            for i, block in enumerate(layer):
                if i % every == 0:
                    block.shift = TemporalShift(segments, block.in_channels // shift_div, mode)
                    block.shift_place = place
                    shifted.append(block)
        return shifted

    def step_modules(self) -> Iterator[nn.Module]:
        """Modules in execution order, for the online step loop."""
        yield from (self.conv1, self.bn1, self.relu, self.maxpool)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            yield from layer

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        if self.temporal_pool_segments:
            x = _temporal_max_pool(x, self.temporal_pool_segments)
        x = self.layer4(self.layer3(self.layer2(x)))
        return x.mean((2, 3))


def _temporal_max_pool(x: Tensor, num_segments: int) -> Tensor:
    nt, c, h, w = x.shape
    x = x.view(nt // num_segments, num_segments, c, h, w).transpose(1, 2)  # [N, C, T, H, W]
    x = F.max_pool3d(x, kernel_size=(3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))
    return x.transpose(1, 2).reshape(-1, c, h, w)  # [N*T/2, C, H, W]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint keys. mmaction2 wraps each conv with its BN in a ConvModule:
#
#   mmaction2                                this package (backbone.*)
#   conv1.conv / conv1.bn                    conv1 / bn1
#   layerK.i.convJ.conv / layerK.i.convJ.bn  layerK.i.convJ / layerK.i.bnJ
#   layerK.i.downsample.conv / .bn           layerK.i.downsample.0 / .1
# ---------------------------------------------------------------------------------------------------------------

_MMA_CONV = re.compile(r"^(.*?)conv(\d)\.(conv|bn)\.(.+)$")
_MMA_DOWN = re.compile(r"^(.*)downsample\.(conv|bn)\.(.+)$")


def mmaction2_key(key: str) -> str:
    """Map one mmaction2 ResNet backbone key (without ``backbone.``) to this package's layout."""
    m = _MMA_DOWN.match(key)
    if m:
        prefix, kind, rest = m.groups()
        return f"{prefix}downsample.{0 if kind == 'conv' else 1}.{rest}"
    m = _MMA_CONV.match(key)
    if m:
        prefix, j, kind, rest = m.groups()
        return f"{prefix}{kind}{j}.{rest}" if kind == "bn" else f"{prefix}conv{j}.{rest}"
    return key


def to_mmaction2_key(key: str) -> str:
    """Inverse of :func:`mmaction2_key` (used to build test checkpoints in mmaction2's layout)."""
    m = re.match(r"^(.*)downsample\.([01])\.(.+)$", key)
    if m:
        return f"{m.group(1)}downsample.{'conv' if m.group(2) == '0' else 'bn'}.{m.group(3)}"
    m = re.match(r"^(.*?)(conv|bn)(\d)\.(.+)$", key)
    if m:
        return f"{m.group(1)}conv{m.group(3)}.{m.group(2)}.{m.group(4)}"
    return key
