"""Frame preprocessing matched to a model's config: short-side resize, centre crop, BGR->RGB, mean/std.

Runs once per processed frame, with OpenCV and numpy only (no torch), so the ONNX path needs no torch.
"""

from __future__ import annotations

import cv2
import numpy as np

from .errors import ConfigError


class Preprocessor:
    """BGR uint8 ``[H, W, 3]`` -> normalized float32 ``[3, S, S]`` RGB.

    Args:
        input_size: side S of the centre crop.
        resize_size: the short side is resized to this before cropping (>= input_size).
        mean, std: per-channel RGB normalization of values in [0, 1].
        crop: optional region ``(x, y, w, h)`` of the frame to look at (e.g. one door of a wide camera), applied
            before resizing.
    """

    def __init__(self, input_size: int, resize_size: int, mean, std,
                 crop: tuple[int, int, int, int] | None = None) -> None:
        if resize_size < input_size:
            raise ConfigError(f"resize_size must be >= input_size, got {resize_size} < {input_size}")
        if crop is not None and (len(crop) != 4 or min(crop[2:]) <= 0 or min(crop[:2]) < 0):
            raise ConfigError(f"crop must be (x, y, width, height) with positive size, got {crop}")
        self.input_size = input_size
        self.resize_size = resize_size
        self.crop = crop
        std = np.asarray(std, np.float32)
        # (rgb / 255 - mean) / std folded into one multiply-add per element; [3, 1, 1] to broadcast over [3, S, S].
        self._scale = (1.0 / (255.0 * std)).reshape(3, 1, 1)
        self._bias = (-np.asarray(mean, np.float32) / std).reshape(3, 1, 1)

    @classmethod
    def for_config(cls, cfg, crop=None) -> Preprocessor:
        return cls(cfg.input_size, cfg.resize_size, cfg.mean, cfg.std, crop=crop)

    def __call__(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Preprocess one frame, into ``out`` (a float32 ``[3, S, S]`` row of a batch) when given, so a batch is
        filled in place instead of stacked from copies."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a BGR uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
        if self.crop is not None:
            x, y, w, h = self.crop
            region = image[y : y + h, x : x + w]
            if region.shape[0] < 2 or region.shape[1] < 2:
                raise ConfigError(f"crop {self.crop} lies outside the {image.shape[1]}x{image.shape[0]} frame")
            image = region
        h, w = image.shape[:2]
        scale = self.resize_size / min(h, w)
        size = (max(self.input_size, round(w * scale)), max(self.input_size, round(h * scale)))
        if size != (w, h):
            # INTER_AREA when shrinking avoids aliasing of fine textures; LINEAR when enlarging.
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            image = cv2.resize(image, size, interpolation=interp)
        h, w = image.shape[:2]
        top, left = (h - self.input_size) // 2, (w - self.input_size) // 2
        crop = image[top : top + self.input_size, left : left + self.input_size]  # [S, S, 3] BGR
        # Reorder while still uint8 (a quarter of the bytes), then one multiply into the float output and one add:
        # 4x cheaper than converting [S, S, 3] to float first and transposing the floats.
        rgb = np.ascontiguousarray(crop.transpose(2, 0, 1)[::-1])  # [3, S, S] uint8, BGR -> RGB
        if out is None:
            out = np.empty(rgb.shape, np.float32)
        np.multiply(rgb, self._scale, out=out, casting="unsafe")
        out += self._bias
        return out
