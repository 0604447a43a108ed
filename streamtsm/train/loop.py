"""The training loop: the TSM recipe (SGD with momentum and weight decay, step or cosine schedule with linear
warm-up, gradient clipping at norm 40, optional partial BN), checkpoints every epoch, resume, validation.

Online models (uni-directional shift) train in their clip form: the clip form of a uni-directional TSM is the
online model run over the clip, so the weights run frame by frame afterwards unchanged.

:func:`train` is a short sequence: check the options, read the resume checkpoint, prepare the data and the model
(:func:`streamtsm.models.load`: a streamtsm checkpoint given as weights names its own architecture), the loaders
and the optimization, restore the resumed state, then per epoch: train, validate, checkpoint and log.

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

from ..errors import CheckpointError, ConfigError, StreamTSMError, first_line
from ..labels import read_labels
from ..models import get_spec, load, read_checkpoint, save_checkpoint
from ..models.checkpoint import check_recorded_config
from ..models.loading import is_streamtsm, read_weights
from .annotations import FRAME_TEMPLATE, VideoRecord, load_records
from .data import ClipDataset, MatchedBatchSampler, collate_clips, worker_init
from .evaluate import classification_metrics, predict_offline
from .optim import OPTIMIZERS, SCHEDULES, EpochScheduler, apply_partial_bn, lr_factor, make_optimizer, set_partial_bn
from .sampling import sampler_for
from .transforms import TestTransform, TrainTransform, flip_label_map, mirrored_pairs

log = logging.getLogger(__name__)


class TrainingError(StreamTSMError):
    """Training cannot go on (the loss diverged)."""


@dataclass
class TrainOptions:
    """Everything a training run needs; the ``streamtsm train`` options map onto these one to one.

    ``train``/``val`` are an annotation list, a class-folder root, or a list of :class:`VideoRecord` (in-memory
    data). ``model_args`` holds architecture or config overrides for :func:`streamtsm.models.create`
    (``num_segments``, ``input_size``, ``width_mult``, ``width``, ``dropout``, ...). ``lr_steps`` are epochs at
    which the step schedule divides the learning rate by 10 (default: 50% and 75% of the epochs).
    ``optimizer``: ``"sgd"`` with momentum, the TSM recipe for fine-tuning pretrained weights, or ``"adamw"``
    (``momentum`` is its beta1), which trains from scratch much sooner: SGD barely moves a backbone behind a
    classifier initialized near zero. ``matched_warmup_epochs``: the first epochs draw each batch from one scene
    shown in every class (:class:`~streamtsm.train.data.MatchedBatchSampler`), which makes a TSM trained from
    scratch pick up motion many times sooner; they count towards ``epochs``. ``frame_loss`` = K > 0: the loss is the
    mean cross-entropy of each of the last K frames' outputs (``model(clip, per_frame=True)``) rather than of the
    clip average; for online models, whose output at every frame is what a live stream reports. ``weights``: a
    streamtsm checkpoint names its own architecture, so ``model`` and ``model_args`` may be left out.
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
    epoch_lines: bool = False  # without the progress bar: print each epoch's line to stdout (else it is logged)

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


# -- preparation ----------------------------------------------------------------------------------------------


def check_options(o: TrainOptions) -> None:
    """Reject options no run can use, before any data is read.

    Raises:
        ConfigError: naming the option, what it must be and what it is.
    """
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
    for key in ("resume", "weights"):
        value = getattr(o, key)
        if isinstance(value, (str, os.PathLike)) and str(value).endswith(".tmp"):
            raise ConfigError(f"--{key} {value} is a temporary file a checkpoint is written to before it is "
                              "renamed (partial if left behind); expected a .pth checkpoint")


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


def read_resume(o: TrainOptions) -> dict | None:
    """The checkpoint ``o.resume`` names, checked to be a training checkpoint of the same recipe; None without one.

    Raises:
        CheckpointError: it is not a checkpoint of ``streamtsm train``.
        ConfigError: it was trained with another optimizer or schedule.
    """
    if not o.resume:
        return None
    checkpoint = read_checkpoint(o.resume)
    if not is_streamtsm(checkpoint) or "extra" not in checkpoint or "optimizer" not in checkpoint["extra"]:
        raise CheckpointError(f"{o.resume} is not a training checkpoint of streamtsm train (no optimizer state)")
    check_recorded_config(checkpoint, str(o.resume))  # its labels and config are read before models.load checks
    saved = checkpoint["extra"].get("recipe", {})
    for key in ("optimizer", "schedule"):
        if key in saved and saved[key] != getattr(o, key):
            raise ConfigError(f"{o.resume} was trained with --{key} {saved[key]}; resume it with the same "
                              f"--{key} (got {getattr(o, key)})")
    return checkpoint


@dataclass
class TrainData:
    """The class names and the records of a run."""

    labels: list[str]
    train: list[VideoRecord]
    val: list[VideoRecord] | None


def saved_config(weights: str | os.PathLike) -> dict:
    """The config a streamtsm checkpoint records (name, classes, labels, ...); empty for a foreign one."""
    checkpoint, where = read_weights(weights)  # a path or a catalog name (fetched once, then cached)
    if not is_streamtsm(checkpoint):
        return {}
    check_recorded_config(checkpoint, where)
    return checkpoint["config"]


def data_labels(option, folder_labels: list[str] | None, train_source, records: Sequence[VideoRecord],
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


def prepare_data(o: TrainOptions, resume: dict | None) -> TrainData:
    """Read the train and val records and decide the class names (:func:`data_labels`; a resumed run keeps its
    own).

    Raises:
        ConfigError: missing data, or labels that do not cover the records.
    """
    label_option = o.labels
    if label_option is None and resume is not None:
        label_option = resume["config"].get("labels")
    names = read_labels(label_option) if isinstance(label_option, (str, os.PathLike)) else label_option
    train_records, folder_labels = _records(o.train, o, names, "train")
    weights_labels = None
    if o.weights and names is None and folder_labels is None and not o.reset_head:
        weights_labels = saved_config(o.weights).get("labels")
    labels = data_labels(names, folder_labels, o.train, train_records, weights_labels)
    check_labels(train_records, labels, "the train data")
    val_records = None
    if o.val is not None:
        val_records, _ = _records(o.val, o, labels, "val")
        check_labels(val_records, labels, "the val data")
    return TrainData(labels, train_records, val_records)


def build_model(options: TrainOptions, num_classes: int) -> nn.Module:
    """The model to train: ``options.model`` with ``model_args``, its pretrained ``weights`` loaded; a streamtsm
    checkpoint as weights names its own architecture (:func:`streamtsm.models.load`)."""
    args = dict(options.model_args)
    if "input_size" in args and "resize_size" not in args:
        # Keep the 224/256 ratio of the default crop, so the centre crop sees the same part of the frame.
        args["resize_size"] = round(args["input_size"] * 256 / 224)
    name = options.model or (saved_config(options.weights).get("name") if options.weights else None)
    if name and get_spec(name).kind == "clip" and "num_segments" in args and "clip_len" not in args:
        args.setdefault("clip_len", args["num_segments"])
    model = load(options.weights, model=options.model, num_classes=num_classes, reset_head=options.reset_head,
                 allow_shift_mismatch=options.allow_shift_mismatch, **args)
    if options.weights:
        log.info("loaded %s weights from %s", model.cfg.name, options.weights)
    return model


def prepare_model(o: TrainOptions, data: TrainData, resume: dict | None, device: torch.device) -> nn.Module:
    """The model on ``device``: rebuilt from the resume checkpoint, else :func:`build_model`.

    Raises:
        ConfigError: the resumed model is another one or has another class count; --frame-loss on a model without
            per-frame outputs.
    """
    if resume is not None:
        model = load(o.resume, model=o.model)
        if model.cfg.num_classes != len(data.labels):
            raise ConfigError(f"--resume checkpoint has {model.cfg.num_classes} classes, the data "
                              f"{len(data.labels)}")
    else:
        model = build_model(o, len(data.labels))
    model.to(device)
    if o.frame_loss and "per_frame" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"{model.cfg.name} has no per-frame output; --frame-loss needs a TSN/TSM-style model")
    return model


@dataclass
class Loaders:
    """The datasets and loaders of a run; ``matched[e - 1]`` serves epoch e of the matched warm-up."""

    train_set: ClipDataset
    train: DataLoader
    val_set: ClipDataset | None
    matched: list[DataLoader]
    generator: torch.Generator

    @property
    def sampling(self) -> str:
        """``"segments"`` or ``"dense"``: how the train clips are sampled (checkpoints record it)."""
        return self.train_set.sampler.describe()["kind"]

    def for_epoch(self, epoch: int) -> DataLoader:
        return self.matched[epoch - 1] if epoch <= len(self.matched) else self.train


def require_readable(dataset: ClipDataset, source, what: str) -> None:
    """Refuse a list none of whose clips can be read: the run would "train" on nothing (every batch skipped) or
    validate on nothing, and write a checkpoint that looks like a trained model.

    Raises:
        ConfigError: naming the list, how many clips it has and the first reason a clip could not be read.
    """
    index, failure = dataset.first_readable()
    if index is None:
        name = f"{what} list {source}" if isinstance(source, (str, os.PathLike)) else f"the {what} data"
        raise ConfigError(f"{name}: none of its {len(dataset)} clips can be read (e.g. {failure.path}: "
                          f"{first_line(failure.reason)}); expected at least one readable clip")
    if failure is not None:
        log.warning("%s data: %s is unreadable (%s); its other clips are read as they come", what, failure.path,
                    first_line(failure.reason))


def prepare_loaders(o: TrainOptions, model: nn.Module, data: TrainData, device: torch.device) -> Loaders:
    """The train (and matched warm-up) loaders and the val set. Dense sampling records its clips in ``model.cfg``.

    Raises:
        ConfigError: the train data holds no clips, or a flip swap names an unknown label.
    """
    labels, cfg = data.labels, model.cfg
    flip_map = {}
    if o.flip_swap:
        pairs = mirrored_pairs(labels) if o.flip_swap == "auto" else list(o.flip_swap)
        flip_map = flip_label_map(labels, pairs)
    if o.flip and not flip_map and any(mirrored_pairs(labels)):
        log.warning("--flip on classes with mirrored meanings (%s) and no --flip-swap: flipped clips keep their "
                    "label", ", ".join("/".join(p) for p in mirrored_pairs(labels)))
    sampling = {"sampling": o.sampling, "clip_len": o.clip_len, "frame_interval": o.frame_interval, "short": o.short}
    common = {"frame_template": o.frame_template, "start_index": o.start_index}
    train_set = ClipDataset(data.train, sampler_for(model, train=True, **sampling),
                            TrainTransform.for_config(cfg, scales=o.scales, flip=o.flip, flip_label_map=flip_map),
                            train=True, **common)
    if train_set.sampler.describe()["kind"] == "dense":
        # The checkpoint records the clips the model learned from, so `streamtsm run` feeds an online model every
        # frame_interval-th frame and samples a clip model's windows the same way, and `eval` reads it back.
        model.cfg = dataclasses.replace(cfg, frame_interval=train_set.sampler.frame_interval,
                                        clip_len=train_set.sampler.clip_len)
        cfg = model.cfg
    generator = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=o.batch_size, shuffle=True, num_workers=o.workers,
                              collate_fn=collate_clips, worker_init_fn=worker_init, generator=generator,
                              drop_last=len(train_set) > o.batch_size, pin_memory=device.type == "cuda",
                              persistent_workers=o.workers > 0)
    if len(train_loader) == 0:
        raise ConfigError("the train data holds no clips")
    require_readable(train_set, o.train, "train")
    val_set = None
    if data.val is not None:
        val_set = ClipDataset(data.val, sampler_for(model, train=False, **sampling), TestTransform(cfg, 1),
                              train=False, **common)
        require_readable(val_set, o.val, "val")
    matched = []
    for e in range(o.matched_warmup_epochs):
        # One scene per batch at first, then geometrically more scenes (and fewer classes of each) per batch,
        # towards shuffled batches.
        scenes = round(len(labels) ** (e / o.matched_warmup_epochs))
        sampler = MatchedBatchSampler(data.train, scenes, len(labels) if scenes > 1 else None, generator)
        matched.append(DataLoader(train_set, batch_sampler=sampler, num_workers=o.workers,
                                  collate_fn=collate_clips, worker_init_fn=worker_init,
                                  pin_memory=device.type == "cuda"))
    return Loaders(train_set, train_loader, val_set, matched, generator)


@dataclass
class Optimization:
    """What changes the weights: optimizer, schedule, gradient scaler, the BN layers partial BN froze."""

    optimizer: torch.optim.Optimizer
    scheduler: EpochScheduler
    scaler: torch.amp.GradScaler
    frozen_bn: list[nn.Module]
    use_amp: bool

    def state(self) -> dict:
        """The state a training checkpoint keeps to resume."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.use_amp else {}}


def prepare_optimization(o: TrainOptions, model: nn.Module, device: torch.device) -> Optimization:
    """Partial BN (when asked), the optimizer, the epoch schedule and the AMP gradient scaler."""
    frozen_bn = set_partial_bn(model) if o.partial_bn else []
    optimizer = make_optimizer(model, o.optimizer, o.lr, o.momentum, o.weight_decay)
    lr_steps = list(o.lr_steps) if o.lr_steps else [s for s in (round(o.epochs * 0.5), round(o.epochs * 0.75)) if s]
    scheduler = EpochScheduler(optimizer, lambda e: lr_factor(e, o.epochs, o.schedule, lr_steps, o.warmup_epochs))
    use_amp = o.amp and device.type == "cuda"
    if o.amp and not use_amp:
        log.info("--amp applies on CUDA only; training in float32 on %s", device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    return Optimization(optimizer, scheduler, scaler, frozen_bn, use_amp)


# -- resume ---------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands: the next epoch, the best val top-1 so far and its epoch (-1 and 0 before any)."""

    start_epoch: int = 1
    best_top1: float = -1.0
    best_epoch: int = 0


def restore(resume: dict | None, opt: Optimization, source: str | None) -> Progress:
    """Load the optimizer, schedule and scaler state of a resume checkpoint; the progress it records."""
    if resume is None:
        return Progress()
    extra = resume["extra"]
    opt.optimizer.load_state_dict(extra["optimizer"])
    opt.scheduler.load_state_dict(extra["scheduler"])
    if extra.get("scaler"):
        opt.scaler.load_state_dict(extra["scaler"])
    progress = Progress(int(extra["epoch"]) + 1, float(extra.get("best_top1", -1.0)), int(extra.get("best_epoch", 0)))
    log.info("resuming %s at epoch %d", source, progress.start_epoch)
    return progress


# -- one epoch ------------------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def run_epoch(model: nn.Module, epoch: int, o: TrainOptions, loaders: Loaders, opt: Optimization,
              device: torch.device) -> tuple[dict, set[str]]:
    """Train one epoch, then validate when there is a val set.

    Returns:
        ``(stats, skipped paths)``; ``stats`` holds the train loss, accuracy and speed, ``matched_batches`` and,
        with a val set, ``val`` (top1, top5, mean_class_acc, count, skipped).
    """
    seed = _epoch_seed(o.seed, epoch)
    torch.manual_seed(seed)  # per-epoch seeds: a resumed run draws what the uninterrupted one would have
    loaders.generator.manual_seed(seed)
    model.train()
    apply_partial_bn(opt.frozen_bn)
    stats = _train_epoch(model, loaders.for_epoch(epoch), opt.optimizer, opt.scheduler, opt.scaler, device, o, epoch,
                         opt.use_amp)
    stats["matched_batches"] = epoch <= len(loaders.matched)
    skipped = set(stats.pop("skipped_paths"))
    if loaders.val_set is not None:
        scores, val_labels, val_skipped = predict_offline(model, loaders.val_set, batch_size=o.val_batch_size or
                                                          o.batch_size, workers=o.workers, device=device,
                                                          amp=opt.use_amp)
        skipped |= {s.path for s in val_skipped}
        m = classification_metrics(scores, val_labels, model.cfg.num_classes)
        stats["val"] = {k: m[k] for k in ("top1", "top5", "mean_class_acc", "count")}
        stats["val"]["skipped"] = len(val_skipped)
    return stats, skipped


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


# -- checkpointing and logging --------------------------------------------------------------------------------


class RunLog:
    """The out folder of a run: ``labels.txt``, ``log.jsonl`` (a start record, one per epoch, a final one) and the
    checkpoints."""

    def __init__(self, o: TrainOptions, labels: list[str], run_info: dict, start_epoch: int) -> None:
        self.out = Path(o.out)
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)
        (self.out / "labels.txt").write_text("\n".join(labels) + "\n")
        self.path = self.out / "log.jsonl"
        if o.resume is None and self.path.exists():
            self.path.unlink()
        self.run_info = run_info
        self.append({"event": "start", "resumed_from": o.resume, "start_epoch": start_epoch, **run_info,
                     "options": o.to_json()})

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")

    def save_checkpoints(self, model: nn.Module, labels: list[str], extra: dict, is_best: bool) -> None:
        """``checkpoint.pth`` with the resume state in ``extra``; ``best.pth`` too on the best epoch."""
        model.eval()
        save_checkpoint(model, self.out / "checkpoint.pth", labels=labels, extra=extra)
        if is_best:
            save_checkpoint(model, self.out / "best.pth", labels=labels,
                            extra={"epoch": extra["epoch"], "val": extra["val"], "best_top1": extra["best_top1"],
                                   "recipe": extra["recipe"]})


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the ``*.pth.tmp`` files a killed run left in its out folder (a checkpoint is written to ``.tmp`` and
    renamed, so such a file is a partial write, never a checkpoint). Returns the files removed."""
    removed = []
    for tmp in sorted(out.glob("*.pth.tmp")):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
            log.info("removed %s, a partial checkpoint left by an interrupted run", tmp)
    return removed


def run_info(model: nn.Module, device: torch.device, opt: Optimization, loaders: Loaders, data: TrainData) -> dict:
    """What the start and final log records say about the run."""
    cfg = model.cfg
    return {"model": cfg.name, "arch": cfg.arch, "input_size": cfg.input_size, "resize_size": cfg.resize_size,
            "num_classes": cfg.num_classes, "device": str(device), "amp": opt.use_amp,
            "sampler": type(loaders.train_set.sampler).__name__, "train_videos": len(data.train),
            "val_videos": len(data.val) if data.val is not None else 0}


def epoch_message(epoch: int, epochs: int, stats: dict) -> str:
    """The one line a finished epoch prints: loss, accuracies, speed, and its time when ``stats`` has
    ``seconds``."""
    msg = (f"epoch {epoch}/{epochs}: loss {stats['train_loss']:.4f}, train top-1 "
           f"{100 * stats['train_top1']:.1f}%, {stats['clips_per_s']:.1f} clips/s")
    val = stats.get("val")
    if val is not None:
        msg += (f", val top-1 {100 * val['top1']:.1f}% top-5 {100 * val['top5']:.1f}% "
                f"mean class {100 * val['mean_class_acc']:.1f}%")
    if stats["skipped"]:
        msg += f", skipped {stats['skipped']} unreadable"
    if stats.get("seconds") is not None:
        msg += f", {stats['seconds']:.1f} s"
    return msg


# -- the run --------------------------------------------------------------------------------------------------


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
    check_options(o)
    device = resolve_device(o.device)
    torch.manual_seed(o.seed)
    np.random.seed(o.seed % 2**32)
    resume = read_resume(o)
    data = prepare_data(o, resume)
    model = prepare_model(o, data, resume, device)
    loaders = prepare_loaders(o, model, data, device)
    opt = prepare_optimization(o, model, device)
    progress = restore(resume, opt, o.resume)
    run_log = RunLog(o, data.labels, run_info(model, device, opt, loaders, data), progress.start_epoch)

    skipped: set[str] = set()
    last_val: dict | None = None
    t_run = time.perf_counter()
    record: dict = {}
    for epoch in range(progress.start_epoch, o.epochs + 1):
        t_epoch = time.perf_counter()
        stats, epoch_skipped = run_epoch(model, epoch, o, loaders, opt, device)
        skipped |= epoch_skipped
        last_val = stats.pop("val", last_val)
        is_best = loaders.val_set is None or last_val["top1"] > progress.best_top1
        if is_best:
            progress.best_top1 = last_val["top1"] if loaders.val_set is not None else progress.best_top1
            progress.best_epoch = epoch
        record = {"event": "epoch", "epoch": epoch, **stats}
        if loaders.val_set is not None:
            record["val"] = last_val
        record.update(best_top1=progress.best_top1 if loaders.val_set is not None else None,
                      best_epoch=progress.best_epoch, is_best=is_best)
        extra = {"epoch": epoch, **opt.state(),
                 "recipe": {"optimizer": o.optimizer, "schedule": o.schedule, "sampling": loaders.sampling},
                 "best_top1": progress.best_top1, "best_epoch": progress.best_epoch, "val": last_val or {}}
        run_log.save_checkpoints(model, data.labels, extra, is_best)
        run_log.append(record)
        message = epoch_message(epoch, o.epochs, {**stats, "val": last_val,
                                                  "seconds": time.perf_counter() - t_epoch})
        if o.progress:
            tqdm.write(message)
        elif o.epoch_lines:  # a log file or a pipe sees every epoch, not silence until the end
            print(message, flush=True)
        else:
            log.info(message)
    return finish(run_log, o, model, progress, last_val, skipped, record, data.labels, time.perf_counter() - t_run)


def finish(run_log: RunLog, o: TrainOptions, model: nn.Module, progress: Progress, last_val: dict | None,
           skipped: set[str], record: dict, labels: list[str], seconds: float) -> dict:
    """Append the final record of a run to its log and return it."""
    has_val = o.val is not None
    final = {"event": "final", "model": model.cfg.name, "epochs": o.epochs,
             "best_top1": progress.best_top1 if has_val else None, "best_epoch": progress.best_epoch,
             "val": last_val, "checkpoint": str(run_log.out / "checkpoint.pth"),
             "best_checkpoint": str(run_log.out / "best.pth"), "skipped": sorted(skipped),
             "train_time_s": round(seconds, 2), "labels": labels, **run_log.run_info}
    if record:
        final["last_epoch"] = {k: record[k] for k in ("train_loss", "train_top1", "clips_per_s") if k in record}
    run_log.append(final)
    return final


def _json_default(v):
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, (Path, os.PathLike)):
        return str(v)
    return str(v)


# -- evaluation of a saved model ----------------------------------------------------------------------------


def load_for_eval(weights: str | os.PathLike | dict, device: str = "auto", **kwargs) -> nn.Module:
    """A model rebuilt for evaluation by :func:`streamtsm.models.load` (its labels in ``model.cfg.labels``), on
    ``device``."""
    return load(weights, **kwargs).to(resolve_device(device)).eval()


__all__ = ["Loaders", "Optimization", "Progress", "RunLog", "TrainData", "TrainOptions", "TrainingError",
           "build_model", "check_labels", "check_options", "data_labels", "load_for_eval", "prepare_data",
           "prepare_loaders", "prepare_model", "prepare_optimization", "read_resume", "resolve_device", "restore",
           "run_epoch", "train"]
