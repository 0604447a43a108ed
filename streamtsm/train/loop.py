"""The training loop: the TSM recipe (SGD with momentum and weight decay, step or cosine schedule with linear
warm-up, gradient clipping at norm 40, optional partial BN), checkpoints every epoch, resume, validation.

Online models (uni-directional shift) train in their clip form: the clip form of a uni-directional TSM is the
online model run over the clip, so the weights run frame by frame afterwards unchanged.

Out folder of a run::

    checkpoint.pth   the latest epoch (streamtsm format; extra: epoch, optimizer, scheduler, scaler, best)
    best.pth         the epoch with the best val top-1 (extra: epoch, val metrics)
    log.jsonl        one JSON record per epoch, then a final record
    labels.txt       the class names, one per line
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError, StreamTSMError
from ..models import create, get_spec, load_checkpoint, load_model, read_checkpoint, save_checkpoint
from .data import (FRAME_TEMPLATE, ClipDataset, MatchedBatchSampler, TestTransform, TrainTransform, VideoRecord,
                   collate_clips, flip_label_map, load_records, mirrored_pairs, read_labels, sampler_for,
                   worker_init)
from .evaluate import classification_metrics, predict_offline

log = logging.getLogger(__name__)

SCHEDULES = ("step", "cosine")


class TrainingError(StreamTSMError):
    """Training cannot go on (the loss diverged)."""

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainOptions:
    """Everything a training run needs; the ``streamtsm train`` options map onto these one to one.

    ``train``/``val`` are an annotation list, a class-folder root, or a list of :class:`VideoRecord` (in-memory
    data). ``model_args`` holds architecture or config overrides for :func:`streamtsm.models.create`
    (``num_segments``, ``input_size``, ``width_mult``, ``width``, ``dropout``, ...). ``lr_steps`` are epochs at
    which the step schedule divides the learning rate by 10 (default: 50% and 75% of the epochs).
    ``optimizer``: ``"sgd"`` with momentum, the TSM recipe for fine-tuning pretrained weights, or ``"adamw"``
    (``momentum`` is its beta1), which trains from scratch much sooner: SGD barely moves a backbone behind a
    classifier initialized near zero. ``matched_warmup_epochs``: the first epochs draw each batch from one scene shown in every class
    (:class:`~streamtsm.train.data.MatchedBatchSampler`), which makes a TSM trained from scratch pick up motion
    many times sooner; they count towards ``epochs``. ``frame_loss`` = K > 0: the loss is the mean cross-entropy of
    each of the last K frames' outputs (``model(clip, per_frame=True)``) rather than of the clip average; for online
    models, whose output at every frame is what a live stream reports.
    """

    model: str | None = None
    train: str | os.PathLike | Sequence[VideoRecord] | None = None
    val: str | os.PathLike | Sequence[VideoRecord] | None = None
    out: str | os.PathLike = "runs/train"
    data_root: str | None = None
    labels: str | Sequence[str] | None = None
    weights: str | None = None
    reset_head: bool = False
    allow_shift_mismatch: bool = False
    model_args: dict = field(default_factory=dict)
    epochs: int = 25
    batch_size: int = 8
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    lr_steps: Sequence[int] | None = None
    warmup_epochs: float = 0.0
    clip_grad: float | None = 40.0
    partial_bn: bool = False
    matched_warmup_epochs: int = 0
    frame_loss: int = 0
    amp: bool = False
    workers: int = 0
    device: str = "auto"
    sampling: str = "auto"
    clip_len: int | None = None
    frame_interval: int | None = None
    short: str = "loop"
    flip: bool = False
    flip_swap: Sequence[tuple[str, str]] | str | None = None
    scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66)
    frame_template: str = FRAME_TEMPLATE
    start_index: int = 1
    list_format: str = "auto"
    seed: int = 0
    resume: str | None = None
    val_batch_size: int | None = None
    progress: bool = True

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("train", "val") and v is not None and not isinstance(v, (str, os.PathLike)):
                v = f"<{len(v)} in-memory records>"
            elif isinstance(v, os.PathLike):
                v = str(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


# -- pieces ---------------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch sees no CUDA device; use --device cpu")
    return dev


def resolve_labels(option, folder_labels: list[str] | None, train_source, records: Sequence[VideoRecord],
                   weights_labels: list[str] | None = None) -> list[str]:
    """The class names, from (in order): the option, the class folders, ``labels.txt`` beside the train list, the
    pretrained checkpoint's labels; else ``0..K-1`` with K = the largest label + 1."""
    if option is not None:
        labels = read_labels(option) if isinstance(option, (str, os.PathLike)) else list(option)
    elif folder_labels is not None:
        labels = folder_labels
    elif isinstance(train_source, (str, os.PathLike)) and (Path(train_source).parent / "labels.txt").is_file():
        labels = read_labels(Path(train_source).parent / "labels.txt")
    elif weights_labels:
        labels = list(weights_labels)
    else:
        labels = [str(i) for i in range(max(r.label for r in records) + 1)]
        log.warning("no labels file: using %d numbered classes (pass --labels FILE to name them)", len(labels))
    if not labels:
        raise ConfigError("no class labels")
    return labels


def check_labels(records: Sequence[VideoRecord], labels: Sequence[str], what: str) -> None:
    top = max((r.label for r in records), default=-1)
    if top >= len(labels):
        bad = next(r for r in records if r.label >= len(labels))
        raise ConfigError(f"{what} has label {top} ({bad.path}) but there are only {len(labels)} labels; "
                          "the labels file and the annotation list do not match")


def _records(source, options: TrainOptions, labels, what: str) -> tuple[list[VideoRecord], list[str] | None]:
    if source is None:
        raise ConfigError(f"no {what} data given")
    if isinstance(source, (str, os.PathLike)):
        return load_records(source, options.data_root, labels if not isinstance(labels, str) else None,
                            options.frame_template, options.list_format)
    records = list(source)
    if not records:
        raise ConfigError(f"{what} data is empty")
    return records, None


def set_partial_bn(model: nn.Module) -> list[nn.Module]:
    """TSN's partial BN: freeze the statistics and affine parameters of every BN layer but the first.

    Returns the frozen layers; call :func:`apply_partial_bn` after every ``model.train()``.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns[1:]:
        for p in bn.parameters():
            p.requires_grad_(False)
    return bns[1:]


def apply_partial_bn(frozen: Sequence[nn.Module]) -> None:
    for bn in frozen:
        bn.eval()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only, not on BN parameters and biases (as in TSM's policies)."""
    decay, no_decay = [], []
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
            (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(epoch: float, epochs: int, schedule: str, lr_steps: Sequence[int], warmup_epochs: float) -> float:
    """Learning-rate multiplier at ``epoch`` (fractional): linear warm-up, then step (x0.1 at each of
    ``lr_steps``) or cosine to zero at ``epochs``."""
    warm = 1.0
    if warmup_epochs > 0 and epoch < warmup_epochs:
        warm = max(epoch / warmup_epochs, 1e-3)
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-8)
        progress = min(max(epoch - warmup_epochs, 0.0) / span, 1.0)
        return warm * 0.5 * (1 + math.cos(math.pi * progress))
    return warm * 0.1 ** sum(epoch >= s for s in lr_steps)


class EpochScheduler:
    """Sets every group's lr to ``base_lr * fn(progress)``, progress in epochs (fractional within an epoch).

    Progress rather than an iteration count, so that epochs of different lengths (matched warm-up batches,
    skipped videos) keep the schedule in epochs. Its state is plain numbers (weights_only checkpoints).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fn) -> None:
        self.optimizer = optimizer
        self.fn = fn
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.progress = 0.0
        self.step(0.0)

    def step(self, progress: float) -> None:
        self.progress = float(progress)
        factor = self.fn(self.progress)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs), "progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self.step(state["progress"])


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def build_model(options: TrainOptions, num_classes: int) -> nn.Module:
    """A fresh model of ``options.model`` (with ``model_args``), pretrained weights loaded when given."""
    if not options.model:
        raise ConfigError("no model given (--model NAME; `streamtsm models` lists them)")
    spec = get_spec(options.model)
    args = dict(options.model_args)
    if "input_size" in args and "resize_size" not in args:
        # Keep the 224/256 ratio of the default crop, so the centre crop sees the same part of the frame.
        args["resize_size"] = round(args["input_size"] * 256 / 224)
    if spec.kind == "clip" and "num_segments" in args and "clip_len" not in args:
        args.setdefault("clip_len", args["num_segments"])
    model = create(options.model, num_classes=num_classes, **args)
    if options.weights:
        info = load_checkpoint(model, options.weights, reset_head=options.reset_head,
                               allow_shift_mismatch=options.allow_shift_mismatch)
        log.info("loaded %s weights from %s", info["format"], options.weights)
    return model


# -- the run ------------------------------------------------------------------------------------------------


def train(options: TrainOptions) -> dict:
    """Train a model; see the module docstring for what a run writes.

    Returns:
        The final log record: ``best_top1``, ``best_epoch``, ``val`` (the last epoch's metrics), ``checkpoint``,
        ``best_checkpoint``, ``skipped`` (unreadable videos), ``train_time_s``, ...

    Raises:
        ConfigError: bad options, missing or inconsistent data.
        CheckpointError: weights or resume checkpoint that cannot be used.
    """
    o = options
    if o.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {o.optimizer!r}")
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {o.schedule!r}")
    if o.epochs < 1 or o.batch_size < 1:
        raise ConfigError(f"epochs and batch size must be >= 1, got {o.epochs}, {o.batch_size}")
    if o.lr <= 0 or o.workers < 0 or o.warmup_epochs < 0:
        raise ConfigError("lr must be > 0, workers and warmup epochs >= 0")
    if not o.scales or not all(0 < float(x) <= 1 for x in o.scales):
        raise ConfigError(f"crop scales must be fractions in (0, 1], got {list(o.scales)}")
    if o.frame_loss < 0:
        raise ConfigError(f"frame loss frames must be >= 0, got {o.frame_loss}")
    device = resolve_device(o.device)
    torch.manual_seed(o.seed)
    np.random.seed(o.seed % 2**32)
    out = Path(o.out)

    resume_ckpt = read_checkpoint(o.resume) if o.resume else None
    if resume_ckpt is not None and (resume_ckpt.get("format") != "streamtsm" or "extra" not in resume_ckpt
                                    or "optimizer" not in resume_ckpt["extra"]):
        raise CheckpointError(f"{o.resume} is not a training checkpoint of streamtsm train (no optimizer state)")

    if resume_ckpt is not None:
        saved = resume_ckpt["extra"].get("recipe", {})
        for key in ("optimizer", "schedule"):
            if key in saved and saved[key] != getattr(o, key):
                raise ConfigError(f"{o.resume} was trained with --{key} {saved[key]}; resume it with the same "
                                  f"--{key} (got {getattr(o, key)})")

    label_option = o.labels
    if label_option is None and resume_ckpt is not None:
        label_option = resume_ckpt["config"].get("labels")
    names = read_labels(label_option) if isinstance(label_option, (str, os.PathLike)) else label_option
    train_records, folder_labels = _records(o.train, o, names, "train")
    weights_labels = None
    if o.weights and names is None and folder_labels is None and not o.reset_head:
        weights_ckpt = read_checkpoint(o.weights)
        weights_labels = (weights_ckpt.get("config") or {}).get("labels") if weights_ckpt.get(
            "format") == "streamtsm" else None
    labels = resolve_labels(names, folder_labels, o.train, train_records, weights_labels)
    check_labels(train_records, labels, "the train data")
    val_records = None
    if o.val is not None:
        val_records, _ = _records(o.val, o, labels, "val")
        check_labels(val_records, labels, "the val data")

    if resume_ckpt is not None:
        model = load_model(o.resume)
        if o.model and o.model != model.cfg.name:
            raise ConfigError(f"--resume checkpoint holds {model.cfg.name}, not {o.model}")
        if model.cfg.num_classes != len(labels):
            raise ConfigError(f"--resume checkpoint has {model.cfg.num_classes} classes, the data {len(labels)}")
    else:
        model = build_model(o, len(labels))
    model.to(device)
    cfg = model.cfg
    if o.frame_loss and "per_frame" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"{cfg.name} has no per-frame output; --frame-loss needs a TSN/TSM-style model")

    # Data.
    flip_map = {}
    if o.flip_swap:
        pairs = mirrored_pairs(labels) if o.flip_swap == "auto" else list(o.flip_swap)
        flip_map = flip_label_map(labels, pairs)
    if o.flip and not flip_map and any(mirrored_pairs(labels)):
        log.warning("--flip on classes with mirrored meanings (%s) and no --flip-swap: flipped clips keep their "
                    "label", ", ".join("/".join(p) for p in mirrored_pairs(labels)))
    sampling = {"sampling": o.sampling, "clip_len": o.clip_len, "frame_interval": o.frame_interval, "short": o.short}
    common = {"frame_template": o.frame_template, "start_index": o.start_index}
    train_set = ClipDataset(train_records, sampler_for(model, train=True, **sampling),
                            TrainTransform.for_config(cfg, scales=o.scales, flip=o.flip, flip_label_map=flip_map),
                            train=True, **common)
    sampling_used = train_set.sampler.describe()["kind"]
    if sampling_used == "dense":
        # The checkpoint records the clips the model learned from, so `streamtsm run` feeds an online model every
        # frame_interval-th frame and samples a clip model's windows the same way, and `eval` reads it back.
        model.cfg = dataclasses.replace(cfg, frame_interval=train_set.sampler.frame_interval,
                                        clip_len=train_set.sampler.clip_len)
        cfg = model.cfg
    loader_gen = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=o.batch_size, shuffle=True, num_workers=o.workers,
                              collate_fn=collate_clips, worker_init_fn=worker_init, generator=loader_gen,
                              drop_last=len(train_set) > o.batch_size, pin_memory=device.type == "cuda",
                              persistent_workers=o.workers > 0)
    val_set = None
    if val_records is not None:
        val_set = ClipDataset(val_records, sampler_for(model, train=False, **sampling), TestTransform(cfg, 1),
                              train=False, **common)

    # Optimization.
    frozen_bn = set_partial_bn(model) if o.partial_bn else []
    if o.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups(model, o.weight_decay), lr=o.lr, momentum=o.momentum)
    else:
        optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.momentum, 0.999))
    if len(train_loader) == 0:
        raise ConfigError("the train data holds no clips")
    lr_steps = list(o.lr_steps) if o.lr_steps else [s for s in (round(o.epochs * 0.5), round(o.epochs * 0.75)) if s]
    scheduler = EpochScheduler(optimizer, lambda e: lr_factor(e, o.epochs, o.schedule, lr_steps, o.warmup_epochs))
    matched_loaders = []
    for e in range(o.matched_warmup_epochs):
        # One scene per batch at first, then geometrically more scenes (and fewer classes of each) per batch,
        # towards shuffled batches.
        scenes = round(len(labels) ** (e / o.matched_warmup_epochs))
        sampler = MatchedBatchSampler(train_records, scenes, len(labels) if scenes > 1 else None, loader_gen)
        matched_loaders.append(DataLoader(train_set, batch_sampler=sampler, num_workers=o.workers,
                                          collate_fn=collate_clips, worker_init_fn=worker_init,
                                          pin_memory=device.type == "cuda"))
    use_amp = o.amp and device.type == "cuda"
    if o.amp and not use_amp:
        log.info("--amp applies on CUDA only; training in float32 on %s", device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, best_top1, best_epoch = 1, -1.0, 0
    if resume_ckpt is not None:
        extra = resume_ckpt["extra"]
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        if extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        start_epoch = int(extra["epoch"]) + 1
        best_top1, best_epoch = float(extra.get("best_top1", -1.0)), int(extra.get("best_epoch", 0))
        log.info("resuming %s at epoch %d", o.resume, start_epoch)

    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.txt").write_text("\n".join(labels) + "\n")
    log_path = out / "log.jsonl"
    if resume_ckpt is None and log_path.exists():
        log_path.unlink()
    run_info = {"model": cfg.name, "arch": cfg.arch, "input_size": cfg.input_size, "resize_size": cfg.resize_size,
                "num_classes": cfg.num_classes, "device": str(device), "amp": use_amp,
                "sampler": type(train_set.sampler).__name__, "train_videos": len(train_records),
                "val_videos": len(val_records) if val_records is not None else 0}
    _append(log_path, {"event": "start", "resumed_from": o.resume, "start_epoch": start_epoch, **run_info,
                       "options": o.to_json()})

    skipped_paths: set[str] = set()
    last_val: dict | None = None
    t_run = time.perf_counter()
    record: dict = {}
    for epoch in range(start_epoch, o.epochs + 1):
        seed = _epoch_seed(o.seed, epoch)
        torch.manual_seed(seed)  # per-epoch seeds: a resumed run draws what the uninterrupted one would have
        loader_gen.manual_seed(seed)
        model.train()
        apply_partial_bn(frozen_bn)
        matched = epoch <= len(matched_loaders)
        loader = matched_loaders[epoch - 1] if matched else train_loader
        stats = _train_epoch(model, loader, optimizer, scheduler, scaler, device, o, epoch, use_amp)
        stats["matched_batches"] = matched
        skipped_paths |= set(stats.pop("skipped_paths"))
        record = {"event": "epoch", "epoch": epoch, **stats}
        is_best = False
        if val_set is not None:
            scores, val_labels, val_skipped = predict_offline(model, val_set, batch_size=o.val_batch_size or
                                                              o.batch_size, workers=o.workers, device=device,
                                                              amp=use_amp)
            skipped_paths |= {s.path for s in val_skipped}
            m = classification_metrics(scores, val_labels, cfg.num_classes)
            last_val = {k: m[k] for k in ("top1", "top5", "mean_class_acc", "count")}
            last_val["skipped"] = len(val_skipped)
            record["val"] = last_val
            is_best = m["top1"] > best_top1
            if is_best:
                best_top1, best_epoch = m["top1"], epoch
        else:
            is_best = True
            best_epoch = epoch
        record.update(best_top1=best_top1 if val_set is not None else None, best_epoch=best_epoch, is_best=is_best)
        extra = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "recipe": {"optimizer": o.optimizer, "schedule": o.schedule, "sampling": sampling_used},
                 "scaler": scaler.state_dict() if use_amp else {}, "best_top1": best_top1, "best_epoch": best_epoch,
                 "val": last_val or {}}
        model.eval()
        save_checkpoint(model, out / "checkpoint.pth", labels=labels, extra=extra)
        if is_best:
            save_checkpoint(model, out / "best.pth", labels=labels,
                            extra={"epoch": epoch, "val": last_val or {}, "best_top1": best_top1,
                                   "recipe": extra["recipe"]})
        _append(log_path, record)
        msg = (f"epoch {epoch}/{o.epochs}: loss {stats['train_loss']:.4f}, train top-1 "
               f"{100 * stats['train_top1']:.1f}%, {stats['clips_per_s']:.1f} clips/s")
        if last_val is not None:
            msg += (f", val top-1 {100 * last_val['top1']:.1f}% top-5 {100 * last_val['top5']:.1f}% "
                    f"mean class {100 * last_val['mean_class_acc']:.1f}%")
        if stats["skipped"]:
            msg += f", skipped {stats['skipped']} unreadable"
        (tqdm.write if o.progress else log.info)(msg)

    final = {"event": "final", "model": cfg.name, "epochs": o.epochs, "best_top1": best_top1 if val_set else None,
             "best_epoch": best_epoch, "val": last_val, "checkpoint": str(out / "checkpoint.pth"),
             "best_checkpoint": str(out / "best.pth"), "skipped": sorted(skipped_paths),
             "train_time_s": round(time.perf_counter() - t_run, 2), "labels": labels, **run_info}
    if record:
        final["last_epoch"] = {k: record[k] for k in ("train_loss", "train_top1", "clips_per_s") if k in record}
    _append(log_path, final)
    return final


def _train_epoch(model, loader, optimizer, scheduler, scaler, device, o: TrainOptions, epoch: int,
                 use_amp: bool) -> dict:
    loss_sum, correct, seen, skipped = 0.0, 0, 0, []
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}/{o.epochs}", disable=not o.progress, leave=False, dynamic_ncols=True)
    num_batches = len(loader)
    for i, batch in enumerate(bar):
        scheduler.step(epoch - 1 + i / num_batches)
        skipped += batch.skipped
        if not len(batch):
            continue
        x = batch.clips.to(device, non_blocking=True)
        y = batch.labels.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            if o.frame_loss:
                frames = model(x, per_frame=True)[:, -o.frame_loss :].float()  # [B, K, classes]
                loss = nn.functional.cross_entropy(frames.flatten(0, 1), y.repeat_interleave(frames.shape[1]))
                logits = frames.mean(1)
            else:
                logits = model(x)
                loss = nn.functional.cross_entropy(logits.float(), y)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {loss.item()} at epoch {epoch}, batch {i + 1}; lower --lr or keep "
                                "--clip-grad (checkpoint.pth holds the last finished epoch)")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if o.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        n = len(y)
        loss_sum += loss.item() * n
        correct += int((logits.argmax(1) == y).sum())
        seen += n
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}%",
                        clips_s=f"{seen / elapsed:.1f}")
    bar.close()
    for s in skipped:
        log.warning("skipped unreadable video %s: %s", s.path, s.reason)
    elapsed = time.perf_counter() - t0
    return {"lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / max(seen, 1),
            "train_top1": correct / max(seen, 1), "clips": seen, "clips_per_s": seen / max(elapsed, 1e-9),
            "epoch_time_s": round(elapsed, 2), "skipped": len(skipped), "skipped_paths": [s.path for s in skipped]}


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(v):
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, (Path, os.PathLike)):
        return str(v)
    return str(v)


# -- evaluation of a saved model ----------------------------------------------------------------------------


def load_for_eval(weights: str, device: str = "auto", **overrides) -> nn.Module:
    """A streamtsm checkpoint rebuilt for evaluation (its labels in ``model.cfg.labels``)."""
    model = load_model(weights, **overrides)
    return model.to(resolve_device(device)).eval()


__all__ = ["EpochScheduler", "TrainOptions", "apply_partial_bn", "build_model", "check_labels", "load_for_eval", "lr_factor",
           "param_groups", "resolve_device", "resolve_labels", "set_partial_bn", "train"]
