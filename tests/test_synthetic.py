"""Synthetic motion scenes: determinism, label cycling, and that each motion moves the shape the way it says."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from streamtsm.errors import ConfigError
from streamtsm.synthetic import MOTIONS, MotionScene, clip_renderer, render_clip, render_clip_with_masks

W, H, T = 96, 80, 16


def _clip(motion: str, seed: int = 0, num_frames: int = T):
    return render_clip_with_masks(motion, num_frames, W, H, np.random.default_rng(seed))


def _centroids(masks: np.ndarray) -> np.ndarray:
    """[T, 2] (x, y) centroid of each mask."""
    out = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        out.append((xs.mean(), ys.mean()))
    return np.array(out)


def _orientation(mask: np.ndarray) -> float:
    """Angle of the mask's long axis in degrees, measured from +x towards +y (clockwise on screen)."""
    m = cv2.moments(mask.astype(np.uint8), binaryImage=True)
    return float(np.degrees(0.5 * np.arctan2(2 * m["mu11"], m["mu20"] - m["mu02"])))


def test_motions_are_the_label_order():
    assert MOTIONS == ("move_left", "move_right", "move_up", "move_down", "zoom_in", "zoom_out", "rotate_cw",
                       "rotate_ccw", "still")


def test_render_clip_shape_and_type():
    clip = render_clip("zoom_in", 8, 40, 30, np.random.default_rng(0))
    assert clip.shape == (8, 30, 40, 3) and clip.dtype == np.uint8


def test_render_clip_is_deterministic_given_the_generator_state():
    first = render_clip("rotate_cw", 6, 32, 32, np.random.default_rng(7))
    again = render_clip("rotate_cw", 6, 32, 32, np.random.default_rng(7))
    other = render_clip("rotate_cw", 6, 32, 32, np.random.default_rng(8))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_render_clip_middle_frame_is_the_same_for_every_motion():
    # Same random draws for every class: a single (middle) frame cannot tell the classes apart.
    middles = [_clip(motion, seed=3, num_frames=9)[0][4] for motion in MOTIONS]
    assert all(np.array_equal(middles[0], middle) for middle in middles[1:])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("motion, axis, sign", [("move_left", 0, -1), ("move_right", 0, 1), ("move_up", 1, -1),
                                                ("move_down", 1, 1)])
def test_render_clip_moves_shape_in_the_named_direction(motion, axis, sign, seed):
    frames, masks = _clip(motion, seed)
    steps = np.diff(_centroids(masks)[:, axis]) * sign
    assert steps.sum() > 0.15 * (W if axis == 0 else H)
    assert np.mean(steps > 0) > 0.8
    # The pixels move, not only the mask: the frames differ where the shape is.
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 2


@pytest.mark.parametrize("seed", range(4))
def test_render_clip_zoom_changes_apparent_size(seed):
    _, grow = _clip("zoom_in", seed)
    _, shrink = _clip("zoom_out", seed)
    grow_area, shrink_area = grow.sum(axis=(1, 2)), shrink.sum(axis=(1, 2))
    assert grow_area[-1] > 1.5 * grow_area[0] and np.all(np.diff(grow_area) >= 0)
    assert shrink_area[0] > 1.5 * shrink_area[-1] and np.all(np.diff(shrink_area) <= 0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("motion, sign", [("rotate_cw", 1), ("rotate_ccw", -1)])
def test_render_clip_rotation_turns_the_named_way(motion, sign, seed):
    _, masks = _clip(motion, seed)
    angles = np.array([_orientation(mask) for mask in masks])
    steps = (np.diff(angles) + 90) % 180 - 90  # the long axis is only defined modulo 180 degrees
    assert steps.sum() * sign > 45
    assert np.mean(steps * sign > 0) > 0.8


@pytest.mark.parametrize("seed", range(3))
def test_render_clip_still_does_not_move(seed):
    frames, masks = _clip("still", seed)
    assert all(np.array_equal(masks[0], mask) for mask in masks[1:])
    assert not np.array_equal(frames[0], frames[1])  # sensor noise still changes from frame to frame


def test_render_clip_rejects_unknown_motion_and_bad_sizes():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="motion must be one of"):
        render_clip("jump", 4, 32, 32, rng)
    with pytest.raises(ConfigError, match="at least 8x8"):
        render_clip("still", 4, 4, 32, rng)
    with pytest.raises(ConfigError, match="num_frames"):
        render_clip("still", 0, 32, 32, rng)


def test_motion_scene_is_deterministic_by_seed_and_stateless():
    scene = MotionScene(64, 48, seed=5, segment_frames=10)
    later, earlier = scene.render(123), scene.render(7)
    fresh = MotionScene(64, 48, seed=5, segment_frames=10)
    assert np.array_equal(fresh.render(7), earlier) and np.array_equal(fresh.render(123), later)
    assert not np.array_equal(MotionScene(64, 48, seed=6, segment_frames=10).render(7), earlier)
    assert earlier.shape == (48, 64, 3) and earlier.dtype == np.uint8


def test_motion_scene_cycles_through_every_motion():
    scene = MotionScene(32, 32, seed=1, segment_frames=4)
    labels = [scene.motion_at(t) for t in range(4 * len(MOTIONS) * 2)]
    segments = [labels[i:i + 4] for i in range(0, len(labels), 4)]
    assert all(len(set(segment)) == 1 for segment in segments)
    cycle = [segment[0] for segment in segments[:len(MOTIONS)]]
    assert sorted(cycle) == sorted(MOTIONS)
    assert [segment[0] for segment in segments[len(MOTIONS):]] == cycle
    orders = {MotionScene(32, 32, seed=s).order for s in range(5)}
    assert len(orders) > 1


def test_motion_scene_frames_follow_their_label():
    scene = MotionScene(96, 80, seed=2, segment_frames=12)
    segment = scene.order.index("move_right")
    start = segment * scene.segment_frames
    masks = np.array([scene.render_with_mask(t)[1] for t in range(start, start + scene.segment_frames)])
    assert scene.motion_at(start) == "move_right"
    assert np.all(np.diff(_centroids(masks)[:, 0]) > 0)


def test_motion_scene_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        MotionScene(4, 4)
    with pytest.raises(ConfigError):
        MotionScene(32, 32, seed=-1)
    with pytest.raises(ConfigError):
        MotionScene(32, 32, segment_frames=1)


def test_render_clip_background_contrast_scales_the_clutter_and_is_checked():
    # The same draws at three contrasts: the still shape's frame differs only in how far the clutter strays from its
    # mean colour, so the spread grows with the contrast and 0 leaves a flat background (grain included).
    spread = []
    for contrast in (0.0, 0.25, 1.0):
        frames, masks = render_clip_with_masks("still", 2, 48, 48, np.random.default_rng(3), contrast)
        background = frames[0][~masks[0]].astype(np.float32)
        spread.append(float(background.std(axis=0).mean()))
    assert spread[0] < spread[1] < spread[2]
    assert spread[2] > 2 * spread[1]
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="background contrast"):
            render_clip("still", 2, 32, 32, np.random.default_rng(0), bad)


def _whole_frame(renderer, t: int, offset: tuple[int, int]) -> np.ndarray:
    """Frame t blended over the whole frame, the reference for the renderer's blend inside the shape's footprint."""
    layer, background = renderer.layer(t), renderer.background
    height, width = background.shape[:2]
    blended = background + layer[..., 3:] * (layer[..., :3] - background)
    noise = renderer.noise[offset[0]:offset[0] + height, offset[1]:offset[1] + width]
    return np.clip(blended * renderer.gain + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("width", "height", "seed"), [(64, 48, 0), (97, 131, 1), (320, 240, 2)])
def test_frames_blended_only_where_the_shape_lies_equal_a_whole_frame_blend_bit_for_bit(width, height, seed):
    # The demo model was trained on these frames: blending inside the footprint only must change no pixel. Clips
    # (gain != 1) and a scene's segments (gain 1); moves and zooms take the shape partly out of the frame.
    rng = np.random.default_rng(seed)
    renderers = [clip_renderer(m, 16, width, height, rng) for m in ("move_left", "zoom_in", "rotate_cw")]
    scene = MotionScene(width, height, seed=seed, segment_frames=16)
    renderers += [scene.segment_renderer(k) for k in range(len(MOTIONS))]
    assert any(r.gain != 1.0 for r in renderers) and any(r.gain == 1.0 for r in renderers)
    for renderer in renderers:
        for t in range(16):
            for offset in ((0, 0), (3, 8)):
                frame, mask = renderer.render(t, offset)
                assert np.array_equal(frame, _whole_frame(renderer, t, offset)), (renderer.motion, t, offset)
                assert np.array_equal(mask, renderer.layer(t)[..., 3] > 0.5)
    # A shape wholly outside the frame: an empty footprint, the background and noise alone.
    far = dataclasses.replace(renderers[0], path=dataclasses.replace(renderers[0].path, center=(-500.0, 900.0)))
    frame, mask = far.render(3, (1, 1))
    assert np.array_equal(frame, _whole_frame(far, 3, (1, 1))) and not mask.any()


def test_motion_scene_render_is_the_frame_of_render_with_mask():
    scene = MotionScene(80, 60, seed=4, segment_frames=6)
    for t in (0, 5, 6, 31):
        assert np.array_equal(scene.render(t), scene.render_with_mask(t)[0])
    with pytest.raises(ValueError, match=">= 0"):
        scene.render(-1)
