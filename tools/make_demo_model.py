"""Build the shipped demo model: an online TSM that recognizes the motions of the live ``synthetic`` source, frame
by frame.

    python tools/make_demo_model.py [--work /tmp/streamtsm_demo] [--seed 0] [--threads 2]

Three steps; the first two are the commands a user runs on their own videos, run here in-process:

1. ``streamtsm synth``: scenes rendered at 320x240 (the live source's size) and shrunk to the size the pipeline
   shrinks live frames to (short side ``resize_size``), with each motion spread over 60 frames like
   ``MotionScene``'s segments, so a clip moves as fast per frame as the live source does;
2. ``streamtsm train``: ``tsm_r18_online`` in its clip form (the uni-directional shift), on dense clips of
   ``num_segments`` frames every ``--frame-stride`` frames (matched warm-up, AdamW, cosine); the checkpoint
   records the stride, so ``streamtsm run`` feeds it every ``--frame-stride``-th frame;
3. evaluation: the val split (offline and online protocols), then what a user sees: the model stepped frame by
   frame over ``MotionScene`` (the live source's frames, preprocessed as the pipeline does), each prediction
   compared with ``motion_at(t)`` after some warm-up into each segment, and the action events the default
   post-processing (``streamtsm run``'s smoothing and hold) makes of those predictions.

Writes ``streamtsm/assets/demo_model.pth`` (streamtsm format, labels = MOTIONS) and
``streamtsm/assets/demo_model.json`` (the commands, seed, timings and accuracies; docs/demo-model.md reads it).
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

from streamtsm.cli import main as streamtsm_main  # noqa: E402
from streamtsm.engine.factory import DEMO_WEIGHTS  # noqa: E402
from streamtsm.models import load, save_checkpoint  # noqa: E402
from streamtsm.postprocess import StreamPostprocessor  # noqa: E402
from streamtsm.preprocess import Preprocessor  # noqa: E402
from streamtsm.synthetic import MOTIONS, MotionScene  # noqa: E402
from streamtsm.train.annotations import read_annotations  # noqa: E402
from streamtsm.train.evaluate import evaluate  # noqa: E402

MODEL_FILE = DEMO_WEIGHTS
DOC = ROOT / "docs" / "demo-model.md"
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


def live_events(model, *, seeds=(101, 102, 103), cycles: int = 2, stride: int = 1, smooth: int = 8,
                hold: int = 3) -> dict:
    """The action events ``streamtsm run``'s post-processing (``--smooth``, ``--hold`` defaults) makes of the
    model's frame-by-frame predictions over ``MotionScene``, scored against the scene's segments.

    Returns:
        ``segment_recall`` (segments in which an onset of their own motion fires), ``onset_precision`` (onsets
        whose label is the motion on screen at the onset frame), ``onset_delay_s_median`` (seconds from a
        segment's start to the onset of its motion, at 30 fps), counts.
    """
    model.eval()
    pre = Preprocessor.for_config(model.cfg)
    recalled, segments, right, onsets, delays = 0, 0, 0, 0, []
    for seed in seeds:
        scene = MotionScene(*LIVE_SIZE, seed=seed, segment_frames=SEGMENT_FRAMES)
        post = StreamPostprocessor(list(MOTIONS), smooth=smooth, hold=hold)
        state, found = None, set()
        total = cycles * len(MOTIONS) * SEGMENT_FRAMES
        with torch.no_grad():
            for t in range(0, total, stride):
                logits, state = model.step(torch.from_numpy(pre(scene.render(t)))[None], state)
                _, events = post.process(logits[0].numpy(), t, t / 30.0)
                for e in events:
                    if e.kind != "onset":
                        continue
                    onsets += 1
                    truth = scene.motion_at(t)
                    right += e.label == truth
                    segment = t // SEGMENT_FRAMES
                    if e.label == truth and segment not in found:
                        found.add(segment)
                        delays.append((t - segment * SEGMENT_FRAMES) / 30.0)
        recalled += len(found)
        segments += total // SEGMENT_FRAMES
    return {"segment_recall": recalled / segments, "onset_precision": right / max(onsets, 1),
            "onset_delay_s_median": float(np.median(delays)) if delays else None, "segments": segments,
            "onsets": onsets, "smooth": smooth, "hold": hold, "stride": stride}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/streamtsm_demo", help="dataset and training run folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=300, help="synthetic scenes (each in all nine motions)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--clip-frames", type=int, default=24,
                    help="frames per synthetic video: a window of the 60-frame motion, at least 7 x stride + 1")
    ap.add_argument("--model", default="tsm_r18_online", choices=["tsm_r18_online", "tsm_mobilenetv2_online"])
    ap.add_argument("--width", type=int, default=16, help="ResNet width (tsm_r18_online)")
    ap.add_argument("--width-mult", type=float, default=0.5, help="MobileNetV2 width (tsm_mobilenetv2_online)")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--resize-size", type=int, default=73)
    ap.add_argument("--shift-div", type=int, default=2, help="1/shift_div of the channels shifted")
    ap.add_argument("--frame-stride", type=int, default=3,
                    help="train on every k-th frame; the live pipeline then feeds every k-th frame")
    ap.add_argument("--epochs", type=int, default=24)
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
    synth = ["synth", "--out", str(data), "--clips-per-class", str(args.scenes), "--frames", str(args.clip_frames),
             "--motion-frames", str(SEGMENT_FRAMES), "--size", f"{width}x{args.resize_size}",
             "--render-size", f"{LIVE_SIZE[0]}x{LIVE_SIZE[1]}", "--seed", str(args.seed),
             "--val-fraction", str(args.val_fraction), "--workers", str(args.workers + 1)]
    if not args.skip_synth:
        t0 = time.perf_counter()
        _run(synth)
        logging.info("synthetic dataset in %.0fs", time.perf_counter() - t0)

    # 2. Training, with the CLI a user would run.
    arch = ["--width", str(args.width)] if args.model == "tsm_r18_online" else ["--width-mult", str(args.width_mult)]
    train_cmd = ["train", "--model", args.model, "--train", str(data / "train.txt"), "--val", str(data / "val.txt"),
                 "--out", str(run), *arch, "--input-size", str(args.input_size), "--resize-size",
                 str(args.resize_size), "--num-segments", "8", "--model-arg", f"shift_div={args.shift_div}",
                 "--dropout", "0.2", "--sampling", "dense", "--frame-interval", str(args.frame_stride),
                 "--scales", "1", "0.875", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                 "--optimizer", "adamw", "--lr", str(args.lr), "--weight-decay", "1e-4", "--schedule", "cosine",
                 "--matched-warmup", str(args.matched_warmup), "--frame-loss", str(args.frame_loss),
                 "--workers", str(args.workers), "--device", "cpu", "--seed", str(args.seed)]
    train_time = None
    if not args.skip_train:
        t0 = time.perf_counter()
        _run(train_cmd)
        train_time = time.perf_counter() - t0
        logging.info("trained in %.0fs", train_time)

    # 3. Evaluation: the val split, then the live scene.
    model = load(run / "best.pth")
    if model.cfg.frame_interval != args.frame_stride or not model.online:
        raise SystemExit(f"trained model records frame_interval {model.cfg.frame_interval} (online: {model.online})")
    val = evaluate(model, read_annotations(data / "val.txt"), num_clips=3, online=True, sampling="dense",
                   workers=args.workers)
    live = {f"stride_{k}": live_scene_accuracy(model, stride=k, warmup=args.live_warmup)
            for k in sorted({1, args.frame_stride})}
    events = live_events(model, stride=args.frame_stride)
    for name, r in live.items():
        logging.info("live scene %s: frame top-1 %.3f, segment top-1 %.3f", name, r["frame_top1"],
                     r["segment_top1"])
    logging.info("live events: segment recall %.3f, onset precision %.3f, median delay %s s",
                 events["segment_recall"], events["onset_precision"], events["onset_delay_s_median"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out, labels=list(MOTIONS))
    tool = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])
    workdir = str(work)

    def shown(argv: list[str]) -> str:
        return "streamtsm " + " ".join(a.replace(workdir, "<work>") for a in argv)

    info = {
        "model": model.cfg.name,
        "online": bool(model.online),
        "file": out.name,
        "size_bytes": out.stat().st_size,
        "command": tool,
        "steps": [shown(synth), shown(train_cmd)],
        "seed": args.seed,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "train_time_s": round(train_time, 1) if train_time is not None else None,
        "total_time_s": round(time.perf_counter() - t_start, 1),
        "frame_stride": args.frame_stride,
        "frame_loss": args.frame_loss,
        "config": {"input_size": model.cfg.input_size, "resize_size": model.cfg.resize_size,
                   "num_segments": model.num_segments, "frame_interval": model.cfg.frame_interval,
                   "arch": model.cfg.arch},
        "val": {k: {m: round(val[k][m], 4) for m in ("top1", "top5", "mean_class_acc")}
                for k in ("offline", "online", "online_avg")} | {"videos": val["offline"]["count"]},
        "live_scene": live,
        "live_events": events,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    if out.resolve() == MODEL_FILE.resolve():
        DOC.write_text(demo_doc(info))
    print(json.dumps({"val_top1": info["val"]["offline"]["top1"],
                      "live": {k: (round(v["frame_top1"], 3), round(v["segment_top1"], 3)) for k, v in live.items()},
                      "events": {k: events[k] for k in ("segment_recall", "onset_precision", "onset_delay_s_median")},
                      "size_bytes": info["size_bytes"], "total_time_s": info["total_time_s"]}))


def demo_doc(info: dict) -> str:
    """docs/demo-model.md: how the shipped model was made and how well it does, from its demo_model.json."""
    live = info["live_scene"][f"stride_{info['frame_stride']}"]
    ev = info["live_events"]
    val = info["val"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    rows = "\n".join(f"| {m} | {pct(a)} |" for m, a in live["per_class_frame_top1"].items())
    steps = "\n".join(info["steps"])
    arch = info["config"]["arch"]
    k = info["frame_stride"]
    width = f"width {arch['width']}" if "width" in arch else f"width multiplier {arch.get('width_mult')}"
    return f"""# The shipped demo model

`streamtsm run` with no `--model`/`--weights` loads `streamtsm/assets/{info['file']}`
({info['size_bytes'] / 1e6:.1f} MB): `{info['model']}` ({width}, shift_div {arch.get('shift_div')}, uni-directional
shift) on {info['config']['input_size']}x{info['config']['input_size']} centre crops of frames resized to a
{info['config']['resize_size']}-pixel short side, trained on the synthetic motion dataset to recognize the nine
motions of the built-in `synthetic` source. It was trained on one frame in {k}, which its checkpoint records, so
`run` feeds it one frame in {k} ({30 / k:.0f} predictions a second from a 30 fps source).

## How it was made

Built on {info['date']} ({info['machine']}) by

    {info['command']}

which runs, in-process, the commands a user would run on their own videos (`<work>` is `--work`):

```
{steps}
```

Seed {info['seed']}; training took {info['train_time_s']} s, the whole build {info['total_time_s']} s. Rebuilding
with the same command on the same torch build gives the same weights up to floating-point nondeterminism of
multi-threaded CPU kernels.

## How well it does

On the {val['videos']} val clips (scenes never seen in training):

| protocol | top-1 | top-5 | mean class |
|---|---|---|---|
| online (stepped frame by frame, prediction at the last frame) | {pct(val['online']['top1'])} | {pct(val['online']['top5'])} | {pct(val['online']['mean_class_acc'])} |
| online (mean of the last 4 frames' outputs) | {pct(val['online_avg']['top1'])} | {pct(val['online_avg']['top5'])} | {pct(val['online_avg']['mean_class_acc'])} |
| offline (3 clips, outputs averaged over every frame) | {pct(val['offline']['top1'])} | {pct(val['offline']['top5'])} | {pct(val['offline']['mean_class_acc'])} |

The offline figure averages the outputs of every frame of a clip, the first ones included, whose state has not
seen the motion yet; the model was trained on its last {info['frame_loss']} frames' outputs, the ones a live
stream reports.

On the live scene (`MotionScene` at 320x240, seeds {live['scene_seeds']}, {live['segments']} segments of
{live['segment_frames']} frames, stepped on one frame in {live['stride']} with the state carried across segments, as
`streamtsm run` does), counting predictions from {live['warmup_frames']} frames into each segment (the state still
holds the previous motion before that):

- per-step top-1: {pct(live['frame_top1'])} over {live['frames']} steps; per segment (mean of its probabilities):
  {pct(live['segment_top1'])};
- action events with `run`'s default post-processing (`--smooth {ev['smooth']} --hold {ev['hold']}`): an onset of
  the right motion in {pct(ev['segment_recall'])} of the segments, {pct(ev['onset_precision'])} of the
  {ev['onsets']} onsets naming the motion on screen, median delay from a segment's start to its onset
  {ev['onset_delay_s_median']} s. The other onsets are short-lived ones while the smoothed output crosses over from
  one motion to the next; a longer `--hold` trades delay for fewer of them.

| motion | per-step top-1 on the live scene |
|---|---|
{rows}
"""


def _run(argv: list[str]) -> None:
    logging.info("streamtsm %s", " ".join(argv))
    code = streamtsm_main(argv)
    if code != 0:
        raise SystemExit(f"streamtsm {argv[0]} failed with exit code {code}")


if __name__ == "__main__":
    main()
