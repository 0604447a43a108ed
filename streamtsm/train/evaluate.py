"""Evaluation protocols and metrics.

Two protocols, both on the test-time samples of :mod:`streamtsm.train.sampling`:

- offline: every view (``num_clips`` temporal clips x ``crops`` spatial crops) through the clip form
  ``model(clip)``, the softmax scores averaged over the views (TSN/TSM multi-view testing);
- online, for models with a step form: the frames of the single centre clip fed one at a time through
  ``model.step`` with the state carried; the prediction is the output at the last frame (what a live stream reports
  at that moment), and also the softmax averaged over the last ``avg_last`` frames (a light smoothing).

Metrics: top-1, top-5 (top-k with k = min(5, classes)) and mean class accuracy (the mean of the per-class
recalls over the classes present), plus the confusion matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .annotations import VideoRecord
from .data import ClipDataset, Skipped, collate_clips, worker_init
from .sampling import sampler_for
from .transforms import TestTransform

log = logging.getLogger(__name__)


def classification_metrics(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """top1, top5, mean_class_acc (fractions), per-class accuracy and confusion of ``scores [N, K]``."""
    scores, labels = np.asarray(scores), np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return {"top1": float("nan"), "top5": float("nan"), "mean_class_acc": float("nan"), "count": 0,
                "per_class": [], "confusion": []}
    k = min(5, num_classes)
    order = np.argsort(-scores, axis=1)
    pred = order[:, 0]
    top1 = float(np.mean(pred == labels))
    top5 = float(np.mean((order[:, :k] == labels[:, None]).any(1)))
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(1)
    per_class = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(num_classes)]
    present = [a for a in per_class if a is not None]
    return {"top1": top1, "top5": top5, "mean_class_acc": float(np.mean(present)), "count": int(len(labels)),
            "per_class": per_class, "confusion": confusion.tolist()}


def pair_accuracy(scores: np.ndarray, labels: np.ndarray, a: int, b: int) -> float:
    """Accuracy on the clips of classes a and b, choosing only between a and b (0.5 is chance)."""
    labels = np.asarray(labels)
    sel = (labels == a) | (labels == b)
    if not sel.any():
        return float("nan")
    s = np.asarray(scores)[sel]
    pred = np.where(s[:, a] >= s[:, b], a, b)
    return float(np.mean(pred == labels[sel]))


def _loader(dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_clips, worker_init_fn=worker_init, pin_memory=device.type == "cuda")


def _bar(loader: DataLoader, what: str, enabled: bool):
    """The loader's batches, behind a progress bar on stderr when ``enabled`` (it leaves no line behind)."""
    return tqdm(loader, desc=f"eval {what}", unit="batch", leave=False, disable=not enabled, dynamic_ncols=True)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def predict_offline(model: torch.nn.Module, dataset: ClipDataset, *, batch_size: int = 8, workers: int = 0,
                    device: str | torch.device = "cpu", amp: bool = False,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray, list]:
    """Softmax scores ``[N, K]`` averaged over each video's views, its labels, and the skipped videos
    (``progress``: a bar on stderr, one tick per batch)."""
    device = torch.device(device)
    model.eval()
    scores, labels, skipped = [], [], []
    for batch in _bar(_loader(dataset, batch_size, workers, device), "offline", progress):
        skipped += batch.skipped
        if not len(batch):
            continue
        b, v = batch.clips.shape[:2]
        x = batch.clips.to(device, non_blocking=True).flatten(0, 1)  # [B*V, T, 3, S, S]
        with _autocast(device, amp):
            logits = model(x)
        probs = logits.float().softmax(-1).view(b, v, -1).mean(1)
        scores.append(probs.cpu().numpy())
        labels.append(batch.labels.numpy())
    k = getattr(model.cfg, "num_classes", 0)
    return (np.concatenate(scores) if scores else np.zeros((0, k), np.float32),
            np.concatenate(labels) if labels else np.zeros(0, np.int64), skipped)


@torch.no_grad()
def predict_online(model: torch.nn.Module, dataset: ClipDataset, *, avg_last: int = 4, batch_size: int = 8,
                   workers: int = 0, device: str | torch.device = "cpu",
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Feed each clip frame by frame through ``model.step`` (state carried, one row per video; ``progress``: a bar
    on stderr, one tick per batch).

    Returns:
        ``(scores_last, scores_avg, labels, skipped)``: softmax at the last frame, softmax averaged over the last
        ``avg_last`` frames, the labels, the skipped videos.
    """
    device = torch.device(device)
    model.eval()
    last, avg, labels, skipped = [], [], [], []
    for batch in _bar(_loader(dataset, batch_size, workers, device), "online", progress):
        skipped += batch.skipped
        if not len(batch):
            continue
        clips = batch.clips[:, 0].to(device)  # the single view: [B, T, 3, S, S]
        state, probs = None, []
        for t in range(clips.shape[1]):
            logits, state = model.step(clips[:, t], state)
            probs.append(logits.float().softmax(-1))
        probs = torch.stack(probs, 1)  # [B, T, K]
        last.append(probs[:, -1].cpu().numpy())
        avg.append(probs[:, -avg_last:].mean(1).cpu().numpy())
        labels.append(batch.labels.numpy())
    k = model.cfg.num_classes
    empty = np.zeros((0, k), np.float32)
    return (np.concatenate(last) if last else empty, np.concatenate(avg) if avg else empty,
            np.concatenate(labels) if labels else np.zeros(0, np.int64), skipped)


def evaluate(model: torch.nn.Module, records: Sequence[VideoRecord], *, num_clips: int = 1, crops: int = 1,
             twice_sample: bool = False, online: bool | None = None, avg_last: int = 4, batch_size: int = 8,
             workers: int = 0, device: str | torch.device = "cpu", amp: bool = False, sampling: str = "auto",
             short: str = "loop", frame_template: str = "img_{:05d}.jpg", start_index: int = 1,
             progress: bool = False) -> dict:
    """Run the offline protocol and, for models with a step form, the online protocol.

    Args:
        model: a model from :func:`streamtsm.models.create` / :func:`~streamtsm.models.load`.
        records: the videos to evaluate.
        num_clips, crops, twice_sample: the offline protocol's views (see :mod:`streamtsm.train.sampling`).
        online: run the online protocol; None runs it when the model has a step form.
        avg_last: frames averaged in the online protocol's smoothed prediction.
        progress: progress bars on stderr, one per protocol.

    Returns:
        ``{"offline": metrics, "online": metrics | None, "online_avg": metrics | None, "skipped": [paths],
        "protocol": {...}}``; metrics as :func:`classification_metrics`.
    """
    k = model.cfg.num_classes
    common = {"frame_template": frame_template, "start_index": start_index}
    offline_set = ClipDataset(records, sampler_for(model, train=False, num_clips=num_clips,
                                                   twice_sample=twice_sample, short=short, sampling=sampling),
                              TestTransform(model.cfg, crops), train=False, **common)
    scores, labels, skipped = predict_offline(model, offline_set, batch_size=batch_size, workers=workers,
                                              device=device, amp=amp, progress=progress)
    result = {"offline": classification_metrics(scores, labels, k), "online": None, "online_avg": None,
              "protocol": {"num_clips": num_clips, "crops": crops, "twice_sample": twice_sample,
                           "views": offline_set.sampler.views(True) * crops, "avg_last": avg_last,
                           "sampling": offline_set.sampler.describe()},
              "skipped": sorted({s.path for s in skipped})}
    has_step = bool(getattr(model, "online", False))
    if online is None:
        online = has_step
    if online and not has_step:
        log.warning("%s has no step form; the online protocol is skipped", model.cfg.name)
        online = False
    if online:
        online_set = ClipDataset(records, sampler_for(model, train=False, short=short, sampling=sampling),
                                 TestTransform(model.cfg, 1), train=False, **common)
        last, avg, labels_on, skipped_on = predict_online(model, online_set, avg_last=avg_last,
                                                          batch_size=batch_size, workers=workers, device=device,
                                                          progress=progress)
        result["online"] = classification_metrics(last, labels_on, k)
        result["online_avg"] = classification_metrics(avg, labels_on, k)
        result["skipped"] = sorted(set(result["skipped"]) | {s.path for s in skipped_on})
    result["scores"] = scores
    result["labels"] = labels
    return result


def format_table(result: dict, labels: Sequence[str] | None = None) -> str:
    """The protocols of :func:`evaluate` as a small text table (percentages)."""
    p = result["protocol"]
    rows = [("protocol", "top-1", "top-5", "mean class", "videos")]
    views = f"{p['views']} views" + (" twice" if p["twice_sample"] else "")
    names = [("offline", f"offline ({p['num_clips']} clips x {p['crops']} crops, {views})"),
             ("online", "online (step, last frame)"),
             ("online_avg", f"online (step, mean of last {p['avg_last']})")]
    for key, name in names:
        m = result.get(key)
        if m:
            rows.append((name, f"{100 * m['top1']:.1f}", f"{100 * m['top5']:.1f}",
                         f"{100 * m['mean_class_acc']:.1f}", str(m["count"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    if result.get("skipped"):
        lines.append(f"skipped {len(result['skipped'])} unreadable video(s): {', '.join(result['skipped'][:3])}")
    return "\n".join(lines)


def skipped_paths(skipped: Sequence[Skipped]) -> list[str]:
    return sorted({s.path for s in skipped})
