"""The shift operation itself, on tensors small enough to check by hand."""

import pytest
import torch

from streamtsm.models.shift import TemporalShift


def _clip(n=2, t=4, c=8, h=2, w=3):
    # value encodes (clip, frame, channel) so every move is visible
    x = torch.arange(n * t * c, dtype=torch.float32).view(n, t, c, 1, 1).expand(n, t, c, h, w).contiguous()
    return x, x.view(n * t, c, h, w)


def test_unidirectional_shift_moves_first_fold_from_previous_frame():
    x5, x = _clip()
    out = TemporalShift(4, fold=2, mode="unidirectional")(x).view_as(x5)
    assert torch.equal(out[:, 1:, :2], x5[:, :-1, :2])
    assert torch.equal(out[:, 0, :2], torch.zeros_like(out[:, 0, :2]))
    assert torch.equal(out[:, :, 2:], x5[:, :, 2:])


def test_bidirectional_shift_moves_two_folds_in_opposite_directions():
    x5, x = _clip()
    out = TemporalShift(4, fold=2, mode="bidirectional")(x).view_as(x5)
    assert torch.equal(out[:, :-1, :2], x5[:, 1:, :2])  # frame t takes t+1
    assert torch.equal(out[:, -1, :2], torch.zeros_like(out[:, -1, :2]))
    assert torch.equal(out[:, 1:, 2:4], x5[:, :-1, 2:4])  # frame t takes t-1
    assert torch.equal(out[:, 0, 2:4], torch.zeros_like(out[:, 0, 2:4]))
    assert torch.equal(out[:, :, 4:], x5[:, :, 4:])


def test_shift_step_replaces_fold_with_cache_and_returns_own_fold():
    shift = TemporalShift(1, fold=3, mode="unidirectional")
    x, cached = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 4, 4)
    out, new = shift.step(x, cached)
    assert torch.equal(out[:, :3], cached) and torch.equal(out[:, 3:], x[:, 3:])
    assert torch.equal(new, x[:, :3])


def test_shift_steps_reproduce_clip_shift():
    x5, x = _clip(n=1, t=5)
    clip_out = TemporalShift(5, fold=2, mode="unidirectional")(x)
    shift, cached = TemporalShift(1, fold=2, mode="unidirectional"), torch.zeros(1, 2, 2, 3)
    for t in range(5):
        out, cached = shift.step(x5[:, t], cached)
        assert torch.equal(out[0], clip_out[t])


def test_bidirectional_shift_has_no_step():
    with pytest.raises(RuntimeError, match="next frame"):
        TemporalShift(1, fold=1, mode="bidirectional").step(torch.zeros(1, 8, 1, 1), torch.zeros(1, 1, 1, 1))


def test_shift_rejects_clip_rows_not_multiple_of_segments():
    with pytest.raises(ValueError, match="T=4"):
        TemporalShift(4, fold=1)(torch.zeros(6, 8, 1, 1))
