"""Wavelet background: smooth, below the data, close to the true background."""

import numpy as np
import pytest

from cider import BackgroundConfig, wavelet_background

from .conftest import blobs


def _scene(shape, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    background = 100 + 60 * grids[-1] + 40 * np.sin(np.pi * grids[-2])
    signal = 400 * blobs(shape, 40, seed)
    return background, rng.poisson(background + signal).astype(float)


@pytest.mark.parametrize("shape", [(128, 128), (4, 96, 112)])
def test_background_is_smooth_and_below_data(shape):
    truth, data = _scene(shape)
    estimate = wavelet_background(data, BackgroundConfig(level=7))
    assert estimate.shape == data.shape
    noise = np.sqrt(truth)  # Poisson noise: 10-13 counts
    objects = 400 * blobs(shape, 40, 0) > 50
    # close to the true background (within the noise) although objects cover the image
    assert np.median(np.abs(estimate - truth)) < np.median(noise)
    # below the data wherever there are objects
    assert np.mean(estimate[objects] < data[objects]) > 0.99

    # smooth: second differences far below those of the data
    def roughness(a):
        return np.abs(np.diff(a, 2, axis=-1)).mean()

    assert roughness(estimate) < 0.05 * roughness(data)


def test_background_is_scale_invariant():
    _, data = _scene((96, 96))
    a = wavelet_background(data)
    b = wavelet_background(data * 1000)
    np.testing.assert_allclose(b, a * 1000, rtol=1e-9)


def test_more_iterations_push_background_down_under_objects():
    truth, data = _scene((128, 128), seed=1)
    one = wavelet_background(data, BackgroundConfig(iterations=1))
    three = wavelet_background(data, BackgroundConfig(iterations=3))
    assert np.abs(three - truth).mean() < np.abs(one - truth).mean()
