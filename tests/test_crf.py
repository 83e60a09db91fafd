"""The CRF leaves a confident map alone and smooths an isolated noisy pixel."""

from __future__ import annotations

import numpy as np

from pipeline.inference.crf import CRFParams, dense_crf


def two_regions() -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 8:] = 200  # left dark, right bright
    probs = np.zeros((2, 16, 16), np.float32)
    probs[0, :, :8], probs[1, :, 8:] = 1.0, 1.0
    return image, probs


def test_a_confident_map_is_left_unchanged():
    image, probs = two_regions()
    probs = probs * 0.98 + 0.01
    out = dense_crf(probs, image)
    np.testing.assert_array_equal(out.argmax(0), probs.argmax(0))
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


def test_an_isolated_noisy_pixel_is_smoothed_away():
    image, probs = two_regions()
    probs = probs * 0.8 + 0.1
    probs[:, 4, 3] = [0.45, 0.55]  # one pixel of the dark region leans to the bright class
    assert probs.argmax(0)[4, 3] == 1
    out = dense_crf(probs, image, CRFParams(iterations=5))
    assert out.argmax(0)[4, 3] == 0
    np.testing.assert_array_equal(
        np.delete(out.argmax(0).ravel(), 4 * 16 + 3), np.delete(probs.argmax(0).ravel(), 4 * 16 + 3)
    )
    # without pairwise terms nothing changes
    plain = dense_crf(probs, image, CRFParams(w_spatial=0.0, w_bilateral=0.0))
    np.testing.assert_allclose(plain, probs, atol=1e-5)
