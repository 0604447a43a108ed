"""Temporal Interlacing Network (Shao, Qian and Liu, "Temporal Interlacing Network", AAAI 2020).

TIN replaces TSM's fixed one-frame shift with learned ones: in every residual branch, a fold of the channels
(``channels // shift_div``, a quarter in the published models) is moved along time by fractional offsets that a
small OffsetNet predicts from the clip, and each output frame is rescaled by a WeightNet. The offsets are
interlaced: the fold is split into four equal groups moved by ``+o0, +o1, -o0, -o1``::

    x [N*T, C, H, W] ─┬─ fold [0, F) ──┬─► mean(H, W) ─► [N, F, T] ─┬─► OffsetNet ─► o0, o1 in (-2, 2)
                      │                │                            └─► WeightNet ─► w0(t), w1(t) in (0, 2)
                      │                └─► sample group g at t - offset_g ─► x weight_g(t) ─┐
                      └─ [F, C) ─────────────────────────────────────────────────────────── cat ─► same shape

    group   channels        offset   weight
      0     [0,    F/4)     +o0      w0(t)
      1     [F/4,  F/2)     +o1      w1(t)
      2     [F/2, 3F/4)     -o0      w0(t)
      3     [3F/4,  F)      -o1      w1(t)

Sampling is linear interpolation along time with zeros outside the clip: output frame t of a channel moved by
offset o is ``(1 - f) x[t - k] + f x[t - k - 1]`` with ``k = floor(o)``, ``f = o - k`` (the convention of the
official ``tin_shift`` CUDA op, which mmcv and mmaction2 share). Here it is a one-hot matmul over T in plain torch,
so it runs on any device and exports to ONNX, and its gradient with respect to the offset equals the official op's.

The interlace sits where TSM's shift does, on the residual branch of every block (``blockres``). TIN samples
future frames and has no online form.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .registry import register
from .resnet import ResNet, mmaction2_key
from .shift import ShiftableBlock
from .tsm import TSM, rename_head

DEFORM_GROUPS = 2  # fixed in the official code and in mmaction2; each group is moved both ways
MAX_OFFSET = 2.0  # offsets are 4 * (sigmoid - 1/2), in (-2, 2) frames, as in the official code


class OffsetNet(nn.Module):
    """Clip-level temporal offsets: ``[N, F, T]`` pooled fold -> ``[N, groups]`` offsets in (-2, 2) frames.

    Conv1d over time (kernel 3) to one channel, then fc (T -> T), ReLU, fc (T -> groups), ``4 (sigmoid - 1/2)``.
    """

    def __init__(self, in_channels: int, num_segments: int, groups: int = DEFORM_GROUPS) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, 1, 3, padding=1)
        self.fc1 = nn.Linear(num_segments, num_segments)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(num_segments, groups)
        nn.init.constant_(self.fc2.bias, 0.5108)  # the official init: offsets start near +0.5 frame

    def forward(self, pooled: Tensor) -> Tensor:
        x = self.conv(pooled).flatten(1)  # [N, T]
        x = self.fc2(self.relu(self.fc1(x)))  # [N, groups]
        return 2 * MAX_OFFSET * (torch.sigmoid(x) - 0.5)


class WeightNet(nn.Module):
    """Per-frame weights: ``[N, F, T]`` pooled fold -> ``[N, T, groups]`` in (0, 2), 1 at initialization."""

    def __init__(self, in_channels: int, groups: int = DEFORM_GROUPS) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, groups, 3, padding=1)
        nn.init.zeros_(self.conv.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        return 2 * torch.sigmoid(self.conv(pooled)).transpose(1, 2)  # [N, T, groups]


def linear_sampler(x: Tensor, offset: Tensor) -> Tensor:
    """Move every channel of a clip along time by a fractional offset, with linear interpolation.

    Args:
        x: ``[N, T, C, H, W]``.
        offset: ``[N, C]`` in frames; channel c of clip n is moved forward by ``offset[n, c]``.

    Returns:
        ``[N, T, C, H, W]`` with ``out[n, t, c] = (1 - f) x[n, t - k, c] + f x[n, t - k - 1, c]``,
        ``k = floor(offset[n, c])``, ``f = offset[n, c] - k``, and frames outside ``[0, T)`` reading as zero.
    """
    n, t, c, h, w = x.shape
    k = offset.floor()
    f = (offset - k)[:, :, None, None]  # [N, C, 1, 1]; floor has no gradient, f carries the offset's
    k = k[:, :, None, None]
    frames = torch.arange(t, device=x.device, dtype=x.dtype)
    lag = (frames[:, None] - frames[None, :])[None, None]  # [1, 1, T, T]: output frame t minus input frame s
    # [N, C, T, T]: row t of channel c mixes input frames t - k (1 - f) and t - k - 1 (f); rows reaching outside
    # the clip lose those terms, which is the zero padding.
    mix = (1 - f) * (lag == k).to(x.dtype) + f * (lag == k + 1).to(x.dtype)
    frames_last = x.permute(0, 2, 1, 3, 4).reshape(n, c, t, h * w)  # [N, C, T, H*W]
    out = mix @ frames_last  # [N, C, T, H*W]
    return out.view(n, c, t, h, w).permute(0, 2, 1, 3, 4)  # [N, T, C, H, W]


class TemporalInterlace(nn.Module):
    """The temporal interlace of one residual branch, in clip form: ``[N*T, C, H, W]`` -> same shape.

    Args:
        in_channels: C.
        num_segments: frames per clip T (OffsetNet's fc layers are T wide).
        shift_div: the interlaced fold is ``in_channels // shift_div`` channels.
    """

    def __init__(self, in_channels: int, num_segments: int, shift_div: int = 4) -> None:
        super().__init__()
        fold = in_channels // shift_div
        if fold < 1:
            raise ValueError(f"fold must be >= 1, got {fold} ({in_channels} channels, shift_div={shift_div})")
        self.num_segments, self.fold = num_segments, fold
        self.offset_net = OffsetNet(fold, num_segments)
        self.weight_net = WeightNet(fold)
        # Group of each fold channel: four equal contiguous groups (as in the official op) when 4 divides the
        # fold; spread as evenly as possible otherwise (tiny test widths).
        groups = 2 * DEFORM_GROUPS
        self.register_buffer("channel_group", torch.arange(fold) * groups // fold, persistent=False)

    def extra_repr(self) -> str:
        return f"num_segments={self.num_segments}, fold={self.fold}"

    def offsets_and_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel offsets ``[N, F]`` and per-frame weights ``[N, T, F]`` for a clip ``[N, T, C, H, W]``."""
        pooled = x[:, :, : self.fold].mean((3, 4)).transpose(1, 2)  # [N, F, T]
        offset = self.offset_net(pooled)  # [N, groups]
        weight = self.weight_net(pooled)  # [N, T, groups]
        # Groups 0..3 move by +o0, +o1, -o0, -o1 with weights w0, w1, w0, w1.
        offset = torch.cat([offset, -offset], 1)[:, self.channel_group]  # [N, F]
        weight = torch.cat([weight, weight], 2)[:, :, self.channel_group]  # [N, T, F]
        return offset, weight

    def forward(self, x: Tensor) -> Tensor:
        nt, c, h, w = x.shape
        t = self.num_segments
        if nt % t:
            raise ValueError(f"clip input must have N*T rows with T={t}, got {nt} rows")
        x = x.view(nt // t, t, c, h, w)  # [N, T, C, H, W]
        offset, weight = self.offsets_and_weights(x)
        moved = linear_sampler(x[:, :, : self.fold], offset) * weight[:, :, :, None, None]  # [N, T, F, H, W]
        return torch.cat([moved, x[:, :, self.fold :]], 2).view(nt, c, h, w)


def insert_interlace(backbone: ResNet, num_segments: int, shift_div: int = 4) -> list[ShiftableBlock]:
    """Put a :class:`TemporalInterlace` in the shift slot of every residual block (blockres), as TIN does."""
    blocks = []
    for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        for block in layer:
            block.shift = TemporalInterlace(block.in_channels, num_segments, shift_div)
            block.shift_place = "blockres"
            blocks.append(block)
    return blocks


class TIN(TSM):
    """A ResNet with a temporal interlace in every residual branch and a TSN head.

    Args:
        backbone: a :class:`ResNet`.
        num_classes: classifier size.
        num_segments: frames per clip T.
        shift_div: each interlace moves ``channels // shift_div`` channels.
        dropout: dropout before the classifier (training only).
    """

    online = False

    def __init__(self, backbone: ResNet, num_classes: int, *, num_segments: int = 8, shift_div: int = 4,
                 dropout: float = 0.5) -> None:
        if not isinstance(backbone, ResNet):
            raise ValueError(f"TIN is built on ResNet backbones, got {type(backbone).__name__}")
        super().__init__(backbone, num_classes, num_segments=num_segments, shift_mode="none", dropout=dropout)
        # Not a TSM shift: no checkpoint shift-direction check applies, and clips must have T frames.
        self.shift_mode = "interlace"
        self.interlaced_blocks = insert_interlace(backbone, num_segments, shift_div)

    def step(self, frame: Tensor, state=None):
        raise RuntimeError("TIN samples future frames (learned offsets both ways) and has no online form; run it on "
                           "a window of num_segments frames")

    def checkpoint_converters(self) -> dict:
        return {"mit-han-lab": convert_official_tin, "mmaction2": convert_mmaction2_tin}


# -- checkpoint conversion ----------------------------------------------------------------------------------
#
#   format        source key (under layerK.i.)                       this package (backbone.layerK.i.)
#   mmaction2     conv1.conv.net1.offset_net.{conv,fc1,fc2}.*        shift.offset_net.{conv,fc1,fc2}.*
#   (CombineNet   conv1.conv.net1.weight_net.conv.*                  shift.weight_net.conv.*
#    in conv1)    conv1.conv.net2.*  (the wrapped conv)              conv1.*
#                 other backbone.* keys                              ResNet's mmaction2 rule
#                 cls_head.fc_cls.*                                  fc.*
#   mit-han-lab   conv1.net1.biasnet.net.{conv,fc,lastlayer}.*       shift.offset_net.{conv,fc1,fc2}.*
#   (official TIN conv1.net1.weightnet.net.lastlayer.*               shift.weight_net.conv.*
#    release, TSN conv1.net2.*                                       conv1.*
#    wrapper)     [module.]base_model.X / [module.]new_fc.*          backbone.X / fc.*

_MMA_TIN = re.compile(r"^(layer\d+\.\d+\.)conv1\.conv\.net([12])\.(.+)$")
_OFFICIAL_TIN = re.compile(r"^(layer\d+\.\d+\.)conv1\.net([12])\.(.+)$")
_OFFICIAL_NETS = {"biasnet.net.conv.": "offset_net.conv.", "biasnet.net.fc.": "offset_net.fc1.",
                  "biasnet.net.lastlayer.": "offset_net.fc2.", "weightnet.net.lastlayer.": "weight_net.conv."}


def convert_mmaction2_tin(state_dict: dict) -> dict:
    """mmaction2 TIN (ResNetTIN, Recognizer2D) checkpoints to this package's layout."""
    out = {}
    for key, value in state_dict.items():
        head = rename_head(key, ("cls_head.fc_cls",))
        if head:
            out[head] = value
        elif key.startswith("backbone."):
            key = key.removeprefix("backbone.")
            m = _MMA_TIN.match(key)
            if m and m.group(2) == "1":
                key = f"{m.group(1)}shift.{m.group(3)}"
            else:
                key = mmaction2_key(f"{m.group(1)}conv1.conv.{m.group(3)}" if m else key)
            out["backbone." + key] = value
        else:
            out[key] = value  # left as is, so strict loading names it
    return out


def convert_official_tin(state_dict: dict) -> dict:
    """Official TIN checkpoints (deepcs233/TIN, the TSM codebase's TSN wrapper) to this package's layout."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        head = rename_head(key, ("new_fc",))
        if head:
            out[head] = value
            continue
        key = key.removeprefix("base_model.")
        m = _OFFICIAL_TIN.match(key)
        if m and m.group(2) == "1":
            rest = m.group(3)
            for old, new in _OFFICIAL_NETS.items():
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            key = f"{m.group(1)}shift.{rest}"
        elif m:
            key = f"{m.group(1)}conv1.{m.group(3)}"
        out["backbone." + key] = value
    return out


# -- named configurations -----------------------------------------------------------------------------------


def _tin_r50(num_classes: int, num_segments: int = 8, shift_div: int = 4, dropout: float = 0.5,
             width: int = 64) -> TIN:
    return TIN(ResNet(50, width), num_classes, num_segments=num_segments, shift_div=shift_div, dropout=dropout)


# mmaction2's tin_r50 / tin_kinetics400-pretrained-tsm-r50_1x1x8-50e_kinetics400-rgb: ResNetTIN depth 50,
# shift_div=4, 8 segments, every block interlaced; ImageNet mean/std.
register("tin_r50", kind="clip", num_classes=400, num_segments=8, clip_len=8, frame_interval=8,
         description="offline TIN, ResNet-50, temporal interlace of 1/4 of the channels in every residual branch, "
                     "8 segments")(_tin_r50)
