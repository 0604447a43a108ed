"""The central property: the online step model, fed frame by frame, gives at every frame the output of the offline
uni-directional model run on the whole clip (per-frame output, no consensus), streams reset at any time."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtsm.models import create

from .conftest import randomize_, scaled_diff

TOL = 1e-4  # in units of max(1, max |offline logit|): see conftest.scaled_diff; exact in float64 (1e-9)
SIZE = 32


TINY = {
    "tsm_mobilenetv2_online": {"width_mult": 0.25},
    "tsm_r50_online": {"width": 8},
    "tsm_r18_block": {"width": 8},
}


def _build(name: str, num_segments: int):
    torch.manual_seed(0)  # the same weights whatever ran before (the cache fills in test order)
    if name == "tsm_r18_block":
        return create("tsm_r18", num_classes=7, num_segments=num_segments, shift_mode="unidirectional",
                      shift_place="block", width=8)
    return create(name, num_classes=7, num_segments=num_segments, **TINY[name])


@functools.lru_cache(maxsize=None)
def _online(name: str, dtype: torch.dtype):
    # BN statistics measured on 8-frame clips, so the cached folds carry the activations they were normalized
    # for; the step form does not read num_segments, so this model also serves online.
    if dtype != torch.float32:
        return copy.deepcopy(_online(name, torch.float32)).to(dtype)  # .to() is in place
    return randomize_(_build(name, 8), seed=1)


@functools.lru_cache(maxsize=None)
def _offline(name: str, num_segments: int, dtype: torch.dtype):
    model = _build(name, num_segments)
    model.load_state_dict(_online(name, torch.float32).state_dict())
    return model.to(dtype)


def _expected(name: str, clip: torch.Tensor, resets: list[int]) -> torch.Tensor:
    """Offline per-frame logits [B, T, K] where each stream restarts at its reset step."""
    b, t = clip.shape[:2]
    out = torch.empty(b, t, 7, dtype=clip.dtype)
    for i in range(b):
        start = resets[i] if resets[i] is not None else 0
        with torch.no_grad():
            if start > 0:
                out[i, :start] = _offline(name, start, clip.dtype)(clip[i : i + 1, :start], per_frame=True)[0]
            out[i, start:] = _offline(name, t - start, clip.dtype)(clip[i : i + 1, start:], per_frame=True)[0]
    return out


def _run_online(name: str, clip: torch.Tensor, resets: list[int | None]) -> torch.Tensor:
    model = _online(name, clip.dtype)
    b, t = clip.shape[:2]
    state = model.init_state(b, SIZE, SIZE)
    outs = []
    with torch.no_grad():
        for step in range(t):
            due = [i for i, r in enumerate(resets) if r == step]
            if due:
                state = model.reset_state(state, due)
            logits, state = model.step(clip[:, step], state)
            outs.append(logits)
    return torch.stack(outs, 1)


def _compare(name: str, frames: int, dtype: torch.dtype) -> tuple[float, float]:
    """(max abs difference, max abs logit) over 3 streams: one never reset, two reset at different steps."""
    clip = torch.randn(3, frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(frames)).to(dtype)
    resets = [None, frames // 2 if frames > 1 else None, frames - 1 if frames > 2 else None]
    online = _run_online(name, clip, resets)
    expected = _expected(name, clip, resets)
    assert online.abs().max() > 0.1, "logits too small for the comparison to mean anything"
    return (online - expected).abs().max().item(), expected.abs().max().item()


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("frames", [1, 8, 33])
def test_online_step_equals_offline_unidirectional_per_frame_exactly_in_float64(name, frames):
    # In float64 rounding is ~1e-15, so any difference left is the model's, not the arithmetic's.
    diff, _ = _compare(name, frames, torch.float64)
    assert diff <= 1e-9


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("frames", [1, 8, 33])
def test_online_step_equals_offline_unidirectional_per_frame_within_1e4_in_float32(name, frames):
    diff, scale = _compare(name, frames, torch.float32)
    assert diff <= TOL * max(1.0, scale), f"max abs difference {diff:.2e} on logits up to {scale:.2f}"


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_online_equals_offline_for_random_lengths_batches_and_resets(data):
    frames = data.draw(st.integers(1, 12), label="T")
    batch = data.draw(st.integers(1, 3), label="batch")
    resets = data.draw(st.lists(st.one_of(st.none(), st.integers(0, frames - 1)), min_size=batch,
                                max_size=batch), label="resets")
    clip = torch.randn(batch, frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(frames * 7 + batch))
    online = _run_online("tsm_mobilenetv2_online", clip, resets)
    expected = _expected("tsm_mobilenetv2_online", clip, resets)
    assert scaled_diff(online, expected) <= TOL


def test_online_differs_from_per_frame_cnn_so_the_state_matters():
    # Guard against a vacuous pass: without the cached folds (state reset every step) the output must change.
    clip = torch.randn(1, 6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with_state = _run_online("tsm_mobilenetv2_online", clip, [None])
    without = _run_online("tsm_mobilenetv2_online", clip, [None])
    model = _online("tsm_mobilenetv2_online", torch.float32)
    with torch.no_grad():
        fresh = torch.stack([model.step(clip[:, t], None)[0] for t in range(6)], 1)
    assert torch.allclose(with_state, without)
    assert (with_state[:, 1:] - fresh[:, 1:]).abs().max() > 1e-3


def test_step_without_state_starts_from_zeros():
    model = _online("tsm_mobilenetv2_online", torch.float32)
    frame = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, sa = model.step(frame, None)
        b, sb = model.step(frame, model.init_state(2, SIZE, SIZE))
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(sa, sb))


def test_state_shapes_match_step_output_and_official_layout():
    model = create("tsm_mobilenetv2_online")
    shapes = model.state_shapes(224, 224)
    # The official online demo caches 10 folds: 3@56, 4@28 x2, 8@14 x3, 12@14 x2, 20@7 x2.
    assert shapes == [(3, 56, 56), (4, 28, 28), (4, 28, 28), (8, 14, 14), (8, 14, 14), (8, 14, 14),
                      (12, 14, 14), (12, 14, 14), (20, 7, 7), (20, 7, 7)]


def test_reset_state_zeroes_only_chosen_streams():
    model = _online("tsm_mobilenetv2_online", torch.float32)
    state = tuple(torch.ones(3, *s) for s in model.state_shapes(SIZE, SIZE))
    reset = model.reset_state(state, [1])
    assert all(r[1].abs().sum() == 0 and torch.equal(r[0], s[0]) and torch.equal(r[2], s[2])
               for r, s in zip(reset, state))
    assert all(s.abs().sum() > 0 for s in state), "reset must not modify its input"
