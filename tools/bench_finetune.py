"""Fine-tuning vs training from scratch: why the training recipe starts from a pretrained checkpoint.

    python tools/bench_finetune.py [--clips-per-class 60] [--scratch-epochs 12] [--finetune-epochs 3]

One run, one data set: the four directions of the synthetic scene (move left/right/up/down) over a busy,
high-contrast background (``synth --background-contrast 1``), rendered with the README's training settings. Then,
through the ``streamtsm`` commands a user runs:

- from scratch: the README's training recipe (online TSM ResNet-18 width 16 at 64 px, dense clips every 4th frame,
  AdamW, cosine, matched warm-up, per-frame loss) for ``--scratch-epochs``;
- fine-tuned: the same command started from the shipped demo model (``--weights <demo> --reset-head``, no
  architecture flags: the checkpoint names them) for ``--finetune-epochs``.

Per epoch: train loss (against ln K, a model that has learnt nothing), val top-1, wall time. Writes the
``finetune`` section of docs/benchmarks.md (``--no-write`` only prints).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "streamtsm" / "assets" / "demo_model.pth"
DIRECTIONS = ["move_left", "move_right", "move_up", "move_down"]
# The README's recipe ("Training on your own videos"), less what the fine-tuned run takes from its checkpoint.
DATA = ["--sampling", "dense", "--frame-interval", "4", "--workers", "1", "--device", "cpu", "--no-progress"]
RECIPE = ["--optimizer", "adamw", "--lr", "2e-3", "--schedule", "cosine", "--frame-loss", "4"]
SCRATCH_ARCH = ["--model", "tsm_r18_online", "--width", "16", "--input-size", "64"]


def streamtsm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "streamtsm.cli", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def epochs_of(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r.get("event") == "epoch"]


def train(name: str, data: Path, work: Path, extra: list[str], epochs: int, seed: int) -> dict:
    out = work / name
    t0 = time.perf_counter()
    streamtsm("train", "--train", str(data / "train.txt"), "--val", str(data / "val.txt"), "--out", str(out),
              "--epochs", str(epochs), "--seed", str(seed), *DATA, *RECIPE, *extra)
    return {"name": name, "wall_s": time.perf_counter() - t0, "epochs": epochs_of(out), "args": extra}


def table(runs: list[dict], classes: int) -> str:
    chance_loss = math.log(classes)
    lines = ["| run | epoch | train loss (ln K = %.3f) | train top-1 | val top-1 | epoch s |" % chance_loss,
             "|---|---|---|---|---|---|"]
    for run in runs:
        for e in run["epochs"]:
            lines.append(f"| {run['name']} | {e['epoch']} | {e['train_loss']:.3f} | {100 * e['train_top1']:.1f} "
                         f"| {100 * e['val']['top1']:.1f} | {e['epoch_time_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips-per-class", type=int, default=60, help="scenes per direction (a fifth are val)")
    ap.add_argument("--scratch-epochs", type=int, default=12)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="keep the data and runs here (default: a temporary folder)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        data = work / "data"
        t0 = time.perf_counter()
        streamtsm("synth", "--out", str(data), "--classes", *DIRECTIONS, "--clips-per-class",
                  str(args.clips_per_class), "--frames", "40", "--motion-frames", "60", "--size", "96x72",
                  "--background-contrast", "1", "--seed", str(args.seed), "--workers", "2")
        synth_s = time.perf_counter() - t0
        meta = json.loads((data / "synth.json").read_text())
        runs = [
            train("from scratch", data, work, SCRATCH_ARCH + ["--matched-warmup", "2"], args.scratch_epochs,
                  args.seed),
            train("fine-tuned from the demo model", data, work, ["--weights", str(DEMO), "--reset-head"],
                  args.finetune_epochs, args.seed),
        ]
    load_after = os.getloadavg()
    scratch, tuned = runs
    best = {r["name"]: max(100 * e["val"]["top1"] for e in r["epochs"]) for r in runs}
    body = (
        f"Data: the four directions ({', '.join(DIRECTIONS)}) of the synthetic scene with its background clutter at "
        f"full contrast (`streamtsm synth --background-contrast 1 --frames 40 --motion-frames 60 --size 96x72 "
        f"--clips-per-class {args.clips_per_class}`): {meta['train_clips']} train and {meta['val_clips']} val "
        f"clips, rendered in {synth_s:.0f} s. Both runs: `streamtsm train {' '.join(DATA + RECIPE)}`, seed "
        f"{args.seed}; from scratch adds `{' '.join(SCRATCH_ARCH)} --matched-warmup 2` (the README's recipe), "
        f"fine-tuned adds `--weights streamtsm/assets/demo_model.pth --reset-head` (the demo model names its own "
        f"architecture: tsm_r18_online width 16 at 64 px).\n\n"
        + table(runs, len(DIRECTIONS)) + "\n\n"
        f"| run | epochs | best val top-1 | training wall time |\n|---|---|---|---|\n"
        f"| from scratch | {args.scratch_epochs} | {best[scratch['name']]:.1f} | {scratch['wall_s']:.0f} s |\n"
        f"| fine-tuned from the demo model | {args.finetune_epochs} | {best[tuned['name']]:.1f} | "
        f"{tuned['wall_s']:.0f} s |\n\n"
        f"Training runs in one process on the machine's {os.cpu_count()} cores (DataLoader: 1 worker). Load "
        f"average (1/5/15 min) before: {' / '.join(f'{x:.1f}' for x in load_before)}, after: "
        f"{' / '.join(f'{x:.1f}' for x in load_after)}.\n")
    print(body)
    if not args.no_write:
        write_section("finetune", "Fine-tuning vs training from scratch (CPU)", body)


if __name__ == "__main__":
    main()
