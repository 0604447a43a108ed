"""Training on CPU: throughput of the demo configuration, and val accuracy on the synthetic motions for TSN, online
TSM, offline TSM (and TIN, X3D-XS when registered) under the offline and online protocols. Writes its section of
docs/benchmarks.md.

    python tools/bench_train.py [--epochs 8] [--size 64] [--scenes 250] [--threads 2] [--no-write]
    python tools/bench_train.py --only online_tsm --scenes 200 --val-scenes 40 --seed 0,1,2

The accuracy models are tiny (ResNet-18 of width 8, or the family's smallest width) and share one recipe, the one
of tests/test_train_temporal.py: in-memory synthetic scenes (every scene rendered in all nine motions), 8 frames,
AdamW with a cosine schedule and two epochs of matched warm-up. The online protocol steps each clip frame by frame
and reads the prediction at the last frame; models without a step form have no online figure. The recipe options
(epochs, batch size, lr, warm-up, seeds, render size) are there to measure other recipes and seeds: with
``--only`` the rows go to their own section ("train_recipe"), and the main table keeps the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import write_section  # noqa: E402

from streamtsm.models import create, list_models, load  # noqa: E402
from streamtsm.synthetic import MOTIONS  # noqa: E402
from streamtsm.train.annotations import VideoRecord  # noqa: E402
from streamtsm.train.evaluate import evaluate, pair_accuracy  # noqa: E402
from streamtsm.train.loop import TrainOptions, train  # noqa: E402
from streamtsm.train.synthdata import render_scene_clip, write_synthetic_dataset  # noqa: E402

PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7)]


def demo_config() -> tuple[str, dict]:
    """(registry name, create options) of the shipped demo model, read from its checkpoint's config, so the
    throughput figures are those of the configuration users retrain."""
    from streamtsm.engine.factory import DEMO_WEIGHTS
    from streamtsm.models import read_checkpoint

    if DEMO_WEIGHTS.is_file():
        cfg = read_checkpoint(DEMO_WEIGHTS)["config"]
        arch = {k: v for k, v in cfg["arch"].items() if k in ("width", "width_mult", "shift_div", "num_segments")}
        return cfg["name"], {**arch, "input_size": cfg["input_size"], "resize_size": cfg["resize_size"],
                             "frame_interval": cfg["frame_interval"]}
    return "tsm_r18_online", {"width": 16, "shift_div": 2, "num_segments": 8, "input_size": 64, "resize_size": 73,
                              "frame_interval": 3}


DEMO_MODEL, DEMO = demo_config()


def model_only_throughput(batch: int = 8, steps: int = 10) -> float:
    """Clips/s of forward + backward + AdamW step of the demo model on random clips (no data loading)."""
    model = create(DEMO_MODEL, num_classes=len(MOTIONS), **DEMO).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, DEMO.get("num_segments", 8), 3, DEMO["input_size"], DEMO["input_size"])
    y = torch.randint(0, len(MOTIONS), (batch,))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def pipeline_throughput(work: Path, workers: int) -> dict:
    """Clips/s of a real training epoch of the demo configuration: MJPG decoding, dense sampling, multi-scale
    crops, the model step; on a small dataset shaped like the demo's."""
    data = work / "demo_data"
    short = DEMO["resize_size"]
    frames = (DEMO.get("num_segments", 8) - 1) * DEMO["frame_interval"] + 3
    write_synthetic_dataset(data, clips_per_class=24, frames=frames, motion_frames=60,
                            size=f"{round(short * 4 / 3)}x{short}", render_size="320x240", seed=0, val_fraction=0.0,
                            workers=workers + 1)
    final = train(TrainOptions(model=DEMO_MODEL, train=str(data / "train.txt"), out=str(work / "r"),
                               model_args=DEMO, epochs=1, batch_size=8, optimizer="adamw", lr=1e-3,
                               sampling="dense", scales=(1.0, 0.875), workers=workers, device="cpu",
                               progress=False))
    return {"clips_per_s": final["last_epoch"]["clips_per_s"], "workers": workers}


def scenes(first: int, count: int, size: int, frames: int, render: int | None = None) -> list[VideoRecord]:
    return [VideoRecord(f"{m}/scene_{i}", label, scene=f"scene_{i}",
                        frames=render_scene_clip(m, i, frames=frames, size=(size, size),
                                                 render=(render, render) if render else None))
            for i in range(first, first + count) for label, m in enumerate(MOTIONS)]


def candidates(size: int) -> list[tuple[str, str, str, dict]]:
    """(key, row name, registry name, create options) of the models in the table; TIN and X3D when registered."""
    common = {"num_segments": 8, "input_size": size, "resize_size": size, "dropout": 0.0}
    tiny = {"width": 8, "shift_div": 4, **common}
    rows = [("tsn", "TSN (ResNet-18 w8, no shift)", "tsm_r18", {**tiny, "shift_mode": "none"}),
            ("online_tsm", "online TSM (ResNet-18 w8, uni-directional)", "tsm_r18",
             {**tiny, "shift_mode": "unidirectional"}),
            ("offline_tsm", "offline TSM (ResNet-18 w8, bi-directional)", "tsm_r18",
             {**tiny, "shift_mode": "bidirectional"})]
    registered = set(list_models())
    if "tin_r50" in registered:
        rows.append(("tin", "TIN (ResNet-50 w8)", "tin_r50", {"width": 8, **common}))
    if "x3d_xs" in registered:
        rows.append(("x3d", "X3D-XS (gamma_w 1, head 256)", "x3d_xs",
                     {"gamma_w": 1.0, "head_width": 256, "input_size": size, "resize_size": size, "clip_len": 8,
                      "frame_interval": 1, "dropout": 0.0}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--scenes", type=int, default=250, help="train scenes (each in all nine motions)")
    ap.add_argument("--val-scenes", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers for the pipeline throughput")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=2, help="matched warm-up epochs")
    ap.add_argument("--seed", default="0", help="training seed, or several comma-separated (one row each); the "
                    "scenes stay the same")
    ap.add_argument("--render", type=int, help="draw the scenes at this size and shrink them to --size")
    ap.add_argument("--only", help="comma-separated rows to train: tsn, online_tsm, offline_tsm, tin, x3d "
                    "(default: all)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    table = candidates(args.size)
    keys = [key for key, *_ in table]
    only = args.only.split(",") if args.only else keys
    if unknown := sorted(set(only) - set(keys)):
        ap.error(f"--only takes rows among {', '.join(keys)}; got {', '.join(unknown)}")
    seeds = [int(x) for x in args.seed.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if not args.only:  # the demo configuration's throughput belongs to the whole table only
        model_cps = model_only_throughput()
        with tempfile.TemporaryDirectory() as tmp:
            pipe = pipeline_throughput(Path(tmp), args.workers)
        print(f"demo config: model only {model_cps:.1f} clips/s, full pipeline {pipe['clips_per_s']:.1f} clips/s",
              flush=True)

    train_records = scenes(0, args.scenes, args.size, 8, args.render)
    val_records = scenes(10**6, args.val_scenes, args.size, 8, args.render)
    rows = []
    runs = [(seed, *c) for c in table if c[0] in only for seed in seeds]
    for seed, _key, name, registry_name, options in runs:
        if len(seeds) > 1:
            name = f"{name}, seed {seed}"
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train(TrainOptions(model=registry_name, train=train_records, val=val_records, out=tmp,
                               labels=list(MOTIONS), model_args=options, epochs=args.epochs,
                               batch_size=args.batch_size, optimizer="adamw", lr=args.lr, weight_decay=1e-4,
                               schedule="cosine", matched_warmup_epochs=args.warmup, scales=(1.0,), workers=0,
                               device="cpu", seed=seed, progress=False))
            seconds = time.perf_counter() - t0
            model = load(Path(tmp) / "checkpoint.pth")
        result = evaluate(model, val_records, num_clips=1)
        params = sum(p.numel() for p in model.parameters())
        pairs = [pair_accuracy(result["scores"], result["labels"], a, b) for a, b in PAIRS]
        row = {"name": name, "model": registry_name, "params": params, "offline": result["offline"]["top1"],
               "online": result["online"]["top1"] if result["online"] else None,
               "online_avg": result["online_avg"]["top1"] if result["online_avg"] else None,
               "pairs": pairs, "train_s": seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [] if args.only else [
        f"Demo configuration (`{DEMO_MODEL}`, {', '.join(f'{k} {v}' for k, v in DEMO.items())}, batch 8, "
        f"AdamW): **{model_cps:.1f} clips/s** model only (forward, backward, step on random clips), "
        f"**{pipe['clips_per_s']:.1f} clips/s** as a real training epoch (MJPG decoding of "
        f"{round(DEMO['resize_size'] * 4 / 3)}x{DEMO['resize_size']} videos, dense sampling, multi-scale crops, "
        f"{pipe['workers']} loader worker), {args.threads} torch threads.",
        "",
    ]
    lines += [
        f"Val top-1 on the synthetic motions ({args.scenes} train / {args.val_scenes} val scenes x 9 motions, "
        f"{args.size}x{args.size}{f' drawn at {args.render}' if args.render else ''}, 8 frames; {args.epochs} "
        f"epochs, batch {args.batch_size}, AdamW {args.lr:g} cosine, {args.warmup} matched warm-up epochs, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}). Pair columns: accuracy between the "
        "two directions of a motion (50% = chance).",
        "",
        "| model | params | offline top-1 | online top-1 (last frame) | online (mean of last 4) "
        "| left/right | up/down | in/out | cw/ccw | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {pct(r['offline'])} | {pct(r['online'])} | "
                     f"{pct(r['online_avg'])} | " + " | ".join(pct(p) for p in r["pairs"]) +
                     f" | {r['train_s']:.0f} |")
    lines += [] if args.only else [
        "", "TSN averages per-frame outputs and cannot order frames: it stays at chance on every pair. The "
            "offline TSM's bi-directional shift needs the next frame and has no online form. The online "
            "protocol of a uni-directional TSM reads a single frame's output, the offline one averages all "
            "eight; the online figure is what a live stream reports at that frame."]
    body = "\n".join(lines)
    print(body)
    if args.no_write:
        return
    if args.only:
        write_section("train_recipe", "Other training recipes on the synthetic motions", body)
    else:
        write_section("train", "Training on CPU and accuracy on the synthetic motions", body)


if __name__ == "__main__":
    main()
