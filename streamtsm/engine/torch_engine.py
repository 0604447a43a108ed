"""The torch backend: runs a model from :func:`streamtsm.models.create` eagerly, on CPU or CUDA."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..labels import resolve_labels
from .base import ClipEngine, OnlineEngine, State, check_frames, numbered_state_spec


def _device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch sees no CUDA device; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None


class TorchOnlineEngine(OnlineEngine):
    """Online step of a TSM-style model with an explicit state (torch tensors that stay on the device).

    Args:
        model: an online model from :func:`streamtsm.models.create` (weights loaded).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        labels, labels_file: class names, or a file of them; the model's own (``cfg.labels``) when neither is
            given, else numbered (see :func:`streamtsm.labels.resolve_labels`).
    """

    backend = "torch"

    def __init__(self, model: torch.nn.Module, device: str = "cpu", labels: Sequence[str] | None = None, *,
                 labels_file: str | os.PathLike | None = None) -> None:
        if not getattr(model, "online", False):
            raise ConfigError(f"model {model.cfg.name!r} has no online form; use it as a clip model")
        self.device = _device(device)
        self.host_cpu = self.device.type == "cpu"
        self.model = model.to(self.device).eval()
        self.cfg = model.cfg
        self.labels = resolve_labels(self.cfg.num_classes, labels_file=labels_file, given=labels,
                                     saved=self.cfg.labels)
        s = self.cfg.input_size
        self.state_spec = numbered_state_spec(model.state_shapes(s, s))

    def zero_state(self, batch: int) -> State:
        return {spec.name: torch.zeros(batch, *spec.shape, device=self.device) for spec in self.state_spec}

    def step(self, frames: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        frames = check_frames(frames, self.cfg.input_size)
        state = self.check_state(state)
        self.check_state_shapes(state, frames.shape[0])
        with torch.inference_mode():
            x = torch.from_numpy(frames).to(self.device, non_blocking=True)
            # Checked above by name; the model's step takes its state as a list in graph order.
            logits, new_state = self.model.step_unchecked(x, list(state.values()))
            return logits.float().cpu().numpy(), dict(zip(self.state_names, new_state))

    def stack(self, states: Sequence[State]) -> State:
        if len(states) == 1:
            return states[0]
        return {name: torch.cat([s[name] for s in states], 0) for name in self.state_names}

    def split(self, state: State, batch: int) -> list[State]:
        if batch == 1:
            return [state]
        rows = {name: state[name].split(1, 0) for name in self.state_names}
        return [{name: r[i] for name, r in rows.items()} for i in range(batch)]


class TorchClipEngine(ClipEngine):
    """A clip model (offline TSM, X3D, UniFormer, ...) on windows of frames ``[B, T, 3, S, S]``.

    Args: as :class:`TorchOnlineEngine`. The model checks T itself (a segment-based one takes exactly
    ``num_segments`` frames).
    """

    backend = "torch"

    def __init__(self, model: torch.nn.Module, device: str = "cpu", labels: Sequence[str] | None = None, *,
                 labels_file: str | os.PathLike | None = None) -> None:
        self.device = _device(device)
        self.host_cpu = self.device.type == "cpu"
        self.model = model.to(self.device).eval()
        self.cfg = model.cfg
        self.labels = resolve_labels(self.cfg.num_classes, labels_file=labels_file, given=labels,
                                     saved=self.cfg.labels)

    def predict(self, clips: np.ndarray) -> np.ndarray:
        clips = check_frames(clips, self.cfg.input_size, what="clips", clip_len=0)
        with torch.inference_mode():
            return self.model(torch.from_numpy(clips).to(self.device)).float().cpu().numpy()
