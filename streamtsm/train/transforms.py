"""Clip transforms: a clip comes in as BGR uint8 ``[T, H, W, 3]`` and leaves as the normalized float ``[T, 3, S, S]``
RGB the models take. Training draws one multi-scale crop (and optionally a flip) per clip; testing takes the live
pipeline's centre crop, or three crops. Everything is OpenCV and numpy (no torchvision)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from ..errors import ConfigError
from ..preprocess import Preprocessor

MULTI_SCALES = (1.0, 0.875, 0.75, 0.66)


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
    """Label pairs a horizontal flip turns into each other, found by name: ``*left*``/``*right*``,
    ``*_cw``/``*_ccw``."""
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
