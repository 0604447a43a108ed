"""The one way to get a model: :func:`load` takes weights (a file or an already read checkpoint), an optional
registry name, a class count, a label file and overrides, and returns the model with its config and class names.

Every command goes through it (``run``, ``export-onnx``, ``export-triton``, ``train --weights/--resume``, ``eval``),
so the rules below hold everywhere:

    weights                      model name           what is built
    streamtsm checkpoint         none, or the same    the architecture the checkpoint records, its weights
    foreign (mit-han-lab, ...)   required             ``create(model)``, the weights converted into it
    none                         required             ``create(model)`` with fresh weights

A streamtsm checkpoint records every architecture argument, so an override that contradicts one is an error:
only the data settings (:data:`DATA_FIELDS`) and the arguments that leave the weights' meaning alone
(:data:`RETUNABLE_ARCH`) may change, and the class count only with ``reset_head``.

Weights may also name a published checkpoint of the catalog (:mod:`streamtsm.hub.catalog`):
``load("x3d_s_kinetics400")`` fetches the file once into the cache, builds the entry's architecture with the
publisher's settings (clip length, frame interval, input size, mean/std) and class count, loads it strictly and
names the classes from the entry's label file. A path that exists is always a path; a string that is neither a path
nor an entry's name is one error naming close entries. The caller's arguments still win where they keep the
weights' meaning: ``labels_file``, ``num_classes`` with ``reset_head``, data settings, and ``model`` for an ImageNet
backbone entry or with ``allow_shift_mismatch``. (``create`` builds fresh weights only; ``load`` is the one way to
a published model.)
"""

from __future__ import annotations

import os
import re

from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..hub import catalog
from ..hub.catalog import Entry
from ..labels import read_labels, resolve_labels
from .checkpoint import FORMAT_NAME, check_recorded_config, load_checkpoint, read_checkpoint
from .registry import create, list_models

# How the model is fed and how its output is named: a run may change them without touching the weights.
DATA_FIELDS = ("input_size", "resize_size", "mean", "std", "clip_len", "frame_interval", "labels")
# Architecture arguments the weights do not depend on: TSM's shift has no parameters, so a model trained on
# 8 segments runs on any number, and dropout acts only while training.
RETUNABLE_ARCH = ("num_segments", "dropout")
# What an entry's weights expect of their input, kept when they go into another architecture.
INPUT_FIELDS = ("input_size", "resize_size", "mean", "std")

Weights = str | os.PathLike | dict | Entry


def catalog_entry(weights: Weights | None) -> Entry | None:
    """The catalog entry ``weights`` names: an :class:`~streamtsm.hub.catalog.Entry`, or a string that is no
    existing path and is an entry's name; None for anything else (a path, a dict, None).

    Raises:
        CheckpointError: a string or path that exists neither as a file nor as an entry's name; the message names
            the closest entries.
    """
    if isinstance(weights, Entry):
        return weights
    if weights is None or isinstance(weights, dict) or os.path.exists(weights):
        return None
    text = os.fspath(weights)
    if catalog.is_entry_name(text):
        return catalog.get_entry(text)
    if not re.fullmatch(r"[\w-]+", text):  # a path (a folder, a suffix): an entry's name has neither
        raise CheckpointError(f"checkpoint not found: {text}")
    close = catalog.close_names(text)
    if close:
        hint = f"nor a catalog entry (did you mean {', '.join(close)}?)"
    elif text in list_models():
        hint = (f"nor a catalog entry: {text} is an architecture (model={text!r} / --model {text}); "
                "`streamtsm models` lists the published checkpoints")
    else:
        hint = "nor a catalog entry (`streamtsm models` lists them)"
    raise CheckpointError(f"checkpoint not found: {text} is no file, {hint}")


def read_weights(weights: Weights, *, offline: bool | None = None, progress: bool = True) -> tuple[dict, str]:
    """The checkpoint dict of ``weights`` and the name errors call it by.

    A path is read with :func:`~streamtsm.models.read_checkpoint`; a dict is taken as already read; a catalog
    entry (or its name) is fetched first (:func:`streamtsm.hub.catalog.fetch`, downloading it once).

    Raises:
        CheckpointError: no such file or entry, or a file that is no usable checkpoint.
        DownloadError: an entry's file cannot be downloaded or verified.
    """
    if isinstance(weights, dict):
        return weights, "given checkpoint"
    entry = catalog_entry(weights)
    if entry is not None:
        path = catalog.fetch(entry, offline=offline, progress=progress)
        return read_checkpoint(path), f"{entry.name} ({path})"
    return read_checkpoint(weights), str(weights)


def is_streamtsm(checkpoint: dict) -> bool:
    """Whether ``checkpoint`` is in this package's format (it then names its architecture)."""
    return checkpoint.get("format") == FORMAT_NAME


def load(weights: Weights | None = None, *, model: str | None = None, num_classes: int | None = None,
         labels_file: str | os.PathLike | None = None, reset_head: bool = False,
         allow_shift_mismatch: bool = False, **overrides) -> nn.Module:
    """Build a model and load its weights; see the module docstring for the rules.

    Args:
        weights: a checkpoint path, a catalog entry or its name (``streamtsm models`` lists them), or an already
            read checkpoint / state dict; None for fresh weights.
        model: a registry name; required for foreign weights and without weights, optional (and checked)
            for a streamtsm checkpoint or a catalog entry (another one only for a backbone entry, or with
            ``allow_shift_mismatch``).
        num_classes: the classifier size; default: the checkpoint's, else the label file's count, else the
            model's default. Another size than a streamtsm checkpoint's needs ``reset_head``.
        labels_file: class names, one per line; their count must equal the model's classes.
        reset_head: keep a fresh classifier where the checkpoint's has another size (fine-tuning on new classes).
        allow_shift_mismatch: load weights trained with a bi-directional shift into a uni-directional (online)
            model or the reverse; a streamtsm checkpoint may then go into another ``model`` (e.g. ``tsm_r18``
            weights into ``tsm_r18_online``).
        **overrides: architecture arguments or :class:`~streamtsm.config.ModelConfig` fields, as
            :func:`~streamtsm.models.create` takes them.

    Returns:
        The model in eval mode, ``model.cfg`` set, its class names in ``model.cfg.labels``: the label file's, else
        the checkpoint's or the catalog entry's (when the class count is kept), else None.

    Raises:
        ConfigError: no model to build, a model or override that contradicts the checkpoint, a label file that
            does not fit.
        CheckpointError: weights that cannot be found, read, or do not fit the model.
        DownloadError: a catalog entry's file cannot be downloaded or verified.
    """
    file_labels = read_labels(labels_file) if labels_file is not None else None
    entry = catalog_entry(weights)
    if entry is not None and entry.layout != FORMAT_NAME:
        return _load_entry(entry, model, num_classes, file_labels, labels_file, reset_head, allow_shift_mismatch,
                           overrides)
    if weights is None:
        if not model:
            raise ConfigError("no model to build: give --model NAME, --weights CHECKPOINT, or both")
        net = create(model, num_classes=_class_count(num_classes, file_labels), **overrides)
        return _with_labels(net, file_labels, None, labels_file)

    checkpoint, where = read_weights(weights)
    if is_streamtsm(checkpoint):
        check_recorded_config(checkpoint, where)
        saved = ModelConfig.from_dict(checkpoint["config"])
        if model is None or model == saved.name or not allow_shift_mismatch:
            if model is not None and model != saved.name:
                # Only the offline and online forms of one family (tsm_r18, tsm_r18_online) share their weights.
                same_family = model.removesuffix("_online") == saved.name.removesuffix("_online")
                hint = f" (or pass --allow-shift-mismatch to load its weights into {model})" if same_family else ""
                raise ConfigError(f"--model {model} does not match the checkpoint {where}, which holds {saved.name}; "
                                  f"leave --model out{hint}")
            return _load_own(checkpoint, where, saved, num_classes, file_labels, labels_file, reset_head,
                             allow_shift_mismatch, overrides)
    elif not model:
        raise ConfigError(f"{where} is not a streamtsm checkpoint, so it does not name its architecture: give the "
                          "model name (--model NAME; `streamtsm models` lists them)")
    net = create(model, num_classes=_class_count(num_classes, file_labels), **overrides)
    info = load_checkpoint(net, checkpoint, reset_head=reset_head, allow_shift_mismatch=allow_shift_mismatch)
    saved_labels = info["labels"] if info["labels"] and len(info["labels"]) == net.cfg.num_classes else None
    return _with_labels(net, file_labels, saved_labels, labels_file)


def _load_own(checkpoint: dict, where: str, saved: ModelConfig, num_classes: int | None,
              file_labels: list[str] | None, labels_file, reset_head: bool, allow_shift_mismatch: bool,
              overrides: dict) -> nn.Module:
    """A streamtsm checkpoint rebuilt as it records itself, with the overrides it allows."""
    contradicted = [f"{k}={v!r} (the checkpoint has {saved.arch[k]!r})" for k, v in overrides.items()
                    if k in saved.arch and k not in RETUNABLE_ARCH and v != saved.arch[k]]
    if contradicted:
        raise ConfigError(f"{', '.join(contradicted)} contradict{'s' if len(contradicted) == 1 else ''} the "
                          f"architecture of {saved.name} recorded in {where}; leave those options out")
    # The label file sizes a new classifier only; without reset_head it must fit the checkpoint's.
    classes = _class_count(num_classes, file_labels if reset_head else None) or saved.num_classes
    if classes != saved.num_classes and not reset_head:
        raise ConfigError(f"{classes} classes asked for but {where} has {saved.num_classes} classes; pass "
                          "reset_head=True (--reset-head) to fine-tune a fresh classifier on new classes")
    kwargs = {**saved.arch, **{k: getattr(saved, k) for k in DATA_FIELDS}}
    if "num_segments" not in saved.arch:
        kwargs["num_segments"] = saved.num_segments
    kwargs.update(overrides)
    net = create(saved.name, num_classes=classes, **kwargs)
    load_checkpoint(net, checkpoint, reset_head=reset_head, allow_shift_mismatch=allow_shift_mismatch)
    kept = saved.labels if saved.labels and len(saved.labels) == classes else None
    return _with_labels(net, file_labels, kept, labels_file)


def _load_entry(entry: Entry, model: str | None, num_classes: int | None, file_labels: list[str] | None,
                labels_file, reset_head: bool, allow_shift_mismatch: bool, overrides: dict) -> nn.Module:
    """A published checkpoint in its publisher's layout, built as the catalog says, with the overrides it allows."""
    settings = dict(entry.overrides)
    if model is not None and model != entry.arch:
        if not (entry.backbone or allow_shift_mismatch):
            raise ConfigError(
                f"--model {model} does not match the catalog entry {entry.name}, which holds {entry.arch}; leave "
                f"--model out (or pass --allow-shift-mismatch to load its weights into {model})")
        # Another architecture keeps what the weights expect of their input, not the entry's clip settings.
        settings = {k: v for k, v in settings.items() if k in INPUT_FIELDS}
    arch = model or entry.arch
    classes = _class_count(num_classes, file_labels if reset_head else None) or entry.num_classes
    if classes != entry.num_classes and not reset_head:
        raise ConfigError(f"{classes} classes asked for but the catalog entry {entry.name} has {entry.num_classes} "
                          "classes; pass reset_head=True (--reset-head) to fine-tune a fresh classifier on new classes")
    checkpoint, where = read_weights(entry)
    net = create(arch, num_classes=classes, **{**settings, **overrides})
    try:
        load_checkpoint(net, checkpoint, reset_head=reset_head, allow_shift_mismatch=allow_shift_mismatch)
    except CheckpointError as e:
        raise CheckpointError(f"catalog entry {where}: {e}") from None
    named = catalog.label_names(entry) if classes == entry.num_classes else None
    return _with_labels(net, file_labels, named, labels_file)


def _class_count(num_classes: int | None, file_labels: list[str] | None) -> int | None:
    """The class count asked for: ``num_classes``, else the label file's, else None (the model's own)."""
    if num_classes is not None:
        return num_classes
    return len(file_labels) if file_labels is not None else None


def _with_labels(net: nn.Module, file_labels: list[str] | None, saved: list[str] | None, labels_file) -> nn.Module:
    """``net`` with ``cfg.labels`` set: the label file's names, else ``saved``, else None."""
    k = net.cfg.num_classes
    if file_labels is not None and len(file_labels) != k:
        raise ConfigError(f"labels file {labels_file} has {len(file_labels)} classes but the model has {k} classes")
    # None rather than numbered names when nobody named the classes: each caller numbers them its own way.
    named = file_labels is not None or bool(saved)
    net.cfg.labels = resolve_labels(k, given=file_labels, saved=saved) if named else None
    return net.eval()


__all__ = ["DATA_FIELDS", "INPUT_FIELDS", "RETUNABLE_ARCH", "catalog_entry", "is_streamtsm", "load", "read_weights"]
