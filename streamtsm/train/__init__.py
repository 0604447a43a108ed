"""Training and evaluation on your own videos, and the synthetic motion dataset.

- :mod:`.annotations`: annotation lists and class folders, read into video records;
- :mod:`.video`: decoding the frames of a record;
- :mod:`.sampling`: TSN segment and dense frame samplers;
- :mod:`.transforms`: train and test clip transforms (multi-scale crop, flip, the live centre crop);
- :mod:`.data`: the clip dataset joining them, its collate function and the matched batch sampler;
- :mod:`.synthdata`: the synthetic motion dataset writer (``streamtsm synth``);
- :mod:`.loop`: :func:`train` with the TSM recipe, checkpoints, resume, logs;
- :mod:`.evaluate`: the offline (multi-view) and online (frame by frame) protocols and their metrics;
- :mod:`.commands`: ``streamtsm train``, ``streamtsm eval``, ``streamtsm synth``.

Names are imported lazily, so ``import streamtsm.train.commands`` (the CLI) does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClipDataset": ".data", "DenseSampler": ".sampling", "SegmentSampler": ".sampling",
    "TestTransform": ".transforms", "TrainTransform": ".transforms", "VideoRecord": ".annotations",
    "read_annotations": ".annotations", "scan_folders": ".annotations", "write_synthetic_dataset": ".synthdata",
    "TrainOptions": ".loop", "train": ".loop",
    "classification_metrics": ".evaluate", "evaluate": ".evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
