"""The engine interface: what the live pipeline asks of a backend (torch, onnxruntime, Triton).

Two kinds of engine, one per model kind:

- :class:`OnlineEngine` steps one frame of each of B streams with an explicit state (a list of arrays, one per
  shifted block, row b belonging to stream b). The backend decides the array type (torch tensors, numpy arrays,
  device-resident OrtValues); the pipeline only passes states back, stacks and splits them through the engine.
- :class:`ClipEngine` classifies windows of frames ``[B, T, 3, H, W]``.

Frames come in preprocessed: float32 ``[B, 3, H, W]`` numpy arrays (see :mod:`streamtsm.preprocess`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import ModelConfig

State = list[Any]


class Engine(ABC):
    """What every engine has: the model's config and class names, and a name for logs and stats."""

    cfg: ModelConfig
    labels: list[str]
    backend: str

    @property
    def model_name(self) -> str:
        return self.cfg.name

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release backend resources."""


class OnlineEngine(Engine):
    """One frame per stream per call, explicit streaming state."""

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


class ClipEngine(Engine):
    """A window of frames per prediction."""

    @abstractmethod
    def predict(self, clips: np.ndarray) -> np.ndarray:
        """float32 ``[B, T, 3, H, W]`` -> float32 logits ``[B, K]``."""


def default_labels(num_classes: int) -> list[str]:
    return [f"class_{i}" for i in range(num_classes)]
