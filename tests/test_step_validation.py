"""Bad input to the online step: one ValueError that names what was expected and what was given."""

import pytest
import torch

from streamtsm.models import create


@pytest.fixture(scope="module")
def model():
    return create("tsm_mobilenetv2_online", num_classes=3)


def test_frame_without_batch_axis_is_rejected(model):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(3, 32, 32\)"):
        model.step(torch.zeros(3, 32, 32), None)


def test_frame_with_four_channels_is_rejected(model):
    with pytest.raises(ValueError, match=r"\(1, 4, 32, 32\)"):
        model.step(torch.zeros(1, 4, 32, 32), None)


def test_frame_that_is_not_a_tensor_is_rejected(model):
    with pytest.raises(ValueError, match="ndarray"):
        import numpy as np

        model.step(np.zeros((1, 3, 32, 32), np.float32), None)


def test_state_of_wrong_length_is_rejected(model):
    state = model.init_state(1, 32, 32)
    with pytest.raises(ValueError, match="must hold 10 tensors.*got 9"):
        model.step(torch.zeros(1, 3, 32, 32), state[:-1])


def test_state_of_wrong_spatial_size_is_rejected(model):
    state = model.init_state(1, 64, 64)
    with pytest.raises(ValueError, match=r"state\[0\] must have shape \(1, 3, 8, 8\) for 32x32 frames"):
        model.step(torch.zeros(1, 3, 32, 32), state)


def test_state_batch_mismatch_is_rejected(model):
    state = model.init_state(2, 32, 32)
    with pytest.raises(ValueError, match=r"state\[0\] holds 2 streams but the frame batch has 3"):
        model.step(torch.zeros(3, 3, 32, 32), state)


def test_state_entry_that_is_not_a_tensor_is_rejected(model):
    state = list(model.init_state(1, 32, 32))
    state[4] = None
    with pytest.raises(ValueError, match=r"state\[4\]"):
        model.step(torch.zeros(1, 3, 32, 32), state)


def test_clip_of_wrong_length_is_rejected():
    with pytest.raises(ValueError, match="T=8"):
        create("tsm_r18", num_classes=3, width=8)(torch.zeros(1, 5, 3, 32, 32))
