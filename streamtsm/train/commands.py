"""``streamtsm train``, ``streamtsm eval`` and ``streamtsm synth``: argument parsing over the library functions.

``add_commands(subparsers)`` adds the three commands to the CLI's sub-parsers. Handlers import torch lazily (the
CLI stays quick to start) and raise :class:`~streamtsm.errors.ConfigError` for bad input, which the CLI prints as
one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from ..errors import ConfigError
from ..settings import check_settings

log = logging.getLogger(__name__)

# The numeric data options train and eval share, then each command's: checked by the ranges of
# streamtsm.settings.RANGES before any data or model is read. (--scales, fractions in (0, 1], is checked with the
# other TrainOptions by streamtsm.train.loop.check_options, also before anything is read.)
_DATA_NUMERIC = ("start_index", "clip_len", "frame_interval", "workers")
NUMERIC_OPTIONS = {
    "train": ("epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_steps", "warmup_epochs", "clip_grad",
              "frame_loss", "matched_warmup", "seed", "num_segments", "input_size", "resize_size",
              "width_mult", "width", "dropout", *_DATA_NUMERIC),
    "eval": ("num_clips", "avg_last", "batch_size", *_DATA_NUMERIC),
    "synth": ("clips_per_class", "frames", "motion_frames", "seed", "val_fraction", "fps", "workers",
              "background_contrast"),
}


def _model_arg(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


def _pairs(text: str) -> list[tuple[str, str]] | str:
    if text == "auto":
        return text
    pairs = []
    for item in text.split(","):
        if item.count(":") != 1:
            raise argparse.ArgumentTypeError(f"expected auto or A:B[,C:D...], got {text!r}")
        a, b = item.split(":")
        pairs.append((a.strip(), b.strip()))
    return pairs


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-root", help="folder the paths in annotation lists are relative to "
                                       "(default: each list's own folder)")
    g.add_argument("--labels", help="class names, one per line (default: class folders, or labels.txt beside "
                                    "the train list)")
    g.add_argument("--list-format", choices=["auto", "video", "rawframes"], default="auto",
                   help="'path label' or 'frame_dir total_frames label' (default: detected)")
    g.add_argument("--frame-template", default="img_{:05d}.jpg", help="frame file names in frame folders")
    g.add_argument("--start-index", type=int, default=1, help="index of the first frame file (default 1)")
    g.add_argument("--sampling", choices=["auto", "segments", "dense"], default="auto",
                   help="TSN segments or dense consecutive clips (default: for train, dense for clip models without "
                        "segments and segments otherwise; for eval, as the checkpoint was trained)")
    g.add_argument("--clip-len", type=int, help="frames per dense clip (default: the model's)")
    g.add_argument("--frame-interval", type=int, help="step between frames of a dense clip (default: the model's)")
    g.add_argument("--short", choices=["loop", "repeat_last"], default="loop",
                   help="videos shorter than a clip: loop them or repeat their last frame")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: load in the main one)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", action="store_true", help="mixed precision (CUDA only; ignored on CPU)")


def add_commands(subparsers) -> None:
    """Add ``train``, ``eval`` and ``synth`` to the CLI's sub-parsers."""
    p = subparsers.add_parser("train", help="train or fine-tune a model on annotated videos",
                              description="Train a model on an annotation list (path label / frame_dir "
                                          "total_frames label) or a folder per class.")
    p.add_argument("--model", help="registered model name (`streamtsm models`); taken from a streamtsm checkpoint "
                                   "given as --weights or --resume")
    p.add_argument("--train", required=True, help="train annotation list or class-folder root")
    p.add_argument("--val", help="val annotation list or class-folder root")
    p.add_argument("--out", default="runs/train", help="output folder (checkpoints, log.jsonl, labels.txt)")
    p.add_argument("--weights", help="pretrained weights to start from: a streamtsm checkpoint (it names its "
                                     "architecture) or foreign weights for --model")
    p.add_argument("--reset-head", action="store_true", help="accept a classifier of another size (new classes)")
    p.add_argument("--allow-shift-mismatch", action="store_true",
                   help="load bi-directional weights into an online (uni-directional) model or the reverse")
    p.add_argument("--resume", help="continue a run from its checkpoint.pth (model, optimizer, schedule, epoch)")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, default=25)
    o.add_argument("--batch-size", type=int, default=8, help="clips per batch")
    o.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="SGD with momentum (the TSM recipe, for pretrained weights) or AdamW (from scratch)")
    o.add_argument("--lr", type=float, default=0.01)
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (AdamW: beta1)")
    o.add_argument("--weight-decay", type=float, default=5e-4, help="on conv/linear weights (not BN, biases)")
    o.add_argument("--schedule", choices=["step", "cosine"], default="step")
    o.add_argument("--lr-steps", type=int, nargs="+", help="epochs where the step schedule divides lr by 10 "
                                                           "(default: 50%% and 75%% of the epochs)")
    o.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up length")
    o.add_argument("--clip-grad", type=float, default=40.0, help="max gradient norm (0 disables)")
    o.add_argument("--partial-bn", action="store_true",
                   help="freeze every BN layer but the first (TSN; for fine-tuning pretrained weights)")
    o.add_argument("--frame-loss", type=int, default=0, metavar="K",
                   help="supervise each of the last K frames' outputs instead of the clip average (online models: "
                        "the output at every frame is what a live stream reports)")
    o.add_argument("--matched-warmup", type=int, default=0, metavar="EPOCHS",
                   help="first epochs batch one scene shown in every class (videos sharing a file name across "
                        "class folders, as `streamtsm synth` writes); speeds up learning motion from scratch")
    o.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.875, 0.75, 0.66],
                   help="multi-scale crop: crop sides as fractions of the short side (default: 1 .875 .75 .66)")
    o.add_argument("--flip", action="store_true",
                   help="random horizontal flips. Off by default: a mirrored move_left is a move_right, so "
                        "on direction classes use it only with --flip-swap")
    o.add_argument("--flip-swap", type=_pairs,
                   help="label pairs a flip swaps: A:B[,C:D] or 'auto' (left/right and _cw/_ccw by name)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    m = p.add_argument_group("model overrides")
    m.add_argument("--num-segments", type=int, help="frames per clip (T)")
    m.add_argument("--input-size", type=int, help="crop side fed to the network (resize size follows at 256/224)")
    m.add_argument("--resize-size", type=int, help="short side before the centre crop")
    m.add_argument("--width-mult", type=float, help="MobileNetV2 channel multiplier")
    m.add_argument("--width", type=int, help="ResNet stem/layer1 width")
    m.add_argument("--dropout", type=float, help="dropout before the classifier")
    m.add_argument("--model-arg", type=_model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the model (e.g. shift_div=4); repeatable")
    _add_data_options(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", help="evaluate a trained model (offline and online protocols)")
    p.add_argument("--weights", required=True, help="a streamtsm checkpoint (streamtsm train's best.pth)")
    p.add_argument("--val", required=True, help="annotation list or class-folder root")
    p.add_argument("--num-clips", type=int, default=8, help="temporal clips per video, offline protocol")
    p.add_argument("--crops", type=int, choices=[1, 3], default=1, help="spatial crops per clip, offline protocol")
    p.add_argument("--twice-sample", action="store_true", help="add the start of every segment (2x clips)")
    p.add_argument("--online", dest="online", action="store_true", default=None,
                   help="run the online protocol (default: when the model has a step form)")
    p.add_argument("--no-online", dest="online", action="store_false")
    p.add_argument("--avg-last", type=int, default=4, help="frames averaged in the smoothed online prediction")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", dest="json_out", help="write the results as JSON to this file ('-': stdout)")
    _add_data_options(p)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("synth", help="render the synthetic motion dataset (videos + annotation lists)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--clips-per-class", type=int, default=50)
    p.add_argument("--frames", type=int, default=16, help="frames per clip (the motion spans the whole clip)")
    p.add_argument("--motion-frames", type=int,
                   help="frames the motion spans (default: --frames); more gives slower motions, each clip a "
                        "window of --frames of it (60: the speed of the live synthetic source)")
    p.add_argument("--size", default="64", help="frame size: S (square) or WIDTHxHEIGHT")
    p.add_argument("--render-size", help="render at this size and shrink to --size (as a pipeline shrinks a camera)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--classes", nargs="+", help="a subset of the motions (default: all nine)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate written in the videos")
    p.add_argument("--workers", type=int, default=0, help="render in this many processes")
    p.add_argument("--background-contrast", type=float, metavar="C",
                   help="the background clutter's contrast, 0 (flat) to 1 (busy); default 0.25, the live scene's")
    p.set_defaults(func=cmd_synth)


def train_options(args: argparse.Namespace):
    """The :class:`~streamtsm.train.loop.TrainOptions` of parsed ``train`` arguments."""
    from .loop import TrainOptions

    model_args = dict(args.model_arg)
    for key in ("num_segments", "input_size", "resize_size", "width_mult", "width", "dropout"):
        value = getattr(args, key)
        if value is not None:
            model_args[key] = value
    if args.resume and model_args:
        raise ConfigError(f"--resume rebuilds the model from its checkpoint; drop {sorted(model_args)}")
    return TrainOptions(
        model=args.model, train=args.train, val=args.val, out=args.out, data_root=args.data_root,
        labels=args.labels, weights=args.weights, reset_head=args.reset_head,
        allow_shift_mismatch=args.allow_shift_mismatch, model_args=model_args, epochs=args.epochs,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule, lr_steps=args.lr_steps, warmup_epochs=args.warmup_epochs,
        clip_grad=args.clip_grad or None, partial_bn=args.partial_bn,
        matched_warmup_epochs=args.matched_warmup, frame_loss=args.frame_loss, amp=args.amp, workers=args.workers,
        device=args.device, sampling=args.sampling, clip_len=args.clip_len, frame_interval=args.frame_interval,
        short=args.short, scales=tuple(args.scales), flip=args.flip, flip_swap=args.flip_swap,
        frame_template=args.frame_template, start_index=args.start_index, list_format=args.list_format,
        seed=args.seed, resume=args.resume,
        progress=not args.no_progress and sys.stderr.isatty(), epoch_lines=True)


def cmd_train(args: argparse.Namespace) -> int:
    from .loop import train

    check_settings(vars(args), NUMERIC_OPTIONS["train"])
    if not args.model and not args.weights and not args.resume:
        raise ConfigError("--model NAME is required (or --weights CHECKPOINT of streamtsm, which names its model, "
                          "or --resume CHECKPOINT)")
    if args.model:
        from ..models import get_spec

        get_spec(args.model)  # a mistyped name is found before any data is read
    final = train(train_options(args))
    best = final["best_top1"]
    where = f"best val top-1 {100 * best:.1f}% at epoch {final['best_epoch']}, " if best is not None else ""
    print(f"trained {final['model']} for {final['epochs']} epochs: {where}checkpoints in {Path(args.out)}")
    if final["skipped"]:
        print(f"skipped {len(final['skipped'])} unreadable video(s), e.g. {final['skipped'][0]}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..models.loading import read_weights
    from .annotations import load_records
    from .evaluate import evaluate, format_table
    from .loop import check_labels, load_for_eval, resolve_device

    check_settings(vars(args), NUMERIC_OPTIONS["eval"])
    model = load_for_eval(args.weights, args.device, labels_file=args.labels)
    sampling = args.sampling
    if sampling == "auto":
        # As the model was trained (streamtsm train records it), else the family's usual sampling.
        sampling = (read_weights(args.weights)[0].get("extra") or {}).get("recipe", {}).get("sampling", "auto")
    overrides = {k: v for k, v in (("clip_len", args.clip_len), ("frame_interval", args.frame_interval)) if v}
    if overrides:
        model.cfg = dataclasses.replace(model.cfg, **overrides)
    labels = model.cfg.labels
    records, folder_labels = load_records(args.val, args.data_root, labels, args.frame_template, args.list_format)
    labels = labels or folder_labels or [str(i) for i in range(model.cfg.num_classes)]
    check_labels(records, labels, "the val data")
    result = evaluate(model, records, num_clips=args.num_clips, crops=args.crops, twice_sample=args.twice_sample,
                      online=args.online, avg_last=args.avg_last, batch_size=args.batch_size, workers=args.workers,
                      device=resolve_device(args.device), amp=args.amp, sampling=sampling, short=args.short,
                      frame_template=args.frame_template, start_index=args.start_index,
                      progress=sys.stderr.isatty())
    print(f"{model.cfg.name} on {len(records)} videos ({args.val})")
    print(format_table(result))
    payload = {"weights": args.weights, "val": args.val, "model": model.cfg.name, "labels": labels,
               **{k: v for k, v in result.items() if k not in ("scores", "labels")}}
    if args.json_out == "-":
        print(json.dumps(payload))
    elif args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .synthdata import write_synthetic_dataset

    check_settings(vars(args), NUMERIC_OPTIONS["synth"])
    meta = write_synthetic_dataset(args.out, clips_per_class=args.clips_per_class, frames=args.frames,
                                   size=args.size, seed=args.seed, val_fraction=args.val_fraction,
                                   classes=args.classes, motion_frames=args.motion_frames,
                                   render_size=args.render_size, fps=args.fps,
                                   workers=args.workers, background_contrast=args.background_contrast,
                                   progress=sys.stderr.isatty())
    print(f"wrote {meta['train_clips']} train + {meta['val_clips']} val clips of {len(meta['classes'])} motions "
          f"({meta['frames']} frames, {meta['width']}x{meta['height']}) to {args.out}")
    return 0
