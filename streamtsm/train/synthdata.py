"""The synthetic motion dataset: renders :func:`streamtsm.synthetic.render_clip` scenes into MJPG videos with
annotation lists and a label file (``streamtsm synth``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ..errors import ConfigError


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
                      motion_frames: int | None = None, render: tuple[int, int] | None = None,
                      background_contrast: float | None = None) -> np.ndarray:
    """Scene ``scene``'s clip of ``motion``, as ``streamtsm synth`` writes it: [frames, H, W, 3] uint8 BGR.

    ``size`` and ``render`` are (width, height). ``motion_frames`` (default ``frames``) spreads the motion over
    more frames than the clip keeps; ``render`` (default ``size``) draws larger frames and shrinks them to ``size``
    with INTER_AREA. ``background_contrast`` (default: the synthetic scene's quarter) sets the clutter's contrast.
    """
    from ..synthetic import BACKGROUND_CONTRAST, render_clip

    motion_frames = motion_frames or frames
    render = render or size
    contrast = BACKGROUND_CONTRAST if background_contrast is None else background_contrast
    clip = render_clip(motion, motion_frames, render[0], render[1], scene_rng(seed, scene), contrast)
    if motion_frames > frames:
        # The same window for every motion of the scene (its own generator: the scene's draws stay the same).
        start = int(np.random.default_rng([seed, scene, 1]).integers(0, motion_frames - frames + 1))
        clip = clip[start : start + frames]
    if tuple(render) != tuple(size):
        clip = np.stack([cv2.resize(f, tuple(size), interpolation=cv2.INTER_AREA) for f in clip])
    return clip


def _render_one(job: tuple) -> str:
    path, motion, index, frames, motion_frames, width, height, render, seed, fps, contrast = job
    clip = render_scene_clip(motion, index, frames=frames, size=(width, height), seed=seed,
                             motion_frames=motion_frames, render=render, background_contrast=contrast)
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
                            workers: int = 0, progress: bool = False,
                            background_contrast: float | None = None) -> dict:
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
    noise as the live frames have after preprocessing. ``background_contrast`` (default: the live scene's quarter,
    ``synthetic.BACKGROUND_CONTRAST``; 1: busy, high-contrast clutter) sets how strongly the background competes
    with the moving shape.

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
    from ..synthetic import BACKGROUND_CONTRAST

    contrast = BACKGROUND_CONTRAST if background_contrast is None else float(background_contrast)
    if not 0.0 <= contrast <= 1.0:
        raise ConfigError(f"background contrast must be within [0, 1], got {background_contrast}")
    out = Path(out)
    num_val = round(clips_per_class * val_fraction)
    jobs, lines = [], {"train": [], "val": []}
    for label, motion in enumerate(classes):
        (out / "videos" / motion).mkdir(parents=True, exist_ok=True)
        for i in range(clips_per_class):
            rel = f"videos/{motion}/scene_{i:04d}{SYNTH_EXT}"
            jobs.append((str(out / rel), motion, i, frames, motion_frames, width, height, render, seed, fps,
                         contrast))
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
            "background_contrast": contrast,
            "codec": f"{SYNTH_FOURCC} {SYNTH_EXT}", "train_clips": len(lines["train"]), "val_clips": len(lines["val"])}
    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _progress(items, total: int, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc="rendering", unit="clip", leave=False)
