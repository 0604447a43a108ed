"""Shared test helpers: tiny models with non-trivial weights, and the real clips in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# One intra-op thread: the tests run capture threads beside the model, and with every core given to torch a
# step can get many times slower when anything else is running (see streamtsm.engine.factory.default_threads).
torch.set_num_threads(1)


def randomize_(model: nn.Module, seed: int = 0, calibration: torch.Tensor | None = None) -> nn.Module:
    """Give BN affine parameters and the classifier random values, and BN statistics measured on random input.

    A freshly initialized TSM has identity BN statistics and a near-zero classifier, so its logits are ~1e-17 and
    any comparison would pass. Random affine values make every channel (and so every shifted fold) matter, and
    statistics measured on a batch keep activations normalized, so the output depends on the input.

    Args:
        calibration: input for one training-mode forward pass that sets the BN statistics; a batch of 8 random
            32x32 frames when None (the model must accept it as a clip, e.g. num_segments in {1, 2, 4, 8}).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.75 + 0.25)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one pass sets the statistics exactly
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        if calibration is None:
            calibration = torch.randn(8, 3, 32, 32, generator=g)
        model.train()
        model(calibration)
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1
    return model


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test videos not present: expected {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for the module, restored afterwards (a training test may have raised it): tiny models
    gain nothing from more threads, only synchronisation that costs ~1 s per step on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scaled_diff(got, expected) -> float:
    """Largest absolute difference in units of the reference's scale, max(1, max |expected|).

    float32 rounding grows with the values: tiny random networks reach logits of ~4, where two correct
    computations (one batch of B frames vs one of B*T, other conv algorithms) differ by ~1e-4 absolute. A wrong
    computation (a lost or misplaced fold) differs by O(1). For outputs within [-1, 1] this is the absolute
    difference. numpy arrays or torch tensors."""
    got = got.detach().cpu().numpy() if hasattr(got, "detach") else np.asarray(got)
    expected = expected.detach().cpu().numpy() if hasattr(expected, "detach") else np.asarray(expected)
    assert got.shape == expected.shape, f"shape {got.shape} != {expected.shape}"
    return float(np.abs(got - expected).max() / max(1.0, np.abs(expected).max()))

