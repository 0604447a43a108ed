"""Training and evaluation on your own videos, and the synthetic motion dataset.

- :mod:`.data`: annotation lists, TSN/dense sampling, augmentations, the clip dataset, the synthetic dataset writer;
- :mod:`.loop`: :func:`train` with the TSM recipe, checkpoints, resume, logs;
- :mod:`.evaluate`: the offline (multi-view) and online (frame by frame) protocols and their metrics;
- :mod:`.commands`: ``streamtsm train``, ``streamtsm eval``, ``streamtsm synth``.

Names are imported lazily, so ``import streamtsm.train.commands`` (the CLI) does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClipDataset": ".data", "DenseSampler": ".data", "SegmentSampler": ".data", "TestTransform": ".data",
    "TrainTransform": ".data", "VideoRecord": ".data", "read_annotations": ".data", "scan_folders": ".data",
    "write_synthetic_dataset": ".data",
    "TrainOptions": ".loop", "train": ".loop",
    "classification_metrics": ".evaluate", "evaluate": ".evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
