"""The Temporal Shift Module operation (Lin, Gan and Han, "TSM: Temporal Shift Module for Efficient Video
Understanding", ICCV 2019) and the residual-block base class that hosts it.

The shift moves a fold of channels one frame along time, so a 2D convolution that follows mixes information of
neighbouring frames at zero extra FLOPs. Two forms share one set of weights:

- clip form (``TemporalShift.forward``): input ``[N*T, C, H, W]``, the whole clip at once;
- step form (``TemporalShift.step``): input ``[B, C, H, W]``, one frame per stream, with the fold cached from the
  previous step passed in and the new fold returned. Only the uni-directional shift has a step form, because a
  bi-directional shift needs frame t+1.

Uni-directional (causal), the form online models are trained and run with::

    channels  [0, fold)   frame t <- frame t-1   (zeros at t = 0)
              [fold, C)   frame t <- frame t

Bi-directional, the form of the offline TSM checkpoints::

    channels  [0, fold)       frame t <- frame t+1   (zeros at t = T-1)
              [fold, 2*fold)  frame t <- frame t-1   (zeros at t = 0)
              [2*fold, C)     frame t <- frame t
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SHIFT_MODES = ("unidirectional", "bidirectional")
SHIFT_PLACES = ("blockres", "block")


class TemporalShift(nn.Module):
    """Parameter-free temporal shift of ``fold`` channels (two folds when bi-directional).

    Args:
        num_segments: frames per clip T in the clip form.
        fold: number of channels moved in each direction (``channels // shift_div``).
        mode: ``"unidirectional"`` or ``"bidirectional"``.
    """

    def __init__(self, num_segments: int, fold: int, mode: str = "bidirectional") -> None:
        super().__init__()
        if mode not in SHIFT_MODES:
            raise ValueError(f"shift mode must be one of {SHIFT_MODES}, got {mode!r}")
        if fold < 1:
            raise ValueError(f"fold must be >= 1, got {fold} (too few channels for this shift_div)")
        self.num_segments = num_segments
        self.fold = fold
        self.mode = mode

    def extra_repr(self) -> str:
        return f"num_segments={self.num_segments}, fold={self.fold}, mode={self.mode}"

    def forward(self, x: Tensor) -> Tensor:
        nt, c, h, w = x.shape
        t = self.num_segments
        if nt % t:
            raise ValueError(f"clip input must have N*T rows with T={t}, got {nt} rows")
        fold = self.fold
        x = x.view(nt // t, t, c, h, w)  # [N, T, C, H, W]
        zeros = x.new_zeros(x.shape[0], 1, fold, h, w)
        # Built from slices and concatenations (no in-place writes) so it exports to ONNX as plain Slice/Concat.
        past = torch.cat([zeros, x[:, :-1, :fold]], dim=1)
        if self.mode == "unidirectional":
            out = torch.cat([past, x[:, :, fold:]], dim=2)
        else:
            future = torch.cat([x[:, 1:, :fold], zeros], dim=1)
            past = torch.cat([zeros, x[:, :-1, fold : 2 * fold]], dim=1)
            out = torch.cat([future, past, x[:, :, 2 * fold :]], dim=2)
        return out.view(nt, c, h, w)

    def step(self, x: Tensor, cached: Tensor) -> tuple[Tensor, Tensor]:
        """One online step: ``x`` ``[B, C, H, W]`` of frame t, ``cached`` ``[B, fold, H, W]`` from frame t-1.

        Returns the shifted input and the fold of frame t to cache for frame t+1.
        """
        if self.mode != "unidirectional":
            raise RuntimeError("a bi-directional shift needs the next frame and has no online step")
        fold = self.fold
        # clone(): the cache must not keep the whole block input alive between steps.
        return torch.cat([cached, x[:, fold:]], dim=1), x[:, :fold].clone()


class ShiftableBlock(nn.Module):
    """A residual block with a slot for a temporal shift.

    Subclasses implement ``_body(identity, x)``: the block's output given the input of the identity path and the
    input of the residual branch. Where the shift sits decides what each path sees::

        blockres:  x ──┬──────────── identity ─────────┐
                       └─► shift ─► residual branch ──(+)─► y
        block:     x ─► shift ──┬── identity ──────────┐
                                └─► residual branch ──(+)─► y
    """

    in_channels: int

    def __init__(self) -> None:
        super().__init__()
        # A TemporalShift, or another clip-form temporal op of the same signature (TIN's TemporalInterlace).
        self.shift: nn.Module | None = None
        self.shift_place = "blockres"

    def _body(self, identity: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.shift is None:
            return self._body(x, x)
        shifted = self.shift(x)
        if self.shift_place == "block":
            return self._body(shifted, shifted)
        return self._body(x, shifted)

    def step(self, x: Tensor, cached: Tensor) -> tuple[Tensor, Tensor]:
        """Online form of ``forward`` for a block that holds a uni-directional shift."""
        assert self.shift is not None, "step() is only called on shifted blocks"
        shifted, new_cached = self.shift.step(x, cached)
        if self.shift_place == "block":
            return self._body(shifted, shifted), new_cached
        return self._body(x, shifted), new_cached
