"""tools/bench_tsm_step.py --onnx measures other graph forms of the online shift: each must compute what the
library's step computes, or the comparison means nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from streamtsm.models.shift import ShiftableBlock, TemporalShift

from .test_onnx_export import SIZE, tiny_online

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_tsm_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


FORMS = [bench_tsm_step.step_identity_convs, bench_tsm_step.step_split_first_conv, bench_tsm_step.step_masks,
         bench_tsm_step.step_split_hardsigmoid]


@pytest.mark.parametrize("form", FORMS, ids=["identity_convs", "split_first_conv", "masks", "split_hardsigmoid"])
def test_bench_tsm_step_shift_forms_equal_the_library_step(form):
    model = tiny_online(seed=2).eval()
    frames = torch.randn(3, 2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        state = ours = None
        for t in range(3):  # past the first step, so the cached folds are not zeros
            logits, state = model.step(frames[t], state)
            with bench_tsm_step.shift_form(form):
                mine, ours = model.step(frames[t], ours)
            assert torch.allclose(mine, logits, rtol=0, atol=1e-4 * max(1.0, logits.abs().max().item()))
            assert all(torch.allclose(a, b, rtol=0, atol=1e-4) for a, b in zip(ours, state))


def test_bench_tsm_step_shift_form_restores_the_library_step():
    originals = ShiftableBlock.step, TemporalShift.step
    for form in FORMS:
        with pytest.raises(RuntimeError), bench_tsm_step.shift_form(form):
            assert (ShiftableBlock.step, TemporalShift.step) != originals
            raise RuntimeError("export failed")
        assert (ShiftableBlock.step, TemporalShift.step) == originals
