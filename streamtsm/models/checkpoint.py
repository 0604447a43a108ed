"""Checkpoint reading, format detection, strict loading, and this package's own format.

Formats recognised (after unwrapping a ``state_dict`` / ``model`` nesting and a DataParallel ``module.`` prefix):

    format        how it is recognised
    streamtsm     {"format": "streamtsm", "config": ..., "state_dict": ...}, or keys exactly this package's
    mit-han-lab   keys under base_model.* / new_fc.* (the official TSM TSN wrapper)
    mmaction2     keys under backbone.* with cls_head.* (Recognizer2D/3D)
    plain         a bare backbone: features.*, conv1.*/layer1.* (official online demo, torchvision)
    pytorchvideo  keys under blocks.N.* (X3D), possibly nested under model_state
    uniformer     the official UniFormer video release: patch_embed1.*, blocks1.*, ..., head.*

The key renaming for each format lives with its model family (``model.checkpoint_converters()``); this module
only detects, dispatches and checks. Every file is read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..config import MODEL_KINDS
from .registry import ModelConfig

FORMAT_NAME = "streamtsm"
FORMAT_VERSION = 1
_SHIFTED_MODES = ("unidirectional", "bidirectional")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file into a dict, with one clear error for anything that is not a usable checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors... for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"refusing to load {path}: it holds Python objects besides tensors "
                                  "(only weights_only=True checkpoints are read)") from None
        with open(path, "rb") as f:
            head = f.read(4)
        # torch.save writes a zip archive ("PK\x03\x04"); legacy files are a pickle ("\x80" protocol byte).
        truncated = head == b"PK\x03\x04" or isinstance(e, EOFError) or "zip" in first.lower()
        what = "truncated or corrupt" if truncated else "not a PyTorch checkpoint"
        raise CheckpointError(f"cannot read checkpoint {path}: file is {what} ({first[:120]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"cannot read checkpoint {path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


# Bounds of a recorded config that any real model stays within; beyond them the file is damaged or hand-made, and
# building the model would fail deep inside torch (or allocate a classifier of a billion rows) instead.
MAX_CLASSES = 100_000
MAX_INPUT_SIZE = 4096
MAX_FRAMES = 10_000  # num_segments, clip_len, frame_interval


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _channel_triple(value, *, positive: bool) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and (not positive or all(v > 0 for v in value)))


def check_recorded_config(checkpoint: dict, where: str) -> None:
    """Check the config a streamtsm checkpoint records before anything is built from it.

    Raises:
        CheckpointError: naming the first implausible field, what it holds and what was expected.
    """
    from .registry import list_models  # registry imports nothing of this module's; late to keep import order free

    config = checkpoint.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {where} records no config table (got {type(config).__name__}); "
                              "expected the one save_checkpoint writes")
    names = list_models()
    rules = [
        ("name", lambda v: v in names, "a registered model name (`streamtsm models` lists them)"),
        ("kind", lambda v: v in MODEL_KINDS, f"one of {', '.join(MODEL_KINDS)}"),
        ("num_classes", lambda v: _int_in(v, 1, MAX_CLASSES), f"an integer from 1 to {MAX_CLASSES}"),
        ("input_size", lambda v: _int_in(v, 1, MAX_INPUT_SIZE), f"an integer from 1 to {MAX_INPUT_SIZE}"),
        ("resize_size", lambda v: _int_in(v, 1, 2 * MAX_INPUT_SIZE), f"an integer from 1 to {2 * MAX_INPUT_SIZE}"),
        ("mean", lambda v: _channel_triple(v, positive=False), "3 finite numbers (R, G, B)"),
        ("std", lambda v: _channel_triple(v, positive=True), "3 finite numbers above 0 (R, G, B)"),
        ("num_segments", lambda v: _int_in(v, 1, MAX_FRAMES), f"an integer from 1 to {MAX_FRAMES}"),
        ("clip_len", lambda v: _int_in(v, 1, MAX_FRAMES), f"an integer from 1 to {MAX_FRAMES}"),
        ("frame_interval", lambda v: _int_in(v, 1, MAX_FRAMES), f"an integer from 1 to {MAX_FRAMES}"),
        ("labels", lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
         "a list of class names or null"),
        ("arch", lambda v: isinstance(v, dict), "a table of architecture arguments"),
    ]
    required = ("name", "num_classes")
    for key, ok, expected in rules:
        if key not in config:
            if key in required:
                raise CheckpointError(f"checkpoint {where} records no {key} in its config; expected {expected}")
            continue
        value = config[key]
        if not ok(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise CheckpointError(f"checkpoint {where} records an implausible config: {key} = {shown}, "
                                  f"expected {expected}")


def unwrap(checkpoint: dict) -> tuple[dict, dict]:
    """Split a checkpoint into (state_dict, metadata); metadata is empty for foreign formats."""
    if checkpoint.get("format") == FORMAT_NAME:
        return checkpoint["state_dict"], checkpoint
    # mmaction2/TSM nest under state_dict, SlowFast/pytorchvideo under model_state, others under model.
    for key in ("state_dict", "model_state", "model", "module"):
        inner = checkpoint.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
            if any(isinstance(v, torch.Tensor) for v in inner.values()) or key == "state_dict":
                return unwrap(inner)[0], {}
    state_dict = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CheckpointError(f"no tensors found in checkpoint (top-level keys: {sorted(checkpoint)[:8]})")
    if all(k.startswith("module.") for k in state_dict) and not any(
        k.startswith("module.base_model.") for k in state_dict
    ):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict, {}


def detect_format(state_dict: dict, model: nn.Module | None = None) -> str:
    """Name the layout of a (unwrapped) state dict; see the module docstring."""
    keys = list(state_dict)
    if model is not None and set(keys) >= {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}:
        return FORMAT_NAME
    if any(k.startswith(("module.base_model.", "base_model.")) for k in keys):
        return "mit-han-lab"
    if any(k.startswith("cls_head.") for k in keys) or any(
        k.startswith("backbone.") and (".conv.weight" in k or ".bn.weight" in k) for k in keys
    ):
        return "mmaction2"
    if any(k.startswith("blocks.") for k in keys):
        return "pytorchvideo"
    if any(k.startswith("backbone.") for k in keys):
        return FORMAT_NAME
    if any(k.startswith(("features.", "conv1.", "layer1.")) for k in keys):
        return "plain"
    if any(k.startswith(("patch_embed1.", "blocks1.")) for k in keys):
        return "uniformer"
    return "unknown"


def _source_shift_mode(state_dict: dict, fmt: str, meta: dict) -> str | None:
    """The temporal shift the checkpoint was trained with, where the format tells; None when it cannot."""
    if fmt == FORMAT_NAME and meta:
        return meta.get("config", {}).get("arch", {}).get("shift_mode")
    if fmt in ("mit-han-lab", "mmaction2"):
        # Both wrap shifted convs as `.net`; their releases are all bi-directional.
        return "bidirectional" if any(".net." in k for k in state_dict) else "none"
    return None


def load_checkpoint(model: nn.Module, source: str | os.PathLike | dict, *, strict: bool = True,
                    reset_head: bool = False, allow_shift_mismatch: bool = False) -> dict:
    """Load weights of any supported format into ``model``.

    Args:
        model: a model from :func:`streamtsm.models.create`.
        source: a checkpoint path, or an already loaded checkpoint / state dict.
        strict: raise on missing, unexpected or misshapen keys (the error lists them and names the format).
        reset_head: accept a classifier of another size and keep the model's freshly initialized head
            (fine-tuning on other classes).
        allow_shift_mismatch: load a bi-directional checkpoint into a uni-directional (online) model or the reverse.

    Returns:
        ``{"format": ..., "labels": [...] | None, "config": {...} | None}``.
    """
    checkpoint = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    where = f" {source}" if isinstance(source, (str, os.PathLike)) else ""
    state_dict, meta = unwrap(checkpoint)
    fmt = detect_format(state_dict, model)
    name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
    source_mode = _source_shift_mode(state_dict, fmt, meta)
    if fmt != FORMAT_NAME:
        converters = model.checkpoint_converters() if hasattr(model, "checkpoint_converters") else {}
        if fmt not in converters:
            known = ", ".join([FORMAT_NAME, *converters]) or FORMAT_NAME
            raise CheckpointError(f"checkpoint{where} has layout {fmt!r}, which {name} cannot load "
                                  f"(it loads: {known})")
        state_dict = converters[fmt](state_dict)

    model_mode = getattr(model, "shift_mode", None)
    if (not allow_shift_mismatch and source_mode in _SHIFTED_MODES and model_mode in _SHIFTED_MODES
            and source_mode != model_mode):
        raise CheckpointError(
            f"checkpoint{where} was trained with a {source_mode} shift but {name} uses a {model_mode} shift; "
            "its features would not mean the same (pass allow_shift_mismatch=True / --allow-shift-mismatch to "
            "load it anyway, e.g. to fine-tune an offline model into an online one)"
        )

    own = model.state_dict()
    head_prefix = getattr(model, "head_prefix", None)
    shape_errors, head_skipped = [], []
    for key, value in list(state_dict.items()):
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            if reset_head and head_prefix and key.startswith(head_prefix):
                head_skipped.append(key)
                del state_dict[key]
            else:
                shape_errors.append(f"{key} checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
    # Checkpoints written by older torch lack BN's num_batches_tracked, which inference never reads.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")
               and k not in head_skipped]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected or shape_errors):
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shape_errors)):
            if items:
                more = f" ... ({len(items)} in all)" if len(items) > 6 else ""
                parts.append(f"{label}: {', '.join(items[:6])}{more}")
        hint = ""
        if shape_errors and head_prefix and all(e.startswith(head_prefix) for e in shape_errors):
            hint = "; the classifier size differs: pass reset_head=True (--reset-head) to fine-tune on new classes"
        raise CheckpointError(f"checkpoint{where} (detected format: {fmt}) does not fit {name}: "
                              + "; ".join(parts) + hint)
    model.load_state_dict(state_dict, strict=False)
    config = meta.get("config") if meta else None
    labels = config.get("labels") if config else None
    return {"format": fmt, "labels": labels, "config": config}


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, labels: list[str] | None = None,
                    extra: dict | None = None) -> None:
    """Write ``model`` in this package's format: weights plus the config (name, classes, input size, mean/std,
    clip settings, architecture arguments, labels) needed to rebuild and run it."""
    cfg: ModelConfig = model.cfg
    if labels is not None and len(labels) != cfg.num_classes:
        raise CheckpointError(f"{len(labels)} labels given for a model with {cfg.num_classes} classes")
    config = cfg.to_dict()
    if labels is not None:
        config["labels"] = list(labels)
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if extra:
        payload["extra"] = extra
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint under the real name

