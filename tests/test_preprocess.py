"""The live preprocessing: what the model sees of a BGR frame."""

import cv2
import numpy as np
import pytest

from streamtsm.errors import ConfigError
from streamtsm.preprocess import Preprocessor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _reference(image, input_size, resize_size):
    """Step by step in float64: short side to resize_size, centre crop, BGR -> RGB, (x / 255 - mean) / std."""
    h, w = image.shape[:2]
    scale = resize_size / min(h, w)
    size = (max(input_size, round(w * scale)), max(input_size, round(h * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top, left = (resized.shape[0] - input_size) // 2, (resized.shape[1] - input_size) // 2
    rgb = resized[top : top + input_size, left : left + input_size, ::-1].astype(np.float64) / 255.0
    return ((rgb - MEAN) / STD).transpose(2, 0, 1)


@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (30, 30), (100, 40)])
def test_preprocessed_frame_is_the_normalized_rgb_centre_crop_of_the_resized_frame(shape):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = Preprocessor(32, 36, MEAN, STD)(image)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, _reference(image, 32, 36), atol=1e-5)


def test_preprocessing_keeps_the_channel_order_red_green_blue():
    image = np.zeros((40, 40, 3), np.uint8)
    image[..., 2] = 255  # pure red in BGR
    out = Preprocessor(32, 32, (0, 0, 0), (1, 1, 1))(image)
    assert np.allclose(out[0], 1.0) and np.allclose(out[1:], 0.0)


def test_crop_region_is_cut_out_before_resizing():
    image = np.zeros((60, 80, 3), np.uint8)
    image[10:30, 40:60] = 200
    out = Preprocessor(16, 16, (0, 0, 0), (1, 1, 1), crop=(40, 10, 20, 20))(image)
    assert np.allclose(out, 200 / 255)


def test_crop_outside_the_frame_is_a_config_error():
    with pytest.raises(ConfigError, match="lies outside the 80x60 frame"):
        Preprocessor(16, 16, MEAN, STD, crop=(100, 100, 20, 20))(np.zeros((60, 80, 3), np.uint8))


def test_non_bgr_uint8_input_is_refused_with_what_was_given():
    with pytest.raises(ValueError, match=r"expected a BGR uint8 \[H, W, 3\] image, got float32 \(8, 8, 3\)"):
        Preprocessor(8, 8, MEAN, STD)(np.zeros((8, 8, 3), np.float32))
