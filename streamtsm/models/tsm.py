"""Temporal Shift Module recognizers (Lin, Gan and Han, ICCV 2019), offline and online.

:class:`TSM` is a TSN-style recognizer: a 2D backbone with temporal shifts inside, a head of dropout and a linear
classifier, and average consensus over the segments of a clip. One set of weights serves two forms:

- ``model(clip)``: the offline form, a clip ``[N*T, 3, H, W]`` (or ``[N, T, 3, H, W]``) at once;
- ``logits, state = model.step(frame, state)``: the online form, one frame ``[B, 3, H, W]`` of each of B streams
  and the folds cached at the previous step, one tensor ``[B, fold, h, w]`` per shifted block. Its output at each
  frame equals the offline uni-directional model run on the whole clip with per-frame output.

The state is an explicit value, never a module buffer, so it exports to ONNX as graph inputs/outputs and batches
across streams (row b of every state tensor belongs to stream b).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import mobilenetv2, resnet
from .mobilenetv2 import MobileNetV2
from .registry import register
from .resnet import ResNet
from .shift import SHIFT_MODES, SHIFT_PLACES, ShiftableBlock

State = tuple[Tensor, ...]


class TSM(nn.Module):
    """A 2D backbone with temporal shifts and a TSN head.

    Args:
        backbone: a feature extractor with ``insert_shift``, ``step_modules`` and ``num_features``
            (:class:`MobileNetV2`, :class:`ResNet`).
        num_classes: classifier size.
        num_segments: frames per clip T of the offline form.
        shift_div: a shifted block moves ``channels // shift_div`` channels in each direction.
        shift_mode: ``"unidirectional"`` (online-capable), ``"bidirectional"`` (offline), or ``"none"`` (TSN).
        shift_place: ``"blockres"`` (residual branch only) or ``"block"`` (whole block input).
        temporal_pool: halve T after layer1 (ResNet only; offline only).
        dropout: dropout before the classifier (training only).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, num_segments: int = 8, shift_div: int = 8,
                 shift_mode: str = "bidirectional", shift_place: str = "blockres", temporal_pool: bool = False,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if shift_mode not in (*SHIFT_MODES, "none"):
            raise ValueError(f"shift_mode must be one of {(*SHIFT_MODES, 'none')}, got {shift_mode!r}")
        if shift_place not in SHIFT_PLACES:
            raise ValueError(f"shift_place must be one of {SHIFT_PLACES}, got {shift_place!r}")
        if num_segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(backbone.num_features, num_classes)
        nn.init.normal_(self.fc.weight, 0, 0.001)
        nn.init.zeros_(self.fc.bias)
        self.num_classes = num_classes
        self.num_segments = num_segments
        self.shift_mode = shift_mode
        self.temporal_pool = temporal_pool
        self.shifted_blocks: list[ShiftableBlock] = []
        if shift_mode != "none":
            self.shifted_blocks = backbone.insert_shift(num_segments, shift_div, shift_mode, shift_place, temporal_pool)
        elif temporal_pool:
            backbone.insert_shift(num_segments, shift_div, "bidirectional", shift_place, temporal_pool)
            for block in backbone.modules():
                if isinstance(block, ShiftableBlock):
                    block.shift = None
        self._state_shapes: dict[tuple[int, int], list[tuple[int, int, int]]] = {}

    # -- offline form ---------------------------------------------------------------------------------------

    def forward(self, x: Tensor, per_frame: bool = False) -> Tensor:
        """Classify clips.

        Args:
            x: ``[N*T, 3, H, W]`` with ``T = num_segments``, or ``[N, T, 3, H, W]``.
            per_frame: return ``[N, T', K]`` logits for every frame (T' = T, or T/2 with temporal_pool) instead of
                the ``[N, K]`` average over the clip.
        """
        t = self.num_segments
        if x.dim() == 5:
            if self.shift_mode != "none" and x.shape[1] != t:
                raise ValueError(f"clip must have T={t} frames (num_segments), got {x.shape[1]}")
            n = x.shape[0]
            x = x.flatten(0, 1)  # [N*T, 3, H, W]
        elif x.dim() == 4:
            if x.shape[0] % t:
                raise ValueError(f"clip input [N*T, 3, H, W] must have a multiple of T={t} rows, got {x.shape[0]}")
            n = x.shape[0] // t
        else:
            raise ValueError(f"clip input must be [N*T, 3, H, W] or [N, T, 3, H, W], got shape {tuple(x.shape)}")
        logits = self.fc(self.dropout(self.backbone(x)))
        logits = logits.view(n, -1, self.num_classes)  # [N, T', K]
        return logits if per_frame else logits.mean(1)

    # -- checkpoints ----------------------------------------------------------------------------------------

    head_prefix = "fc."

    def checkpoint_converters(self) -> dict:
        """``format -> (state_dict) -> state_dict`` for every foreign layout this model loads (table below)."""
        family = mobilenetv2 if isinstance(self.backbone, MobileNetV2) else resnet
        return {
            "mit-han-lab": convert_mit_han_lab,
            "mmaction2": make_mmaction2_converter(family.mmaction2_key),
            "plain": convert_plain,
        }

    # -- online form ----------------------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """True when the model has a step form (uni-directional shift or none, no temporal pooling)."""
        return self.shift_mode in ("unidirectional", "none") and not self.temporal_pool

    def step(self, frame: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Run one frame of each of B streams.

        Args:
            frame: ``[B, 3, H, W]``.
            state: the state returned by the previous step (or :meth:`init_state`); None starts from zeros.

        Returns:
            ``[B, num_classes]`` logits and the new state.
        """
        if not self.online:
            why = "temporal pooling" if self.temporal_pool else f"a {self.shift_mode} shift"
            raise RuntimeError(f"this model has {why} and no online form; build it with "
                               "shift_mode='unidirectional' and temporal_pool=False")
        self._check_step_inputs(frame, state)
        return self.step_unchecked(frame, state)

    def step_unchecked(self, frame: Tensor, state: State | None) -> tuple[Tensor, State]:
        """:meth:`step` without input validation (the traced graph of ONNX export)."""
        x, new_state = frame, []
        for module in self.backbone.step_modules():
            if isinstance(module, ShiftableBlock) and module.shift is not None:
                cached = None if state is None else state[len(new_state)]
                if cached is None:
                    cached = x.new_zeros(x.shape[0], module.shift.fold, x.shape[2], x.shape[3])
                x, cached = module.step(x, cached)
                new_state.append(cached)
            else:
                x = module(x)
        logits = self.fc(self.dropout(x.mean((2, 3))))
        return logits, tuple(new_state)

    def state_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """``(fold, h, w)`` of every state tensor for frames of ``height x width``, in block order."""
        key = (height, width)
        if key not in self._state_shapes:
            param = next(self.parameters())
            with torch.no_grad():
                frame = torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)
                _, state = self.step_unchecked(frame, None)
            self._state_shapes[key] = [tuple(s.shape[1:]) for s in state]
        return self._state_shapes[key]

    def init_state(self, batch: int, height: int, width: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> State:
        """Zero state for ``batch`` streams of ``height x width`` frames."""
        param = next(self.parameters())
        device = param.device if device is None else device
        dtype = param.dtype if dtype is None else dtype
        return tuple(torch.zeros(batch, *s, device=device, dtype=dtype) for s in self.state_shapes(height, width))

    @staticmethod
    def reset_state(state: State, streams: Tensor | list[int]) -> State:
        """A copy of ``state`` with the rows of ``streams`` (indices or a ``[B]`` bool mask) set to zero."""
        new_state = tuple(s.clone() for s in state)
        for s in new_state:
            s[streams] = 0
        return new_state

    def _check_step_inputs(self, frame: Tensor, state: State | None) -> None:
        if not isinstance(frame, Tensor) or frame.dim() != 4 or frame.shape[1] != 3:
            shape = tuple(frame.shape) if isinstance(frame, Tensor) else type(frame).__name__
            raise ValueError(f"frame must be a [B, 3, H, W] tensor, got {shape}")
        if state is None:
            return
        b, _, h, w = frame.shape
        expected = self.state_shapes(h, w)
        if not isinstance(state, (tuple, list)) or len(state) != len(expected):
            got = len(state) if isinstance(state, (tuple, list)) else type(state).__name__
            raise ValueError(f"state must hold {len(expected)} tensors (one per shifted block), got {got}")
        for i, (s, shape) in enumerate(zip(state, expected)):
            if not isinstance(s, Tensor) or s.dim() != 4:
                got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(f"state[{i}] must be a [B, {shape[0]}, {shape[1]}, {shape[2]}] tensor, got {got}")
            if s.shape[0] != b:
                raise ValueError(f"state[{i}] holds {s.shape[0]} streams but the frame batch has {b}")
            if tuple(s.shape[1:]) != shape:
                raise ValueError(f"state[{i}] must have shape {(b, *shape)} for {h}x{w} frames, "
                                 f"got {tuple(s.shape)}")


# -- named configurations -----------------------------------------------------------------------------------


def _tsm_mobilenetv2(num_classes: int, num_segments: int = 8, shift_div: int = 8,
                     shift_mode: str = "bidirectional", shift_place: str = "blockres", temporal_pool: bool = False,
                     dropout: float = 0.5, width_mult: float = 1.0) -> TSM:
    return TSM(MobileNetV2(width_mult), num_classes, num_segments=num_segments, shift_div=shift_div,
               shift_mode=shift_mode, shift_place=shift_place, temporal_pool=temporal_pool, dropout=dropout)


def _tsm_resnet(depth: int):
    def build(num_classes: int, num_segments: int = 8, shift_div: int = 8, shift_mode: str = "bidirectional",
              shift_place: str = "blockres", temporal_pool: bool = False, dropout: float = 0.5,
              width: int = 64) -> TSM:
        return TSM(ResNet(depth, width), num_classes, num_segments=num_segments, shift_div=shift_div,
                   shift_mode=shift_mode, shift_place=shift_place, temporal_pool=temporal_pool, dropout=dropout)

    return build


def _register_tsm(name: str, builder, *, kind: str, description: str, **defaults) -> None:
    register(name, kind=kind, description=description, **defaults)(builder)


_KINETICS = {"num_classes": 400, "num_segments": 8}
# Offline TSM is trained on 8 segments spread over whole clips; live, its window is 8 frames 8 apart (~2 s at 30 fps).
_WINDOW = {"frame_interval": 8}
_register_tsm("tsm_mobilenetv2_online", _tsm_mobilenetv2, kind="online",
              description="online TSM, MobileNetV2, uni-directional shift (official online demo layout)",
              num_classes=27, shift_mode="unidirectional", num_segments=8)
_register_tsm("tsm_mobilenetv2", _tsm_mobilenetv2, kind="clip",
              description="offline TSM, MobileNetV2, bi-directional shift, 8 segments", **_KINETICS, **_WINDOW)
_register_tsm("tsn_mobilenetv2", _tsm_mobilenetv2, kind="online",
              description="TSN baseline, MobileNetV2, no shift (a per-frame 2D CNN)", shift_mode="none", **_KINETICS)
for _depth in (18, 34, 50, 101):
    _register_tsm(f"tsm_r{_depth}", _tsm_resnet(_depth), kind="clip",
                  description=f"offline TSM, ResNet-{_depth}, bi-directional residual shift, 8 segments",
                  **_KINETICS, **_WINDOW)
_register_tsm("tsm_r18_online", _tsm_resnet(18), kind="online",
              description="online TSM, ResNet-18, uni-directional residual shift (the shipped demo model's family)",
              shift_mode="unidirectional", **_KINETICS)
_register_tsm("tsm_r50_online", _tsm_resnet(50), kind="online",
              description="online TSM, ResNet-50, uni-directional residual shift", shift_mode="unidirectional",
              **_KINETICS)
_register_tsm("tsn_r50", _tsm_resnet(50), kind="online",
              description="TSN baseline, ResNet-50, no shift (a per-frame 2D CNN)", shift_mode="none", **_KINETICS)


# -- checkpoint conversion ----------------------------------------------------------------------------------
#
#   format         source key                                   this package
#   mit-han-lab    [module.]base_model.X (.net. in shifted convs, backbone.X (.net removed)
#                  and layer2.net. under temporal_pool)
#                  [module.]new_fc.*                            fc.*
#   mmaction2      backbone.X (ConvModule names, .net. shifts)  backbone.<family rule>(X)
#                  cls_head.fc_cls.*                            fc.*
#   plain          features.* / conv1.*, layerK.*               backbone.* (torchvision's MobileNetV2 block names
#   (online demo,                                               renamed by mobilenetv2.from_torchvision)
#    torchvision)  classifier.* | classifier.1.* | fc.*         fc.*


def strip_net(key: str) -> str:
    # The official and mmaction2 shift wrappers keep the wrapped conv (or, under temporal_pool, layer2) as `.net`.
    return key.replace(".net.", ".")


def rename_head(key: str, heads: tuple[str, ...]) -> str | None:
    for head in heads:
        if key.startswith(head + "."):
            return "fc." + key[len(head) + 1 :]
    return None


def convert_mit_han_lab(state_dict: dict) -> dict:
    """Official TSM offline checkpoints (the TSN wrapper) to this package's layout."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        head = rename_head(key, ("new_fc",))
        out[head or "backbone." + strip_net(key.removeprefix("base_model."))] = value
    return out


def convert_plain(state_dict: dict) -> dict:
    """Bare backbone + classifier layouts: the official online MobileNetV2 demo checkpoint, torchvision."""
    out = {}
    for key, value in mobilenetv2.from_torchvision(state_dict).items():
        head = rename_head(key, ("classifier.1", "classifier", "fc"))
        out[head or "backbone." + key] = value
    return out


def make_mmaction2_converter(backbone_key):
    """mmaction2 Recognizer2D checkpoints, with ``backbone_key`` the family's rule for ConvModule names."""

    def convert(state_dict: dict) -> dict:
        out = {}
        for key, value in state_dict.items():
            head = rename_head(key, ("cls_head.fc_cls",))
            if head:
                out[head] = value
            elif key.startswith("backbone."):
                out["backbone." + backbone_key(strip_net(key.removeprefix("backbone.")))] = value
            else:
                out[key] = value  # left as is, so strict loading names it
        return out

    return convert
