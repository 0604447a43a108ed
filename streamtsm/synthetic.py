"""Deterministic synthetic motion scenes: a textured shape moving over a cluttered, noisy background.

Used as a camera stand-in (``SyntheticSource``) and to make a training set whose classes only temporal order can
tell apart: every motion starts from the same distribution of looks, positions, sizes and angles, so a single frame
says (almost) nothing about the class, while the sequence does.

Two entry points:

- ``MotionScene(width, height, seed)``: an endless scene that cycles through ``MOTIONS`` in a seed-determined
  order, ``segment_frames`` frames each; ``render(t)`` renders any frame directly (no hidden state).
- ``render_clip(motion, num_frames, width, height, rng)``: one short clip of one motion, all random choices drawn
  from ``rng``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from streamtsm.errors import ConfigError

MOTIONS = ("move_left", "move_right", "move_up", "move_down", "zoom_in", "zoom_out", "rotate_cw", "rotate_ccw",
           "still")

_SPRITE_PX = 64  # resolution the shapes are drawn at before being warped into the frame
_NOISE_PAD = 8  # the noise tile is this much larger than the frame; each frame takes a random crop of it
_NOISE_SIGMA = 6.0
# The background's clutter is kept at this fraction of the contrast it is drawn with, around its mean colour, as
# behind a subject in focus. At full contrast the clutter's edges outnumber the moving shape's, and a small network
# trained from scratch then takes many times longer to find the turn direction, whose only cue is where the shape's
# own edges sit relative to how they move (measured: see tests/test_train_temporal.py).
BACKGROUND_CONTRAST = 0.25  # the default: clutter at a quarter of its drawn contrast (see render_clip_with_masks)


@dataclass(frozen=True)
class _Sprite:
    """A textured shape: colour and coverage stacked as one 4-channel image so a single warp moves both."""

    rgba: np.ndarray  # [S, S, 4] float32: B, G, R, alpha in [0, 1]


@dataclass(frozen=True)
class _Path:
    """Where the shape is at the middle of a clip and how far the motion takes it over the whole clip."""

    center: tuple[float, float]  # (x, y) in pixels at the middle of the clip
    size: float  # length of the shape's long side in pixels at the middle of the clip
    angle: float  # orientation in degrees, clockwise on screen, at the middle of the clip
    travel: float  # fraction of the frame width (or height) covered by a move over the whole clip
    zoom: float  # ratio of last to first size for zoom_in (its inverse for zoom_out)
    turn: float  # degrees turned over the whole clip by a rotation


def _check_size(width: int, height: int) -> None:
    if width < 8 or height < 8:
        raise ConfigError(f"synthetic frames must be at least 8x8 pixels, got {width}x{height}")


def _check_motion(motion: str) -> None:
    if motion not in MOTIONS:
        raise ConfigError(f"motion must be one of {', '.join(MOTIONS)}, got {motion!r}")


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    first = rng.uniform(0, 255, 3)
    # The complement keeps the two colours of a texture far apart whatever the first one is.
    second = np.clip(255 - first + rng.normal(0, 25, 3), 0, 255)
    return first.astype(np.float32), second.astype(np.float32)


def _make_sprite(rng: np.random.Generator) -> _Sprite:
    """Draws an elongated shape (ellipse, rectangle or polygon) with a striped or checkered texture.

    Every shape is elongated (aspect 1.4 to 2) so that its orientation, and hence a rotation, is visible from the
    silhouette alone, not only from the texture.
    """
    s = _SPRITE_PX
    aspect = rng.uniform(1.4, 2.0)
    mask = np.zeros((s, s), np.uint8)
    half_long, half_short = 0.48 * s, 0.48 * s / aspect
    centre = (s - 1) / 2
    kind = rng.integers(3)
    if kind == 0:
        cv2.ellipse(mask, (round(centre), round(centre)), (round(half_long), round(half_short)), 0, 0, 360, 255,
                    -1, cv2.LINE_AA)
    else:
        sides = 4 if kind == 1 else int(rng.integers(3, 7))
        phase = math.pi / 4 if kind == 1 else rng.uniform(0, 2 * math.pi)
        theta = phase + 2 * math.pi * np.arange(sides) / sides
        points = np.stack([centre + half_long * np.cos(theta) * math.sqrt(2) ** (kind == 1),
                           centre + half_short * np.sin(theta) * math.sqrt(2) ** (kind == 1)], axis=1)
        points = np.clip(points, 0, s - 1)
        cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)

    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    phi = rng.uniform(0, math.pi)
    period = rng.uniform(6, 16)
    u = xx * math.cos(phi) + yy * math.sin(phi)
    if rng.integers(2) == 0:
        pattern = np.sin(2 * math.pi * u / period) > 0
    else:
        v = -xx * math.sin(phi) + yy * math.cos(phi)
        pattern = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    first, second = _colour_pair(rng)
    colour = np.where(pattern[..., None], first, second)
    colour += rng.normal(0, 6, colour.shape).astype(np.float32)
    rgba = np.dstack([colour, mask.astype(np.float32) / 255]).astype(np.float32)
    return _Sprite(rgba)


def _sprite_matrix(center: tuple[float, float], size: float, angle: float) -> np.ndarray:
    """The 2x3 affine map from sprite pixels to frame pixels."""
    s = _SPRITE_PX
    # cv2 angles are counter-clockwise on screen; ours are clockwise.
    matrix = cv2.getRotationMatrix2D(((s - 1) / 2, (s - 1) / 2), -angle, size / s)
    matrix[0, 2] += center[0] - (s - 1) / 2
    matrix[1, 2] += center[1] - (s - 1) / 2
    return matrix


def _warp(sprite: _Sprite, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """The sprite placed in a width x height frame by ``matrix``: [H, W, 4] with colour and alpha."""
    return cv2.warpAffine(sprite.rgba, matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))


def _footprint(matrix: np.ndarray, width: int, height: int) -> tuple[slice, slice]:
    """Rows and columns of the frame outside which a warp by ``matrix`` leaves only zeros (a 2-pixel margin
    covers the bilinear taps of the sprite's edge)."""
    s = _SPRITE_PX
    corners = matrix @ np.array([[-1, s, -1, s], [-1, -1, s, s], [1, 1, 1, 1]], np.float64)  # [2, 4] (x, y)
    x0, x1 = max(0, math.floor(corners[0].min()) - 2), min(width, math.ceil(corners[0].max()) + 3)
    y0, y1 = max(0, math.floor(corners[1].min()) - 2), min(height, math.ceil(corners[1].max()) + 3)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _blend(canvas: np.ndarray, layer: np.ndarray) -> np.ndarray:
    alpha = layer[..., 3:]
    return canvas + alpha * (layer[..., :3] - canvas)


def _make_background(width: int, height: int, rng: np.random.Generator,
                     contrast: float = BACKGROUND_CONTRAST) -> np.ndarray:
    """Smooth colour blobs, random lines and rectangles, a few static textured shapes and fixed grain, all at
    ``contrast`` of their drawn contrast."""
    grid = rng.uniform(20, 235, (int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3)).astype(np.float32)
    background = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    scale = min(width, height)
    for _ in range(int(rng.integers(3, 9))):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        p1 = (int(rng.integers(width)), int(rng.integers(height)))
        p2 = (int(rng.integers(width)), int(rng.integers(height)))
        thickness = int(rng.integers(1, max(2, scale // 30)))
        if rng.integers(2) == 0:
            cv2.line(background, p1, p2, colour, thickness, cv2.LINE_AA)
        else:
            cv2.rectangle(background, p1, p2, colour, thickness, cv2.LINE_AA)
    # Static distractors that look like the moving shape, so that "a shape is present" tells nothing.
    for _ in range(int(rng.integers(1, 3))):
        sprite = _make_sprite(rng)
        matrix = _sprite_matrix((rng.uniform(0, width), rng.uniform(0, height)), rng.uniform(0.1, 0.25) * scale,
                                rng.uniform(0, 360))
        layer = _warp(sprite, matrix, width, height)
        background = _blend(background, layer)
    background += rng.normal(0, 5, background.shape).astype(np.float32)
    background = np.clip(background, 0, 255)
    mean = background.mean(axis=(0, 1), keepdims=True)
    return mean + np.float32(contrast) * (background - mean)


def _make_path(width: int, height: int, rng: np.random.Generator) -> _Path:
    # The same distributions for every motion: the class must not be guessable from where the shape sits.
    # Motions are large per segment so that a model stepped every few frames of a 2 s segment still sees them from
    # one step to the next; a turn stays under 45 degrees per frame even in an 8-frame clip, so a checkered texture
    # (4-fold symmetric) never appears to turn the other way. Shapes span 0.4-0.6 of the short side so that a turn
    # moves their ends by several pixels a frame even at 64x64.
    return _Path(center=(rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height),
                 size=rng.uniform(0.4, 0.6) * min(width, height),
                 angle=rng.uniform(0, 360),
                 travel=rng.uniform(0.35, 0.55),
                 zoom=rng.uniform(1.8, 2.6),
                 turn=rng.uniform(180, 300))


def _pose(motion: str, t: int, num_frames: int, path: _Path, width: int,
          height: int) -> tuple[tuple[float, float], float, float]:
    """Center, size and angle of the shape at frame t of a num_frames clip (the path is centred on the clip)."""
    u = t / (num_frames - 1) - 0.5 if num_frames > 1 else 0.0  # -0.5 at the first frame, +0.5 at the last
    (x, y), size, angle = path.center, path.size, path.angle
    if motion == "move_left":
        x -= u * path.travel * width
    elif motion == "move_right":
        x += u * path.travel * width
    elif motion == "move_up":
        y -= u * path.travel * height
    elif motion == "move_down":
        y += u * path.travel * height
    elif motion == "zoom_in":
        size *= path.zoom ** u
    elif motion == "zoom_out":
        size *= path.zoom ** -u
    elif motion == "rotate_cw":
        angle += u * path.turn
    elif motion == "rotate_ccw":
        angle -= u * path.turn
    return (x, y), size, angle


@dataclass(frozen=True, eq=False)
class ClipRenderer:
    """Renders the frames of one motion over a fixed background; frame t depends only on (inputs, t).

    Made by :func:`clip_renderer` (one clip of one motion) and :meth:`MotionScene.segment_renderer`.
    """

    motion: str
    num_frames: int
    background: np.ndarray  # [H, W, 3] float32
    noise: np.ndarray  # [H + pad, W + pad, 3] float32, cropped at a per-frame offset
    sprite: _Sprite
    path: _Path
    gain: float

    def _matrix(self, t: int) -> np.ndarray:
        height, width = self.background.shape[:2]
        return _sprite_matrix(*_pose(self.motion, t, self.num_frames, self.path, width, height))

    def layer(self, t: int) -> np.ndarray:
        """The moving shape of frame t placed in the frame: [H, W, 4] float32, B, G, R and alpha in [0, 1]."""
        height, width = self.background.shape[:2]
        return _warp(self.sprite, self._matrix(t), width, height)

    def render(self, t: int, noise_offset: tuple[int, int], with_mask: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Returns (BGR uint8 [H, W, 3] frame, bool [H, W] mask of the moving shape, or None without
        ``with_mask``) for frame t."""
        height, width = self.background.shape[:2]
        matrix = self._matrix(t)
        layer = _warp(self.sprite, matrix, width, height)
        dy, dx = noise_offset
        # Fresh-looking sensor noise on every frame without drawing a full noise image per frame.
        noise = self.noise[dy:dy + height, dx:dx + width]
        # The shape is blended only where the warp put it: elsewhere its layer is zero and the blend would give
        # the background back exactly, so the frame is the same, bit for bit, as blending the whole frame (tested),
        # at a fraction of the cost (a live synthetic camera renders on the cores the model runs on).
        image = (self.background * self.gain if self.gain != 1.0 else self.background) + noise
        rows, cols = _footprint(matrix, width, height)
        blended = _blend(self.background[rows, cols], layer[rows, cols])
        if self.gain != 1.0:
            blended *= np.float32(self.gain)
        image[rows, cols] = blended + noise[rows, cols]
        np.clip(image, 0, 255, out=image)
        return image.astype(np.uint8), (layer[..., 3] > 0.5) if with_mask else None


def _make_noise(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    shape = (height + _NOISE_PAD, width + _NOISE_PAD, 3)
    return rng.normal(0, _NOISE_SIGMA, shape).astype(np.float32)


def clip_renderer(motion: str, num_frames: int, width: int, height: int, rng: np.random.Generator,
                  background_contrast: float = BACKGROUND_CONTRAST) -> ClipRenderer:
    """The renderer of one clip of one motion, every random choice but the per-frame noise crops drawn from ``rng``
    (see :func:`render_clip_with_masks`, which draws those next)."""
    _check_motion(motion)
    _check_size(width, height)
    if num_frames < 1:
        raise ConfigError(f"num_frames must be >= 1, got {num_frames}")
    if not 0.0 <= background_contrast <= 1.0:
        raise ConfigError(f"background contrast must be within [0, 1], got {background_contrast}")
    background = _make_background(width, height, rng, background_contrast)
    return ClipRenderer(motion, num_frames, background, _make_noise(width, height, rng), _make_sprite(rng),
                        _make_path(width, height, rng), gain=rng.uniform(0.75, 1.15))


def render_clip_with_masks(motion: str, num_frames: int, width: int, height: int, rng: np.random.Generator,
                           background_contrast: float = BACKGROUND_CONTRAST) -> tuple[np.ndarray, np.ndarray]:
    """Renders one clip of one motion and the mask of the moving shape in every frame.

    Args:
        motion: One of ``MOTIONS``.
        num_frames: Number of frames T (>= 1); the whole motion spans the clip.
        width: Frame width W in pixels (>= 8).
        height: Frame height H in pixels (>= 8).
        rng: Source of every random choice (background, shape, texture, colours, position, speed, noise).
        background_contrast: the background clutter's contrast, as a fraction of its drawn contrast (0: a flat
            colour, 1: full, busy clutter). At the default quarter a small network trained from scratch learns the
            turn direction; at 1 its edges drown the moving shape's (see the README's training section).

    Returns:
        ``(frames, masks)``: frames is [T, H, W, 3] uint8 BGR, masks is [T, H, W] bool, True on the moving shape.

    Raises:
        ConfigError: If the motion is unknown or the size is too small.
    """
    renderer = clip_renderer(motion, num_frames, width, height, rng, background_contrast)
    offsets = rng.integers(0, _NOISE_PAD + 1, (num_frames, 2))
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    masks = np.empty((num_frames, height, width), bool)
    for t in range(num_frames):
        frames[t], masks[t] = renderer.render(t, (int(offsets[t, 0]), int(offsets[t, 1])))
    return frames, masks


def render_clip(motion: str, num_frames: int, width: int, height: int, rng: np.random.Generator,
                background_contrast: float = BACKGROUND_CONTRAST) -> np.ndarray:
    """Renders one clip of one motion; see ``render_clip_with_masks``.

    Returns:
        [T, H, W, 3] uint8 BGR frames.
    """
    return render_clip_with_masks(motion, num_frames, width, height, rng, background_contrast)[0]


class MotionScene:
    """An endless, deterministic scene cycling through ``MOTIONS``.

    The background is fixed by the seed (like a static camera); every segment of ``segment_frames`` frames gets a
    new shape, texture, colours and path, and one motion. The order of motions is a seed-determined permutation of
    ``MOTIONS``, repeated. ``render(t)`` depends only on (seed, size, segment_frames, t).

    Args:
        width: Frame width in pixels (>= 8).
        height: Frame height in pixels (>= 8).
        seed: Non-negative seed.
        segment_frames: Frames each motion is held (>= 2).

    Raises:
        ConfigError: If the size, seed or segment length is not valid.
    """

    def __init__(self, width: int, height: int, seed: int = 0, segment_frames: int = 60):
        _check_size(width, height)
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        if segment_frames < 2:
            raise ConfigError(f"segment_frames must be >= 2, got {segment_frames}")
        self.width = width
        self.height = height
        self.seed = seed
        self.segment_frames = segment_frames
        rng = np.random.default_rng([seed, 0])
        self.order = tuple(MOTIONS[i] for i in rng.permutation(len(MOTIONS)))
        self._background = _make_background(width, height, rng)
        self._noise = _make_noise(width, height, rng)
        # A cache, not state: a segment's renderer is a pure function of (seed, segment).
        self._cached: tuple[int, ClipRenderer] | None = None

    def motion_at(self, t: int) -> str:
        """The ground-truth motion label of frame t."""
        return self.order[(t // self.segment_frames) % len(self.order)]

    def segment_renderer(self, segment: int) -> ClipRenderer:
        """The renderer of segment ``segment`` (frames ``segment * segment_frames`` on)."""
        cached = self._cached
        if cached is not None and cached[0] == segment:
            return cached[1]
        rng = np.random.default_rng([self.seed, 1, segment])
        renderer = ClipRenderer(self.motion_at(segment * self.segment_frames), self.segment_frames,
                                 self._background, self._noise, _make_sprite(rng),
                                 _make_path(self.width, self.height, rng), gain=1.0)
        self._cached = (segment, renderer)
        return renderer

    def _render(self, t: int, with_mask: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if t < 0:
            raise ValueError(f"frame index must be >= 0, got {t}")
        segment, local = divmod(t, self.segment_frames)
        offset = np.random.default_rng([self.seed, 2, t]).integers(0, _NOISE_PAD + 1, 2)
        return self.segment_renderer(segment).render(local, (int(offset[0]), int(offset[1])), with_mask)

    def render_with_mask(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame t as BGR uint8 [H, W, 3] and the bool [H, W] mask of the moving shape."""
        return self._render(t, with_mask=True)

    def render(self, t: int) -> np.ndarray:
        """Frame t as BGR uint8 [H, W, 3]."""
        return self._render(t, with_mask=False)[0]
