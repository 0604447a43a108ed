"""Inference backends behind one interface (see :mod:`streamtsm.engine.base`).

Backends are imported lazily so the onnxruntime path never imports torch.
"""

from .base import ClipEngine, Engine, OnlineEngine, default_labels

__all__ = ["ClipEngine", "Engine", "OnlineEngine", "default_labels"]
