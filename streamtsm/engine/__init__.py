"""Inference backends behind one interface (see :mod:`streamtsm.engine.base`).

Backends are imported lazily so the onnxruntime path never imports torch.
"""

from .base import ClipEngine, Engine, OnlineEngine, State, StateSpec, check_frames

__all__ = ["ClipEngine", "Engine", "OnlineEngine", "State", "StateSpec", "check_frames"]
