"""Training data: annotation lists, frame sampling, clip transforms and the dataset that ties them together.

Everything is OpenCV and numpy (no torchvision); a clip travels as BGR uint8 ``[T, H, W, 3]`` until the last
transform turns it into the normalized float ``[T, 3, S, S]`` RGB the models take.

Sources of videos (:func:`read_annotations`, :func:`scan_folders`), in mmaction2's conventions:

    video list      ``path label``                    one video file per line
    rawframe list   ``frame_dir total_frames label``  frames ``frame_dir/img_00001.jpg`` ... (template configurable)
    class folders   ``root/<class>/<video or frame dir>``  class names sorted -> label indices

Sampling (:class:`SegmentSampler`, TSN/TSM; :class:`DenseSampler`, clip models such as X3D)::

    segments, train    |--x-----|-----x--|---x----|   one frame at a random offset in each of T segments
    segments, test     |---x----|---x----|---x----|   the centre of each segment (twice_sample: and its start)
    dense              ....x.x.x.x.x.x.x.x.......     clip_len frames every frame_interval, random start when
                                                      training, centred when testing

An unreadable video never stops an epoch: the dataset returns a :class:`Skipped` marker, :func:`collate_clips`
drops it from the batch and reports it, and the training loop counts and names it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import window_span
from ..errors import ConfigError
from ..preprocess import Preprocessor

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
FRAME_TEMPLATE = "img_{:05d}.jpg"
SHORT_VIDEO_POLICIES = ("loop", "repeat_last")
MULTI_SCALES = (1.0, 0.875, 0.75, 0.66)


# -- video records and annotation lists ---------------------------------------------------------------------


@dataclass(frozen=True)
class VideoRecord:
    """One labelled video.

    Attributes:
        path: a video file or a directory of frames (empty for in-memory clips).
        label: class index.
        num_frames: frames in a frame directory (from the list); None for video files (read when opened).
        frames: an in-memory clip, BGR uint8 ``[F, H, W, 3]`` (tests, generated data); ``path`` is then a name.
        scene: what the clip shows apart from its action, for matched batches (:class:`MatchedBatchSampler`);
            default: the file name, which ``streamtsm synth`` shares between the classes of one scene.
    """

    path: str
    label: int
    num_frames: int | None = None
    frames: np.ndarray | None = None
    scene: str | None = None

    @property
    def scene_key(self) -> str:
        return self.scene if self.scene is not None else os.path.basename(os.path.normpath(self.path))

    @property
    def kind(self) -> str:
        if self.frames is not None:
            return "array"
        return "video" if self.num_frames is None else "frames"


def _resolve(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else base / p)


def read_annotations(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
                     list_format: str = "auto") -> list[VideoRecord]:
    """Read an mmaction2-style annotation list.

    Args:
        path: the list file; ``#`` starts a comment line, blank lines are skipped.
        data_root: folder the paths in the list are relative to (default: the list file's folder).
        list_format: ``"video"`` (``path label``), ``"rawframes"`` (``frame_dir total_frames label``) or
            ``"auto"``: rawframes when every line ends in two integers, else video. Paths may contain spaces.

    Raises:
        ConfigError: the file is missing, empty, or a line does not parse.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"annotation list not found: {path}")
    if list_format not in ("auto", "video", "rawframes"):
        raise ConfigError(f"list format must be auto, video or rawframes, got {list_format!r}")
    base = Path(data_root) if data_root is not None else path.parent
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise ConfigError(f"annotation list {path} has no entries")

    def ends_in_two_ints(line: str) -> bool:
        parts = line.rsplit(maxsplit=2)
        return len(parts) == 3 and parts[1].isdigit() and parts[2].lstrip("-").isdigit()

    if list_format == "auto":
        list_format = "rawframes" if all(ends_in_two_ints(line) for _, line in lines) else "video"
    records = []
    for n, line in lines:
        parts = line.rsplit(maxsplit=2 if list_format == "rawframes" else 1)
        try:
            if list_format == "rawframes":
                if len(parts) != 3:
                    raise ValueError
                rel, total, label = parts[0], int(parts[1]), int(parts[2])
                if total < 1:
                    raise ConfigError(f"{path}:{n}: total_frames must be >= 1, got {total}")
                records.append(VideoRecord(_resolve(rel, base), label, total))
            else:
                if len(parts) != 2:
                    raise ValueError
                records.append(VideoRecord(_resolve(parts[0], base), int(parts[1])))
        except ValueError:
            form = "frame_dir total_frames label" if list_format == "rawframes" else "path label"
            raise ConfigError(f"{path}:{n}: expected '{form}', got {line!r}") from None
        if records[-1].label < 0:
            raise ConfigError(f"{path}:{n}: label must be >= 0, got {records[-1].label}")
    return records


def scan_folders(root: str | os.PathLike, labels: Sequence[str] | None = None,
                 frame_template: str = FRAME_TEMPLATE) -> tuple[list[VideoRecord], list[str]]:
    """Records of a folder-per-class layout: ``root/<class>/<video file | frame directory>``.

    Args:
        root: the dataset folder.
        labels: class names in label order; default: the sorted sub-folder names.
        frame_template: names of the frames in a frame directory (their count is its total_frames).

    Returns:
        ``(records, labels)``.

    Raises:
        ConfigError: the folder is missing, holds no class folders, or a class folder is not in ``labels``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"dataset folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{root} holds no class folders (expected root/<class>/<video>)")
    labels = list(labels) if labels is not None else classes
    index = {name: i for i, name in enumerate(labels)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise ConfigError(f"class folders {unknown[:5]} of {root} are not in the {len(labels)} labels given")
    pattern = frame_template_glob(frame_template)
    records = []
    for name in classes:
        for entry in sorted((root / name).iterdir()):
            if entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS:
                records.append(VideoRecord(str(entry), index[name]))
            elif entry.is_dir():
                count = len(list(entry.glob(pattern)))
                if count:
                    records.append(VideoRecord(str(entry), index[name], count))
    if not records:
        raise ConfigError(f"no videos ({', '.join(VIDEO_EXTENSIONS[:4])}, ...) or frame folders found under {root}")
    return records, labels


def frame_template_glob(template: str) -> str:
    """``img_{:05d}.jpg`` -> ``img_*.jpg``."""
    start, end = template.find("{"), template.find("}")
    if start < 0 or end < start:
        raise ConfigError(f"frame template must hold one {{}} field for the index, got {template!r}")
    return template[:start] + "*" + template[end + 1 :]


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels file not found: {path}")
    labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not labels:
        raise ConfigError(f"labels file {path} is empty")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"labels file {path} repeats a name")
    return labels


def load_records(source: str | os.PathLike, data_root: str | os.PathLike | None = None,
                 labels: Sequence[str] | None = None, frame_template: str = FRAME_TEMPLATE,
                 list_format: str = "auto") -> tuple[list[VideoRecord], list[str] | None]:
    """Records of an annotation list or a class-folder root; the labels of the folders (None for a list)."""
    path = Path(source)
    if path.is_dir():
        return scan_folders(path, labels, frame_template)
    return read_annotations(path, data_root, list_format), None


# -- decoding -----------------------------------------------------------------------------------------------


class VideoReadError(Exception):
    """A video or frame cannot be read (counted and skipped by the dataset)."""


def count_frames(record: VideoRecord) -> int:
    """Frames in the record's video (the container's count; frame lists and arrays know theirs)."""
    if record.frames is not None:
        return len(record.frames)
    if record.num_frames is not None:
        return record.num_frames
    cap = cv2.VideoCapture(record.path)
    try:
        if not cap.isOpened():
            raise VideoReadError(f"cannot open {record.path}")
        return _container_count(cap, record.path)
    finally:
        cap.release()


def _container_count(cap: cv2.VideoCapture, path: str) -> int:
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if count > 0:
        return count
    # Some containers do not say; count by demuxing (grab does not decode for intra codecs).
    count = 0
    while cap.grab():
        count += 1
    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
    if count == 0:
        raise VideoReadError(f"{path} has no frames")
    return count


def read_frames(record: VideoRecord, indices: np.ndarray, frame_template: str = FRAME_TEMPLATE,
                start_index: int = 1) -> np.ndarray:
    """The frames at ``indices`` (any order, repeats allowed) as BGR uint8 ``[len(indices), H, W, 3]``.

    Video files are decoded sequentially up to the last index needed (``grab`` skips, ``retrieve`` decodes only
    the frames used). A container that reports more frames than it holds yields its last decoded frame for the
    indices past its end.

    Raises:
        VideoReadError: the video cannot be opened or holds no frame, or a frame file is unreadable.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if record.frames is not None:
        return record.frames[np.clip(indices, 0, len(record.frames) - 1)]
    if record.num_frames is not None:
        cache: dict[int, np.ndarray] = {}
        out = []
        for i in indices.tolist():
            if i not in cache:
                file = os.path.join(record.path, frame_template.format(i + start_index))
                image = cv2.imread(file, cv2.IMREAD_COLOR)
                if image is None:
                    raise VideoReadError(f"cannot read frame {file}")
                cache[i] = image
            out.append(cache[i])
        return _stack(out, record.path)
    cap = cv2.VideoCapture(record.path)
    try:
        if not cap.isOpened():
            raise VideoReadError(f"cannot open {record.path}")
        wanted = set(indices.tolist())
        last_wanted = max(wanted)
        decoded: dict[int, np.ndarray] = {}
        last, i = None, 0
        while i <= last_wanted and cap.grab():
            if i in wanted:
                ok, image = cap.retrieve()
                if not ok or image is None:
                    raise VideoReadError(f"cannot decode frame {i} of {record.path}")
                decoded[i] = last = image
            i += 1
        if not decoded and i > 0:
            # Every wanted index lies past the real end: fall back to the last frame.
            cap.set(cv2.CAP_PROP_POS_FRAMES, i - 1)
            ok, last = cap.read()
            if not ok:
                last = None
        if last is None:
            raise VideoReadError(f"{record.path} has no decodable frames")
        available = sorted(decoded)
        out = []
        for j in indices.tolist():
            if j in decoded:
                out.append(decoded[j])
            else:  # past the end the container claimed: the nearest earlier decoded frame
                earlier = [k for k in available if k <= j]
                out.append(decoded[earlier[-1]] if earlier else last)
        return _stack(out, record.path)
    finally:
        cap.release()


def _stack(frames: list[np.ndarray], path: str) -> np.ndarray:
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise VideoReadError(f"{path}: frames of different sizes {sorted(shapes)[:3]}")
    return np.stack(frames)


# -- sampling -----------------------------------------------------------------------------------------------


def _fit_short(indices: np.ndarray, num_frames: int, policy: str) -> np.ndarray:
    if policy == "loop":
        return indices % num_frames
    return np.minimum(indices, num_frames - 1)


@dataclass(frozen=True)
class SegmentSampler:
    """TSN/TSM sampling: one frame from each of ``num_segments`` equal segments of the video.

    Training takes a random offset within each segment; testing takes the centre (with ``num_clips`` > 1, the
    offsets ``(k + 0.5) / num_clips`` of each segment, k = 0..num_clips-1), and ``twice_sample`` adds the start of
    each segment (TSM's twice sampling: 2x the clips). A video shorter than ``num_segments`` frames is looped or
    its last frame repeated (``short``).
    """

    num_segments: int
    num_clips: int = 1
    twice_sample: bool = False
    short: str = "loop"

    def __post_init__(self) -> None:
        if self.num_segments < 1 or self.num_clips < 1:
            raise ConfigError(f"num_segments and num_clips must be >= 1, got {self.num_segments}, {self.num_clips}")
        if self.short not in SHORT_VIDEO_POLICIES:
            raise ConfigError(f"short-video policy must be one of {SHORT_VIDEO_POLICIES}, got {self.short!r}")

    @property
    def frames_per_clip(self) -> int:
        return self.num_segments

    def describe(self) -> dict:
        """The sampling, as reports and checkpoints record it."""
        return {"kind": "segments", "num_segments": self.num_segments}

    def views(self, test: bool) -> int:
        return self.num_clips * (2 if self.twice_sample else 1) if test else 1

    def __call__(self, num_frames: int, train: bool, rng: np.random.Generator) -> list[np.ndarray]:
        """Frame indices of each temporal view: one array of ``num_segments`` indices per clip."""
        t = self.num_segments
        if num_frames < t:
            return [_fit_short(np.arange(t), num_frames, self.short)] * self.views(not train)
        tick = num_frames / t
        if train:
            starts = (np.arange(t) * tick).astype(np.int64)
            ends = (np.arange(1, t + 1) * tick).astype(np.int64)
            return [starts + rng.integers(0, np.maximum(ends - starts, 1))]
        offsets = [(k + 0.5) / self.num_clips for k in range(self.num_clips)]
        if self.twice_sample:
            offsets += [k / self.num_clips for k in range(self.num_clips)]
        return [np.minimum((tick * (np.arange(t) + o)).astype(np.int64), num_frames - 1) for o in offsets]


@dataclass(frozen=True)
class DenseSampler:
    """Dense clips for clip models: ``clip_len`` frames every ``frame_interval`` frames.

    Training starts at a random frame; testing centres the clip (``num_clips`` > 1: clips spread evenly over the
    video, as mmaction2's SampleFrames test mode). Clips running past the end loop or repeat the last frame.
    """

    clip_len: int
    frame_interval: int = 1
    num_clips: int = 1
    short: str = "loop"

    def __post_init__(self) -> None:
        if self.clip_len < 1 or self.frame_interval < 1 or self.num_clips < 1:
            raise ConfigError("clip_len, frame_interval and num_clips must be >= 1, got "
                              f"{self.clip_len}, {self.frame_interval}, {self.num_clips}")
        if self.short not in SHORT_VIDEO_POLICIES:
            raise ConfigError(f"short-video policy must be one of {SHORT_VIDEO_POLICIES}, got {self.short!r}")

    @property
    def frames_per_clip(self) -> int:
        return self.clip_len

    def describe(self) -> dict:
        """The sampling, as reports and checkpoints record it."""
        return {"kind": "dense", "clip_len": self.clip_len, "frame_interval": self.frame_interval}

    def views(self, test: bool) -> int:
        return self.num_clips if test else 1

    def __call__(self, num_frames: int, train: bool, rng: np.random.Generator) -> list[np.ndarray]:
        span = window_span(self.clip_len, self.frame_interval)
        steps = np.arange(self.clip_len) * self.frame_interval
        room = max(num_frames - span, 0)
        if train:
            starts = [int(rng.integers(0, room + 1))]
        elif self.num_clips == 1:
            starts = [room // 2]
        else:
            interval = (room + 1) / self.num_clips
            starts = [int(interval / 2 + interval * k) for k in range(self.num_clips)]
        return [_fit_short(s + steps, num_frames, self.short) for s in starts]


Sampler = SegmentSampler | DenseSampler


def sampler_for(model, *, train: bool = True, num_clips: int = 1, twice_sample: bool = False,
                short: str = "loop", sampling: str = "auto", clip_len: int | None = None,
                frame_interval: int | None = None) -> Sampler:
    """The sampler a model was built for.

    ``sampling="auto"``: dense clips for clip models without segments (X3D, UniFormer: ``cfg.kind == "clip"`` and
    no ``num_segments`` attribute), TSN segments otherwise. ``"dense"`` on a TSM model takes ``num_segments``
    consecutive frames (every ``frame_interval``-th), the frames a live camera feeds the online model.
    """
    cfg = model.cfg
    segments = getattr(model, "num_segments", None)
    if sampling == "auto":
        sampling = "dense" if cfg.kind == "clip" and segments is None else "segments"
    if sampling == "segments":
        if segments is None:
            raise ConfigError(f"{cfg.name} has no num_segments; sample it with dense clips")
        return SegmentSampler(segments, num_clips if not train else 1, twice_sample and not train, short)
    if sampling == "dense":
        length = clip_len or segments or cfg.clip_len
        if segments is not None and clip_len is not None and clip_len != segments:
            raise ConfigError(f"{cfg.name} takes clips of num_segments={segments} frames, got clip_len={clip_len}")
        return DenseSampler(length, frame_interval or cfg.frame_interval, num_clips if not train else 1, short)
    raise ConfigError(f"sampling must be auto, segments or dense, got {sampling!r}")


# -- transforms ---------------------------------------------------------------------------------------------


def _normalize(frames: np.ndarray, mean, std) -> np.ndarray:
    """BGR uint8 ``[T, S, S, 3]`` -> normalized RGB float32 ``[T, 3, S, S]``."""
    std = np.asarray(std, np.float32)
    scale = 1.0 / (255.0 * std)
    bias = -np.asarray(mean, np.float32) / std
    rgb = frames[..., ::-1].astype(np.float32) * scale + bias
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))


def multi_scale_crop_box(height: int, width: int, input_size: int, rng: np.random.Generator,
                         scales: Sequence[float] = MULTI_SCALES, max_distort: int = 1,
                         fix_crop: bool = True) -> tuple[int, int, int, int]:
    """TSN's GroupMultiScaleCrop: ``(x, y, w, h)`` of a crop whose sides are each a scale of the short side.

    Width and height scales are drawn as a pair at most ``max_distort`` steps apart in ``scales`` (aspect
    jitter); a side within 3 px of ``input_size`` snaps to it. With ``fix_crop`` the crop sits at one of 13 fixed
    places (corners, centre, edge middles, quarter points; TSN's more_fix_crop), else anywhere.
    """
    base = min(height, width)
    sizes = [int(base * s) for s in scales]
    sizes = [input_size if abs(s - input_size) < 3 else s for s in sizes]
    pairs = [(w, h) for i, h in enumerate(sizes) for j, w in enumerate(sizes) if abs(i - j) <= max_distort]
    crop_w, crop_h = pairs[int(rng.integers(len(pairs)))]
    crop_w, crop_h = min(crop_w, width), min(crop_h, height)
    if not fix_crop:
        return (int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1)), crop_w, crop_h)
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    places = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    gx, gy = places[int(rng.integers(len(places)))]
    return gx * ws, gy * hs, crop_w, crop_h


class TrainTransform:
    """Training augmentation of a clip; one draw per clip, applied alike to all its frames.

    Resize the short side to ``resize_size`` (as the test transform does), take a multi-scale crop
    (:func:`multi_scale_crop_box`), resize it to ``input_size`` square, optionally flip, normalize.

    Args:
        input_size, resize_size, mean, std: the model's data settings (``model.cfg``).
        scales: crop sides as fractions of the short side.
        max_distort: how far apart (in steps of ``scales``) the width and height scales may be.
        flip: flip clips horizontally with probability 0.5. Off by default: a mirrored move_left is a move_right
            and a mirrored rotate_cw a rotate_ccw, so on direction classes a flip teaches the wrong label unless
            ``flip_label_map`` names the pairs to swap.
        flip_label_map: ``{label: label of the mirrored clip}``; labels not in it keep their label.
    """

    def __init__(self, input_size: int, resize_size: int, mean, std, *, scales: Sequence[float] = MULTI_SCALES,
                 max_distort: int = 1, flip: bool = False, flip_label_map: dict[int, int] | None = None) -> None:
        self.input_size = input_size
        self.resize_size = resize_size
        self.mean, self.std = mean, std
        self.scales = tuple(scales)
        self.max_distort = max_distort
        self.flip = flip
        self.flip_label_map = dict(flip_label_map or {})

    @classmethod
    def for_config(cls, cfg, **kwargs) -> TrainTransform:
        return cls(cfg.input_size, cfg.resize_size, cfg.mean, cfg.std, **kwargs)

    def __call__(self, frames: np.ndarray, label: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """BGR uint8 ``[T, H, W, 3]`` -> (float32 ``[T, 3, S, S]``, label after a possible flip)."""
        _, h, w, _ = frames.shape
        # The crop box is drawn on the frame resized to resize_size and mapped back, so each frame is resized once.
        k = self.resize_size / min(h, w)
        rh, rw = max(1, round(h * k)), max(1, round(w * k))
        x, y, cw, ch = multi_scale_crop_box(rh, rw, self.input_size, rng, self.scales, self.max_distort)
        x0, y0 = int(x / k), int(y / k)
        x1, y1 = max(x0 + 1, min(w, round((x + cw) / k))), max(y0 + 1, min(h, round((y + ch) / k)))
        size = (self.input_size, self.input_size)
        interp = cv2.INTER_AREA if (x1 - x0) > self.input_size else cv2.INTER_LINEAR
        out = np.stack([cv2.resize(f[y0:y1, x0:x1], size, interpolation=interp) for f in frames])
        if self.flip and rng.random() < 0.5:
            out = out[:, :, ::-1]
            label = self.flip_label_map.get(label, label)
        return _normalize(out, self.mean, self.std), label


class TestTransform:
    """Deterministic test views of a clip: ``crops`` spatial crops, float32 ``[crops, T, 3, S, S]``.

    One crop is exactly what the live pipeline does (:class:`streamtsm.preprocess.Preprocessor`: short side to
    ``resize_size``, centre ``input_size`` crop). Three crops (mmaction2's ThreeCrop at the network's input size):
    the short side resized to ``input_size``, crops at the start, centre and end of the long side, so together
    they cover the whole frame.
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, cfg, crops: int = 1) -> None:
        if crops not in (1, 3):
            raise ConfigError(f"crops must be 1 or 3, got {crops}")
        self.crops = crops
        self.input_size = cfg.input_size
        self.mean, self.std = cfg.mean, cfg.std
        self.centre = Preprocessor.for_config(cfg)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        if self.crops == 1:
            return np.stack([self.centre(f) for f in frames])[None]
        s = self.input_size
        _, h, w, _ = frames.shape
        k = s / min(h, w)
        rw, rh = max(s, round(w * k)), max(s, round(h * k))
        interp = cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR
        resized = np.stack([cv2.resize(f, (rw, rh), interpolation=interp) for f in frames])
        views = []
        for i in range(3):
            x, y = (rw - s) * i // 2, (rh - s) * i // 2
            views.append(_normalize(resized[:, y : y + s, x : x + s], self.mean, self.std))
        return np.stack(views)


# -- dataset ------------------------------------------------------------------------------------------------


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


def flip_label_map(labels: Sequence[str], pairs: Sequence[tuple[str, str]]) -> dict[int, int]:
    """``{index: index}`` swapping each named pair (both ways), for :class:`TrainTransform`."""
    index = {name: i for i, name in enumerate(labels)}
    out = {}
    for a, b in pairs:
        for name in (a, b):
            if name not in index:
                raise ConfigError(f"flip swap names {name!r}, which is not a label")
        out[index[a]], out[index[b]] = index[b], index[a]
    return out


def mirrored_pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    """Label pairs a horizontal flip turns into each other, found by name: ``*left*``/``*right*``, ``*_cw``/``*_ccw``."""
    names = set(labels)
    pairs = []
    for name in labels:
        other = None
        if "left" in name:
            other = name.replace("left", "right")
        elif name.endswith("_cw"):
            other = name[: -len("_cw")] + "_ccw"
        if other in names and other != name:
            pairs.append((name, other))
    return pairs


# -- the synthetic motion dataset ---------------------------------------------------------------------------

SYNTH_FOURCC = "MJPG"
SYNTH_EXT = ".avi"


def _write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """MJPG in AVI through OpenCV's own MJPEG writer: no ffmpeg needed to write, every frame a keyframe (exact
    seeking), read back by every OpenCV build. Falls back to the default backend where the built-in is absent."""
    h, w = frames.shape[1:3]
    fourcc = cv2.VideoWriter_fourcc(*SYNTH_FOURCC)
    writer = cv2.VideoWriter(str(path), cv2.CAP_OPENCV_MJPEG, fourcc, fps, (w, h))
    if not writer.isOpened():
        writer = cv2.VideoWriter(str(path), fourcc, fps, (w, h))
    if not writer.isOpened():
        raise ConfigError(f"OpenCV cannot write {SYNTH_FOURCC} video to {path}")
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()


def render_scene_clip(motion: str, scene: int, *, frames: int, size: tuple[int, int], seed: int = 0,
                      motion_frames: int | None = None, render: tuple[int, int] | None = None) -> np.ndarray:
    """Scene ``scene``'s clip of ``motion``, as ``streamtsm synth`` writes it: [frames, H, W, 3] uint8 BGR.

    ``size`` and ``render`` are (width, height). ``motion_frames`` (default ``frames``) spreads the motion over
    more frames than the clip keeps; ``render`` (default ``size``) draws larger frames and shrinks them to ``size``
    with INTER_AREA.
    """
    from ..synthetic import render_clip

    motion_frames = motion_frames or frames
    render = render or size
    clip = render_clip(motion, motion_frames, render[0], render[1], scene_rng(seed, scene))
    if motion_frames > frames:
        # The same window for every motion of the scene (its own generator: the scene's draws stay the same).
        start = int(np.random.default_rng([seed, scene, 1]).integers(0, motion_frames - frames + 1))
        clip = clip[start : start + frames]
    if tuple(render) != tuple(size):
        clip = np.stack([cv2.resize(f, tuple(size), interpolation=cv2.INTER_AREA) for f in clip])
    return clip


def _render_one(job: tuple) -> str:
    path, motion, index, frames, motion_frames, width, height, render, seed, fps = job
    clip = render_scene_clip(motion, index, frames=frames, size=(width, height), seed=seed,
                             motion_frames=motion_frames, render=render)
    _write_video(Path(path), clip, fps)
    return path


def scene_rng(seed: int, scene: int) -> np.random.Generator:
    """The generator of scene ``scene``: render_clip draws the same look, place and noise from it for every
    motion, so the scene's clips differ only in their motion."""
    return np.random.default_rng([seed, scene])


def parse_size(size: str | int | Sequence[int]) -> tuple[int, int]:
    """``64`` -> (64, 64); ``"160x120"`` -> (160, 120) as (width, height)."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    text = str(size).lower().strip()
    try:
        if "x" in text:
            w, h = text.split("x")
            return int(w), int(h)
        return int(text), int(text)
    except ValueError:
        raise ConfigError(f"size must be S or WIDTHxHEIGHT (e.g. 64 or 160x120), got {size!r}") from None


def write_synthetic_dataset(out: str | os.PathLike, *, clips_per_class: int = 50, frames: int = 16,
                            size: str | int | tuple[int, int] = 64, seed: int = 0, val_fraction: float = 0.2,
                            classes: Sequence[str] | None = None, motion_frames: int | None = None,
                            render_size: str | int | tuple[int, int] | None = None, fps: float = 30.0,
                            workers: int = 0, progress: bool = False) -> dict:
    """Render the synthetic motion dataset: one video per clip of :func:`streamtsm.synthetic.render_clip`.

    Layout of ``out``::

        videos/<motion>/scene_0000.avi   MJPG, ``frames`` frames of ``size``, the whole motion spans the clip
        train.txt, val.txt                ``videos/<motion>/scene_0000.avi <label>`` (relative to ``out``)
        labels.txt                        the classes in label order
        synth.json                        the settings and counts

    Scene i is rendered once per motion from the same generator (:func:`scene_rng`): background, shape,
    texture, start pose, speed and noise are the same in all its clips, only the motion differs. No look can
    tell the classes apart, and scenes make matched batches (:class:`MatchedBatchSampler`). A clip depends only
    on (seed, scene, motion, frames, size), whatever ``classes`` or ``workers``. The last
    ``round(clips_per_class * val_fraction)`` scenes are the val split, so val scenes are never seen in training.

    ``motion_frames`` (default ``frames``) sets the speed: the motion spans that many frames, and a clip is a
    window of ``frames`` consecutive frames of it (the same window in all the motions of a scene). The live
    ``synthetic`` source holds each motion for ``MotionScene.segment_frames`` (60) frames: ``motion_frames=60``
    gives its speed per frame. ``render_size`` (default ``size``) renders larger frames and shrinks them to
    ``size`` (INTER_AREA), as the live pipeline shrinks the 320x240 synthetic frames: the same texture detail and
    noise as the live frames have after preprocessing.

    Raises:
        ConfigError: unknown class, bad counts, sizes or fraction.
    """
    from ..synthetic import MOTIONS

    classes = list(classes) if classes else list(MOTIONS)
    unknown = [c for c in classes if c not in MOTIONS]
    if unknown:
        raise ConfigError(f"unknown class(es) {unknown}; the synthetic motions are: {', '.join(MOTIONS)}")
    if len(set(classes)) != len(classes):
        raise ConfigError("a class is named twice")
    width, height = parse_size(size)
    render = parse_size(render_size) if render_size is not None else (width, height)
    if min(width, height, *render) < 8:
        raise ConfigError(f"size must be at least 8x8, got {width}x{height} (rendered at {render[0]}x{render[1]})")
    if clips_per_class < 1 or frames < 1:
        raise ConfigError(f"clips per class and frames must be >= 1, got {clips_per_class}, {frames}")
    motion_frames = frames if motion_frames is None else motion_frames
    if motion_frames < frames:
        raise ConfigError(f"motion frames must be >= frames, got {motion_frames} < {frames}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val fraction must be in [0, 1), got {val_fraction}")
    if fps <= 0:
        raise ConfigError(f"fps must be > 0, got {fps}")
    out = Path(out)
    num_val = round(clips_per_class * val_fraction)
    jobs, lines = [], {"train": [], "val": []}
    for label, motion in enumerate(classes):
        (out / "videos" / motion).mkdir(parents=True, exist_ok=True)
        for i in range(clips_per_class):
            rel = f"videos/{motion}/scene_{i:04d}{SYNTH_EXT}"
            jobs.append((str(out / rel), motion, i, frames, motion_frames, width, height, render, seed, fps))
            lines["val" if i >= clips_per_class - num_val else "train"].append(f"{rel} {label}")
    if workers > 0:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            done = pool.map(_render_one, jobs, chunksize=8)
            for _ in _progress(done, len(jobs), progress):
                pass
    else:
        for job in _progress(jobs, len(jobs), progress):
            _render_one(job)
    for split, entries in lines.items():
        (out / f"{split}.txt").write_text("".join(e + "\n" for e in entries))
    (out / "labels.txt").write_text("".join(c + "\n" for c in classes))
    meta = {"classes": classes, "clips_per_class": clips_per_class, "frames": frames,
            "motion_frames": motion_frames, "render_size": list(render), "width": width,
            "height": height, "seed": seed, "val_fraction": val_fraction, "fps": fps,
            "codec": f"{SYNTH_FOURCC} {SYNTH_EXT}", "train_clips": len(lines["train"]), "val_clips": len(lines["val"])}
    import json

    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _progress(items, total: int, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc="rendering", unit="clip", leave=False)
