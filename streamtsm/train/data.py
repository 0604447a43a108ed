"""The clip dataset that joins the training data's pieces: records (:mod:`.annotations`), decoding (:mod:`.video`),
frame sampling (:mod:`.sampling`) and transforms (:mod:`.transforms`); its collate function, the matched batch
sampler and the DataLoader worker setup.

An unreadable video never stops an epoch: the dataset returns a :class:`Skipped` marker, :func:`collate_clips`
drops it from the batch and reports it, and the training loop counts and names it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .annotations import FRAME_TEMPLATE, VideoRecord, frame_template_glob
from .sampling import Sampler
from .transforms import TestTransform, TrainTransform
from .video import VideoReadError, count_frames, read_frames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """Stands in for a clip that could not be read; :func:`collate_clips` drops it and reports it."""

    path: str
    reason: str


class ClipDataset(Dataset):
    """Labelled clips of a list of :class:`VideoRecord`.

    Training (``train=True``): item ``i`` is ``(clip [T, 3, S, S], label)`` with a random temporal sample and a
    random augmentation. Testing: ``(views [V, T, 3, S, S], label)``, V = temporal views x crops, in that order
    (view ``c * crops + k`` is clip c, crop k).

    Randomness comes from torch's generator (seeded per DataLoader worker and epoch), so a run is repeatable by
    its seed whatever the number of workers.

    Args:
        records: the videos.
        sampler: frame sampling (:class:`SegmentSampler` or :class:`DenseSampler`).
        transform: a :class:`TrainTransform` when training, a :class:`TestTransform` when testing.
        train: training or test mode.
        frame_template, start_index: names of frame files in frame directories (``img_{:05d}.jpg``, 1-based).
    """

    def __init__(self, records: Sequence[VideoRecord], sampler: Sampler,
                 transform: TrainTransform | TestTransform, *, train: bool,
                 frame_template: str = FRAME_TEMPLATE, start_index: int = 1) -> None:
        frame_template_glob(frame_template)
        self.records = list(records)
        self.sampler = sampler
        self.transform = transform
        self.train = train
        self.frame_template = frame_template
        self.start_index = start_index

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def load(self, index: int, rng: np.random.Generator) -> tuple[list[np.ndarray], int]:
        """Decoded frames of every temporal view (BGR uint8 ``[T, H, W, 3]`` each) and the label."""
        record = self.records[index]
        views = self.sampler(count_frames(record), self.train, rng)
        needed = np.unique(np.concatenate(views))
        frames = read_frames(record, needed, self.frame_template, self.start_index)
        position = {int(i): j for j, i in enumerate(needed)}
        return [frames[[position[int(i)] for i in v]] for v in views], record.label

    def first_readable(self) -> tuple[int | None, Skipped | None]:
        """Decode clips in list order until one reads: ``(its index, the first failure before it)``, or
        ``(None, the first failure)`` when none does. Usually one decode; draws nothing from torch's generator,
        so a run's random draws stay those of its seed."""
        first_failure = None
        for index, record in enumerate(self.records):
            try:
                self.load(index, np.random.default_rng(0))
            except (VideoReadError, cv2.error) as e:
                first_failure = first_failure or Skipped(record.path, str(e))
                continue
            return index, first_failure
        return None, first_failure

    def __getitem__(self, index: int | tuple[int, int]):
        # (index, seed): a sampler that wants several clips to share their random draws (MatchedBatchSampler).
        index, seed = index if isinstance(index, tuple) else (index, int(torch.randint(0, 2**62, (1,)).item()))
        record = self.records[index]
        rng = np.random.default_rng(seed)
        try:
            views, label = self.load(index, rng)
        except (VideoReadError, cv2.error) as e:
            log.warning("skipping unreadable video %s: %s", record.path, e)
            return Skipped(record.path, str(e))
        if self.train:
            clip, label = self.transform(views[0], label, rng)
            return torch.from_numpy(clip), label
        out = np.concatenate([self.transform(v) for v in views])  # [clips * crops, T, 3, S, S]
        return torch.from_numpy(out), label


@dataclass
class Batch:
    """A collated batch: clips ``[B, ...]``, labels ``[B]``, and the videos dropped from it."""

    clips: torch.Tensor
    labels: torch.Tensor
    skipped: list[Skipped]

    def __len__(self) -> int:
        return len(self.labels)


def collate_clips(items: list) -> Batch:
    """Stack the readable clips of a batch; unreadable ones (:class:`Skipped`) are dropped and listed."""
    skipped = [it for it in items if isinstance(it, Skipped)]
    good = [it for it in items if not isinstance(it, Skipped)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack([c for c, _ in good]), torch.tensor([lb for _, lb in good], dtype=torch.long), skipped)


class MatchedBatchSampler(torch.utils.data.Sampler):
    """Batches built from whole scenes: ``scenes_per_batch`` scenes, each shown in several classes.

    Training from scratch, a TSM first learns what clips look like, since appearance varies far more than motion
    does, and only slowly finds the few shifted channels that carry motion. In a batch of one scene shown in every
    class, batch norm subtracts the scene's own statistics and the loss can only be lowered through what differs
    between the clips, their motion, so the shifted channels learn within a few hundred steps. The clips of a
    scene share their random draws (the sampler yields ``(index, seed)`` pairs), so augmentation keeps them
    aligned. More scenes per
    batch (and fewer classes of each) bring the batch statistics back to those of shuffled batches, which are the
    ones the model keeps; training's ``matched_warmup_epochs`` steps from one scene per batch to many.

    Args:
        records: the dataset's records; scenes are their :attr:`VideoRecord.scene_key`.
        scenes_per_batch: scenes in each batch.
        batch_size: clips per batch (default: the most classes a scene has, times ``scenes_per_batch``); each
            scene gives ``batch_size // scenes_per_batch`` clips of distinct classes, drawn at random.
        generator: torch generator for the draws.

    Raises:
        ConfigError: no scene appears in two classes.
    """

    def __init__(self, records: Sequence[VideoRecord], scenes_per_batch: int = 1, batch_size: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        scenes: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            scenes.setdefault(r.scene_key, []).append(i)
        self.groups = [idx for idx in scenes.values() if len({records[i].label for i in idx}) > 1]
        if not self.groups:
            raise ConfigError("matched batches need scenes shown in several classes (the same file name in each "
                              "class folder, as `streamtsm synth` writes them); none found")
        self.scenes_per_batch = max(1, min(scenes_per_batch, len(self.groups)))
        largest = max(len(g) for g in self.groups)
        self.per_scene = max(1, (batch_size or largest * self.scenes_per_batch) // self.scenes_per_batch)
        self.generator = generator

    def __len__(self) -> int:
        clips = sum(min(len(g), self.per_scene) for g in self.groups)
        return max(1, clips // (self.per_scene * self.scenes_per_batch))

    def __iter__(self):
        order = torch.randperm(len(self.groups), generator=self.generator).tolist()
        for b in range(len(self)):
            batch = []
            for g in order[b * self.scenes_per_batch : (b + 1) * self.scenes_per_batch]:
                group = self.groups[g]
                pick = torch.randperm(len(group), generator=self.generator)[: self.per_scene].tolist()
                # One seed per scene: its clips share the temporal offset, crop and flip, and stay aligned.
                seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
                batch += [(group[i], seed) for i in pick]
            yield batch


def worker_init(worker_id: int) -> None:
    """One OpenCV thread per DataLoader worker: the workers are the parallelism."""
    cv2.setNumThreads(1)
