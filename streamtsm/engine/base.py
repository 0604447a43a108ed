"""The engine interface: what the live pipeline asks of a backend (torch, onnxruntime, Triton).

Two kinds of engine, one per model kind:

- :class:`OnlineEngine` steps one frame of each of B streams with an explicit state: a mapping name -> array,
  the names and per-stream shapes declared by the engine's :attr:`~OnlineEngine.state_spec` (the names the ONNX
  graph gives its state inputs, see :func:`streamtsm.formats.state_names`), row b of every array belonging to
  stream b. The backend decides the array type (torch tensors, numpy arrays, device-resident OrtValues, Triton
  sequence tokens); the pipeline only passes states back, stacks and splits them through the engine.
- :class:`ClipEngine` classifies windows of frames ``[B, T, 3, H, W]``.

Frames come in preprocessed: float32 ``[B, 3, H, W]`` numpy arrays (see :mod:`streamtsm.preprocess`), checked by
:func:`check_frames` before every step or prediction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..formats import state_names

State = dict[str, Any]  # name -> the batch's array for that state tensor, in the order of the state spec


@dataclass(frozen=True)
class StateSpec:
    """One tensor of an online model's streaming state.

    Attributes:
        name: its name, the ONNX graph's state input of the same name (``state_i``).
        shape: its shape for one stream, without the batch axis (``(fold, h, w)`` for a TSM block).
        dtype: its element type (``"float32"``; ``"object"`` for a state that is a handle, not a tensor).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


def numbered_state_spec(shapes: Sequence[Sequence[int]], dtype: str = "float32") -> tuple[StateSpec, ...]:
    """The spec of state tensors given in graph order: the i-th is named as the i-th state input of an export."""
    return tuple(StateSpec(state_names(i)[0], tuple(int(d) for d in shape), dtype) for i, shape in enumerate(shapes))


def check_frames(frames: np.ndarray, size: int, *, what: str = "frames", clip_len: int | None = None) -> np.ndarray:
    """The one check of what an engine is given: float32 frames ``[B, 3, size, size]``, or clips
    ``[B, T, 3, size, size]`` when ``clip_len`` is given (T checked unless ``clip_len`` is 0).

    Returns:
        ``frames`` as a C-contiguous array (the same array when it already is).

    Raises:
        ValueError: naming the expected layout and the given dtype and shape.
    """
    rank = 4 if clip_len is None else 5
    if (not isinstance(frames, np.ndarray) or frames.ndim != rank or frames.shape[-3:] != (3, size, size)
            or frames.dtype != np.float32):
        got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        layout = "[B, 3, H, W]" if rank == 4 else "[B, T, 3, H, W]"
        raise ValueError(f"{what} must be a float32 {layout} array with H = W = {size}, got {got}")
    if clip_len and frames.shape[1] != clip_len:
        raise ValueError(f"{what} must have T = {clip_len} frames, got {frames.shape[1]}")
    return np.ascontiguousarray(frames)


class Engine(ABC):
    """What every engine has: the model's config and class names, and a name for logs and stats."""

    cfg: ModelConfig
    labels: list[str]
    backend: str

    @property
    def model_name(self) -> str:
        return self.cfg.name

    # The model computes on this machine's CPU cores (not a GPU, not a server), so that streams of it in several
    # pipeline lanes step side by side on those cores (see streamtsm.pipeline); engines elsewhere set it False.
    host_cpu: bool = True

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release backend resources."""


class OnlineEngine(Engine):
    """One frame per stream per call, explicit streaming state (a mapping name -> array, see the module doc)."""

    state_spec: tuple[StateSpec, ...]

    @cached_property
    def state_names(self) -> tuple[str, ...]:
        """The names of the state, in the order of :attr:`state_spec`."""
        return tuple(spec.name for spec in self.state_spec)

    @abstractmethod
    def zero_state(self, batch: int) -> State:
        """The initial state of ``batch`` streams."""

    @abstractmethod
    def step(self, frames: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """``frames`` float32 ``[B, 3, H, W]`` and the batch's state -> float32 logits ``[B, K]`` and new state."""

    @abstractmethod
    def stack(self, states: Sequence[State]) -> State:
        """Join single-stream states (batch 1 each) into one batch state, in order."""

    @abstractmethod
    def split(self, state: State, batch: int) -> list[State]:
        """Split a batch state into ``batch`` single-stream states."""

    def check_state(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        """``state`` keyed by the names of :attr:`state_spec`, in its order (a mapping in another order is
        reordered).

        Raises:
            ValueError: ``state`` is not a mapping, or misses or adds names.
        """
        names = self.state_names
        try:
            keys = tuple(state.keys())
        except AttributeError:
            raise ValueError(f"state must be a mapping name -> array (from zero_state or step) with the names "
                             f"{list(names)}, got {type(state).__name__}") from None
        if keys == names:  # the steady case: one tuple comparison
            return state
        missing = [n for n in names if n not in state]
        unexpected = [k for k in keys if k not in names]
        if missing or unexpected:
            raise ValueError(f"state must hold the {len(names)} arrays {list(names)} (one per shifted block); "
                             f"missing {missing}, unexpected {unexpected}")
        return {n: state[n] for n in names}

    def check_state_shapes(self, state: Mapping[str, Any], batch: int) -> None:
        """Every array of ``state`` (numpy or torch, in spec order) holds ``batch`` streams of its spec's shape.

        Raises:
            ValueError: naming the state tensor, the expected and the given shape.
        """
        for spec, value in zip(self.state_spec, state.values()):
            try:
                shape = value.shape
                if shape[0] == batch and shape[1:] == spec.shape:  # torch.Size compares equal to a tuple
                    continue
            except (AttributeError, IndexError, TypeError):
                shape = None
            _raise_state_shape_error(spec, shape if shape is not None else value, batch)


def _raise_state_shape_error(spec: StateSpec, shape: Any, batch: int) -> None:
    if not isinstance(shape, tuple) or len(shape) != len(spec.shape) + 1:
        got = tuple(shape) if isinstance(shape, tuple) else type(shape).__name__
        raise ValueError(f"state {spec.name!r} must be a [B, {', '.join(map(str, spec.shape))}] array, got {got}")
    if shape[0] != batch:
        raise ValueError(f"state {spec.name!r} holds {shape[0]} streams but the frame batch has {batch}")
    raise ValueError(f"state {spec.name!r} must have shape {(batch, *spec.shape)}, got {tuple(shape)}")


class ClipEngine(Engine):
    """A window of frames per prediction."""

    @abstractmethod
    def predict(self, clips: np.ndarray) -> np.ndarray:
        """float32 ``[B, T, 3, H, W]`` -> float32 logits ``[B, K]``."""
