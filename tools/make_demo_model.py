"""Build the shipped demo model: an online TSM (MobileNetV2) that recognizes the motions of the live ``synthetic``
source, frame by frame.

    python tools/make_demo_model.py [--work /tmp/streamtsm_demo] [--seed 0] [--threads 2]

Three steps, all through the library (``streamtsm synth`` and ``streamtsm train`` do the same from the shell):

1. ``write_synthetic_dataset``: scenes rendered at the size the live frames have after preprocessing (320x240 ->
   short side ``resize_size``), with the motion spread over 60 frames like ``MotionScene``'s segments, so a clip
   moves as fast per frame as the live source does;
2. ``train``: ``tsm_mobilenetv2_online`` in its clip form with the uni-directional shift, on dense clips of
   ``num_segments`` frames every ``--frame-stride`` frames (matched warm-up, AdamW, cosine);
3. evaluation: the val split (offline and online protocols), then the test that matters: the model stepped frame
   by frame over ``MotionScene`` (the live source's frames, preprocessed as the pipeline does), each prediction
   compared with ``motion_at(t)`` after a few frames of warm-up into each segment.

Writes ``streamtsm/assets/demo_tsm_mobilenetv2_online.pth`` (streamtsm format, labels = MOTIONS) and
``streamtsm/assets/demo_model.json`` (how it was made and how well it does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamtsm.models import load_model, save_checkpoint  # noqa: E402
from streamtsm.preprocess import Preprocessor  # noqa: E402
from streamtsm.synthetic import MOTIONS, MotionScene  # noqa: E402
from streamtsm.train.data import read_annotations, write_synthetic_dataset  # noqa: E402
from streamtsm.train.evaluate import evaluate  # noqa: E402
from streamtsm.train.loop import TrainOptions, train  # noqa: E402

ASSETS = ROOT / "streamtsm" / "assets"
MODEL_FILE = ASSETS / "demo_tsm_mobilenetv2_online.pth"
INFO_FILE = ASSETS / "demo_model.json"
LIVE_SIZE = (320, 240)  # SyntheticSource's default frames
SEGMENT_FRAMES = 60  # MotionScene's default segment length


@torch.no_grad()
def live_scene_accuracy(model, *, seeds=(101, 102, 103), cycles: int = 2, stride: int = 1, warmup: int = 15) -> dict:
    """Step the model over MotionScene frames exactly as the live pipeline feeds them.

    Every ``stride``-th frame of the 320x240 scene is preprocessed (:class:`Preprocessor`, the pipeline's) and
    stepped with the state carried across segments, as a camera stream would be. A prediction counts from
    ``warmup`` scene frames into each segment (the state still holds the previous motion before that).

    Returns:
        ``frame_top1`` (argmax per stepped frame after warm-up), ``segment_top1`` (mean softmax over a segment's
        frames after warm-up), per-class frame accuracy, the numbers of frames and segments.
    """
    model.eval()
    pre = Preprocessor.for_config(model.cfg)
    hits, per_class, segments_ok, segments = 0, {m: [0, 0] for m in MOTIONS}, 0, 0
    counted = 0
    for seed in seeds:
        scene = MotionScene(*LIVE_SIZE, seed=seed, segment_frames=SEGMENT_FRAMES)
        state = None
        probs_in_segment: list[np.ndarray] = []
        total = cycles * len(MOTIONS) * SEGMENT_FRAMES
        for t in range(0, total, stride):
            frame = torch.from_numpy(pre(scene.render(t)))[None]
            logits, state = model.step(frame, state)
            local = t % SEGMENT_FRAMES
            truth = scene.motion_at(t)
            if local >= warmup:
                p = logits.softmax(-1)[0].numpy()
                ok = MOTIONS[int(p.argmax())] == truth
                hits += ok
                counted += 1
                per_class[truth][0] += ok
                per_class[truth][1] += 1
                probs_in_segment.append(p)
            if local + stride >= SEGMENT_FRAMES and probs_in_segment:
                segments += 1
                segments_ok += MOTIONS[int(np.mean(probs_in_segment, 0).argmax())] == truth
                probs_in_segment = []
    return {"frame_top1": hits / max(counted, 1), "segment_top1": segments_ok / max(segments, 1),
            "per_class_frame_top1": {m: round(h / n, 3) for m, (h, n) in per_class.items() if n},
            "frames": counted, "segments": segments, "stride": stride, "warmup_frames": warmup,
            "scene_seeds": list(seeds), "size": list(LIVE_SIZE), "segment_frames": SEGMENT_FRAMES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/streamtsm_demo", help="dataset and training run folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=250, help="synthetic scenes (each in all nine motions)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--clip-frames", type=int, default=44,
                    help="frames per synthetic video: a window of the 60-frame motion, at least 7 x stride + 1")
    ap.add_argument("--model", default="tsm_r18", choices=["tsm_r18", "tsm_mobilenetv2_online"],
                    help="built with the uni-directional shift either way (online)")
    ap.add_argument("--width", type=int, default=16, help="ResNet width (tsm_r18)")
    ap.add_argument("--width-mult", type=float, default=0.5, help="MobileNetV2 width (tsm_mobilenetv2_online)")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--resize-size", type=int, default=73)
    ap.add_argument("--shift-div", type=int, default=4, help="1/shift_div of the channels shifted each way")
    ap.add_argument("--frame-stride", type=int, default=6,
                    help="train on every k-th frame; the live pipeline then feeds every k-th frame (--frame-stride)")
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--live-warmup", type=int, default=24, help="scene frames into a segment before scoring")
    ap.add_argument("--matched-warmup", type=int, default=2)
    ap.add_argument("--frame-loss", type=int, default=4, help="supervise the last K frames' outputs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (synth renders with workers + 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--skip-synth", action="store_true", help="reuse the dataset already in --work")
    ap.add_argument("--skip-train", action="store_true", help="reuse the run already in --work (evaluate, save)")
    ap.add_argument("--out", default=str(MODEL_FILE))
    args = ap.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    data, run = work / "data", work / "run"
    t_start = time.perf_counter()

    # 1. The dataset, at the size live frames have after the pipeline's resize (320x240 -> short side resize_size).
    width = round(LIVE_SIZE[0] * args.resize_size / LIVE_SIZE[1])
    size = f"{width}x{args.resize_size}"
    synth = {"out": str(data), "clips_per_class": args.scenes, "frames": args.clip_frames,
             "motion_frames": SEGMENT_FRAMES, "size": size, "render_size": f"{LIVE_SIZE[0]}x{LIVE_SIZE[1]}",
             "seed": args.seed, "val_fraction": args.val_fraction}
    if not args.skip_synth:
        t0 = time.perf_counter()
        write_synthetic_dataset(**synth, workers=args.workers + 1, progress=sys.stderr.isatty())
        logging.info("synthetic dataset in %.0fs", time.perf_counter() - t0)

    # 2. Training.
    width = {"width": args.width} if args.model == "tsm_r18" else {"width_mult": args.width_mult}
    options = TrainOptions(
        model=args.model, train=str(data / "train.txt"), val=str(data / "val.txt"), out=str(run),
        model_args={**width, "shift_mode": "unidirectional", "input_size": args.input_size,
                    "resize_size": args.resize_size, "num_segments": 8, "shift_div": args.shift_div,
                    "frame_interval": args.frame_stride, "dropout": 0.2},
        epochs=args.epochs, batch_size=args.batch_size, optimizer="adamw", lr=args.lr, weight_decay=1e-4,
        schedule="cosine", matched_warmup_epochs=args.matched_warmup, frame_loss=args.frame_loss,
        sampling="dense", scales=(1.0, 0.875),
        workers=args.workers, device="cpu", seed=args.seed, progress=sys.stderr.isatty())
    train_time = None
    if not args.skip_train:
        t0 = time.perf_counter()
        final = train(options)
        train_time = time.perf_counter() - t0
        logging.info("trained in %.0fs: best val top-1 %.3f", train_time, final["best_top1"])

    # 3. Evaluation: the val split, then the live scene.
    model = load_model(run / "best.pth")
    val = evaluate(model, read_annotations(data / "val.txt"), num_clips=3, online=True, sampling="dense",
                   workers=args.workers)
    live = {f"stride_{k}": live_scene_accuracy(model, stride=k, warmup=args.live_warmup)
            for k in sorted({1, args.frame_stride})}
    for name, r in live.items():
        logging.info("live scene %s: frame top-1 %.3f, segment top-1 %.3f", name, r["frame_top1"],
                     r["segment_top1"])

    out = Path(args.out)
    save_checkpoint(model, out, labels=list(MOTIONS))
    command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])
    info = {
        "model": model.cfg.name,
        "online": bool(model.online),
        "file": out.name,
        "size_bytes": out.stat().st_size,
        "command": command,
        "seed": args.seed,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "synth": {**synth, "out": "<work>/data"},
        "train": {k: v for k, v in options.to_json().items()
                  if k not in ("train", "val", "out", "progress", "resume", "weights")},
        "train_time_s": round(train_time, 1) if train_time is not None else None,
        "total_time_s": round(time.perf_counter() - t_start, 1),
        "frame_stride": args.frame_stride,
        "config": {"input_size": model.cfg.input_size, "resize_size": model.cfg.resize_size,
                   "num_segments": model.num_segments, "frame_interval": model.cfg.frame_interval,
                   "arch": model.cfg.arch},
        "val": {k: {m: round(val[k][m], 4) for m in ("top1", "top5", "mean_class_acc")}
                for k in ("offline", "online", "online_avg")} | {"videos": val["offline"]["count"]},
        "live_scene": live,
    }
    info_file = out.parent / INFO_FILE.name
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({"val_top1": info["val"]["offline"]["top1"],
                      "live": {k: (round(v["frame_top1"], 3), round(v["segment_top1"], 3)) for k, v in live.items()},
                      "size_bytes": info["size_bytes"], "total_time_s": info["total_time_s"]}))


if __name__ == "__main__":
    main()
