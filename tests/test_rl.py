"""Richardson–Lucy and the blur operator against independent references."""

import numpy as np
import pytest
import torch
from scipy.signal import convolve, correlate
from skimage.restoration import richardson_lucy as sk_richardson_lucy

from cider import gaussian_psf
from cider.rl import BlurOperator, from_positive, next_fast_len, richardson_lucy, to_positive

from .conftest import blobs


def test_next_fast_len():
    assert [next_fast_len(n) for n in (1, 7, 17, 97, 121, 250)] == [1, 8, 18, 100, 125, 250]


@pytest.mark.parametrize("boundary", ["valid", "same", "periodic"])
@pytest.mark.parametrize("shape,sigma", [((20, 23), 1.2), ((9, 12, 11), (0.8, 1.0, 1.1))])
def test_adjoint(boundary, shape, sigma):
    """<A x, y> == <x, Aᵀ y> for every boundary model, 2D and 3D."""
    psf = torch.tensor(gaussian_psf(sigma, ndim=len(shape), size=5))
    op = BlurOperator(psf, shape, boundary, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(op.object_shape, generator=g, dtype=torch.float64)
    y = torch.rand(op.image_shape, generator=g, dtype=torch.float64)
    assert torch.allclose((op(x) * y).sum(), (x * op.adjoint(y)).sum(), rtol=1e-12)


def test_forward_matches_scipy_valid_and_same():
    rng = np.random.default_rng(1)
    psf = rng.random((5, 7))
    psf /= psf.sum()
    x = rng.random((30, 28))
    valid = BlurOperator(psf, (26, 22), "valid", dtype=torch.float64)(torch.tensor(x)).numpy()
    same = BlurOperator(psf, x.shape, "same", dtype=torch.float64)(torch.tensor(x)).numpy()
    np.testing.assert_allclose(valid, convolve(x, psf, mode="valid"), atol=1e-12)
    np.testing.assert_allclose(same, convolve(x, psf, mode="same"), atol=1e-12)


@pytest.mark.parametrize("shape,sigma", [((48, 40), 1.5), ((16, 24, 20), (1.0, 1.3, 1.3))])
def test_rl_same_matches_skimage(shape, sigma):
    """Zero-boundary RL equals scikit-image's RL (relative 1e-6, whole image)."""
    psf = gaussian_psf(sigma, ndim=len(shape))
    truth = blobs(shape, 12) + 0.05
    blurred = convolve(truth, psf, mode="same")
    ours = richardson_lucy(torch.tensor(blurred), psf, 15, boundary="same", init=0.5).numpy()
    reference = sk_richardson_lucy(blurred, psf, num_iter=15, clip=False)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-9)


def _rl_valid_reference(y: np.ndarray, psf: np.ndarray, iterations: int) -> np.ndarray:
    """Direct (non-FFT) boundary-aware RL with scipy's spatial convolution."""
    x = np.full(tuple(n + k - 1 for n, k in zip(y.shape, psf.shape)), y.mean())
    weight = correlate(np.ones_like(y), psf, mode="full")
    for _ in range(iterations):
        x = x * correlate(y / convolve(x, psf, mode="valid"), psf, mode="full") / weight
    return x


def test_rl_valid_matches_direct_implementation():
    psf = gaussian_psf(1.3, size=7)
    y = convolve(blobs((50, 46), 15) + 0.05, psf, mode="valid")
    ours = richardson_lucy(torch.tensor(y), psf, 20, boundary="valid").numpy()
    np.testing.assert_allclose(ours, _rl_valid_reference(y, psf, 20), rtol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_rl_valid_keeps_flux(ndim):
    """Boundary-aware RL: the re-blurred estimate has exactly the observed flux."""
    shape = (40, 36) if ndim == 2 else (14, 20, 18)
    psf = gaussian_psf(1.2, ndim=ndim, size=5)
    y = torch.tensor(blobs(shape, 10) + 0.1)
    op = BlurOperator(psf, shape, "valid", dtype=torch.float64)
    for iterations in (1, 7, 30):
        x = richardson_lucy(y, psf, iterations)
        assert float(op(x).sum()) == pytest.approx(float(y.sum()), rel=1e-10)


def test_rl_with_a_known_background_restores_the_objects_and_not_the_background():
    """Noise-free data ``A x + 50`` with ``background=50``: the estimate converges to the
    objects (re-blurred flux within 1 % of theirs after 200 iterations, 0.9 % measured;
    the model ``Ax + 50`` is what the callback sees); without it, RL keeps the data's
    flux exactly and so puts the 50 per pixel into the object."""
    psf = gaussian_psf(1.2, size=7)
    x = blobs((40, 36), 10) * 200
    op = BlurOperator(psf, (34, 30), "valid", dtype=torch.float64)
    data = op(torch.tensor(x)) + 50
    objects = float(op(torch.tensor(x)).sum())
    models = []
    estimate = richardson_lucy(data, psf, 200, background=50.0, callback=lambda i, m: models.append(m))
    assert float(op(estimate).sum()) == pytest.approx(objects, rel=0.01)
    assert float((models[-1] - data).abs().max()) < float((models[0] - data).abs().max()) / 10
    assert torch.equal(models[-1], op(richardson_lucy(data, psf, 199, background=50.0)) + 50)
    without = richardson_lucy(data, psf, 200)
    assert float(op(without).sum()) == pytest.approx(objects + 50 * data.numel(), rel=1e-10)


def test_rl_periodic_keeps_flux():
    psf = gaussian_psf(1.5)
    y = torch.tensor(blobs((32, 32), 8) + 0.1)
    x = richardson_lucy(y, psf, 25, boundary="periodic")
    assert float(x.sum()) == pytest.approx(float(y.sum()), rel=1e-10)


def test_rl_valid_beats_zero_boundary_on_cropped_data():
    """Data cut from a larger scene: the valid model is far better near the borders."""
    psf = gaussian_psf(2.0)
    scene = blobs((90, 90), 80, seed=3) + 0.05
    y = convolve(scene, psf, mode="valid")  # 74 × 74, content from outside the crop
    r = psf.shape[0] // 2
    truth = scene[r:-r, r:-r]
    valid = richardson_lucy(torch.tensor(y), psf, 30, boundary="valid").numpy()[r:-r, r:-r]
    same = richardson_lucy(torch.tensor(y), psf, 30, boundary="same").numpy()
    band = np.ones_like(truth, dtype=bool)
    band[12:-12, 12:-12] = False
    err_valid = np.abs(valid - truth)[band].mean()
    err_same = np.abs(same - truth)[band].mean()
    assert err_valid < 0.6 * err_same


def test_rl_batched_equals_per_channel():
    psf = gaussian_psf(1.0)
    stack = torch.tensor(np.stack([blobs((30, 30), 6, seed=s) + 0.1 for s in range(4)]))
    batched = richardson_lucy(stack, psf, 10)
    for c in range(4):
        assert torch.allclose(batched[c], richardson_lucy(stack[c], psf, 10), rtol=1e-12)


@pytest.mark.parametrize("boundary", ["valid", "same", "periodic"])
def test_a_batch_of_psfs_blurs_each_member_with_its_own(boundary):
    """PSFs with leading batch axes (``ndim`` spatial ones): RL on (B, C, *spatial) equals
    RL on each member with its own PSF; a PSF with too few axes is refused."""
    rng = np.random.default_rng(4)
    psfs = torch.tensor(np.stack([gaussian_psf(s, ndim=2, size=7) for s in (0.8, 1.6, 2.4)]))
    image = torch.tensor(rng.random((3, 2, 20, 18)) + 0.1)
    batched = richardson_lucy(image, psfs[:, None], 15, boundary, ndim=2)
    for member, psf in enumerate(psfs):
        alone = richardson_lucy(image[member], psf, 15, boundary)
        torch.testing.assert_close(batched[member], alone, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="fewer than 3 spatial axes"):
        BlurOperator(psfs[0], (9, 20, 18))


def test_positive_map_round_trip():
    """Features of any sign become positive; undoing the map restores them exactly."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(16, 20, 24, generator=g, dtype=torch.float64) * 3 - 1
    positive, low, scale = to_positive(features, 0.01, ndim=2)
    assert positive.min() >= 0.01 - 1e-12
    assert torch.allclose(from_positive(positive, low, scale, 0.01), features, atol=1e-12)
    # a delta PSF leaves RL at its input, so the whole chain is the identity
    delta = np.zeros((3, 3))
    delta[1, 1] = 1
    rl = richardson_lucy(positive, delta, 5, boundary="same", init=positive)
    assert torch.allclose(from_positive(rl, low, scale, 0.01), features, atol=1e-9)


def test_positivity_map_from_a_given_range_is_the_same_for_every_tile():
    """Two overlapping tiles mapped with the image's range agree on their common pixels."""
    from cider.rl import from_positive, to_positive

    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 40, 40, generator=g, dtype=torch.float64)
    value_range = (image.amin(dim=(1, 2)).tolist(), image.amax(dim=(1, 2)).tolist())
    left, _, _ = to_positive(image[:, :, :30], 0.01, 2, value_range)
    right, _, _ = to_positive(image[:, :, 10:], 0.01, 2, value_range)
    torch.testing.assert_close(left[:, :, 10:], right[:, :, :20])
    own_left, _, _ = to_positive(image[:, :, :30], 0.01, 2)
    own_right, _, _ = to_positive(image[:, :, 10:], 0.01, 2)
    assert not torch.allclose(own_left[:, :, 10:], own_right[:, :, :20])  # what tiles did before
    positive, low, scale = to_positive(image, 0.01, 2, value_range)
    torch.testing.assert_close(from_positive(positive, low, scale, 0.01), image)
