"""The torch backend: runs a model from :func:`streamtsm.models.create` eagerly, on CPU or CUDA."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .base import ClipEngine, OnlineEngine, State, default_labels


def _device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch sees no CUDA device; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None


class TorchOnlineEngine(OnlineEngine):
    """Online step of a TSM-style model with an explicit state (torch tensors that stay on the device)."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, device: str = "cpu", labels: list[str] | None = None) -> None:
        if not getattr(model, "online", False):
            raise ConfigError(f"model {model.cfg.name!r} has no online form; use it as a clip model")
        self.device = _device(device)
        self.model = model.to(self.device).eval()
        self.cfg = model.cfg
        self.labels = labels or self.cfg.labels or default_labels(self.cfg.num_classes)
        s = self.cfg.input_size
        self._shapes = model.state_shapes(s, s)

    def zero_state(self, batch: int) -> State:
        return [torch.zeros(batch, *shape, device=self.device) for shape in self._shapes]

    def step(self, frames: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        with torch.inference_mode():
            x = torch.from_numpy(frames).to(self.device, non_blocking=True)
            logits, new_state = self.model.step(x, state)
            return logits.float().cpu().numpy(), list(new_state)

    def stack(self, states: Sequence[State]) -> State:
        if len(states) == 1:
            return states[0]
        return [torch.cat(parts, 0) for parts in zip(*states)]

    def split(self, state: State, batch: int) -> list[State]:
        if batch == 1:
            return [state]
        rows = [s.split(1, 0) for s in state]
        return [[r[i] for r in rows] for i in range(batch)]


class TorchClipEngine(ClipEngine):
    """A clip model (offline TSM, X3D, UniFormer, ...) on windows of frames."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, device: str = "cpu", labels: list[str] | None = None) -> None:
        self.device = _device(device)
        self.model = model.to(self.device).eval()
        self.cfg = model.cfg
        self.labels = labels or self.cfg.labels or default_labels(self.cfg.num_classes)

    def predict(self, clips: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(clips).to(self.device)).float().cpu().numpy()
