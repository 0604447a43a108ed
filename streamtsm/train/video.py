"""Decoding the frames a sampler asks for: video files through OpenCV, frame folders file by file, in-memory clips
by indexing. Frames come out as BGR uint8 ``[T, H, W, 3]``."""

from __future__ import annotations

import os

import cv2
import numpy as np

from .annotations import FRAME_TEMPLATE, VideoRecord


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
