"""Tile geometry: coverage, weights, exact identity round trip, tiled RL == whole RL."""

import numpy as np
import pytest
import torch

from cider import gaussian_psf
from cider.rl import richardson_lucy
from cider.tiling import cut, minimum_margin, stitch, tile_grid, tile_weights

from .conftest import blobs

CASES = [((97, 130), (40, 48), (8, 10), (4, 5)), ((23, 61, 45), (10, 32, 20), (3, 6, 6), (3, 3, 2))]


@pytest.mark.parametrize("shape,tile,margin,blend", CASES)
def test_cores_cover_every_pixel_once(shape, tile, margin, blend):
    count = np.zeros(shape, dtype=int)
    for t in tile_grid(shape, tile, margin):
        count[t.slices("core")] += 1
        assert all(pa <= ca and cb <= pb for (ca, cb), (pa, pb) in zip(t.core, t.padded))
        assert all(b - a <= s for (a, b), s in zip(t.core, tile))
    assert (count == 1).all()


@pytest.mark.parametrize("shape,tile,margin,blend", CASES)
def test_weights_sum_to_one(shape, tile, margin, blend):
    total = np.zeros(shape)
    tiles = tile_grid(shape, tile, margin)
    for t in tiles:
        w = tile_weights(t, shape, blend)
        assert w.shape == t.padded_shape and w.min() >= 0
        total[t.slices()] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


@pytest.mark.parametrize("shape,tile,margin,blend", CASES)
def test_cut_identity_stitch_is_exact(shape, tile, margin, blend):
    image = np.random.default_rng(0).random(shape).astype(np.float32) * 1000
    tiles = tile_grid(shape, tile, margin)
    pieces = dict(zip([t.id for t in tiles], cut(image, tiles)))
    out = stitch(tiles, lambda t: pieces[t.id], shape, blend)
    np.testing.assert_array_equal(out, image)


def test_tile_ids_are_unique_and_stable():
    tiles = tile_grid((100, 100), (30, 30), (4, 4), unit=7)
    assert [t.id for t in tiles][:2] == ["u007-t00000", "u007-t00001"]
    assert len({t.id for t in tiles}) == len(tiles) == 16


def test_rl_tiled_equals_whole_image_away_from_border():
    """Valid-boundary RL per padded tile, stitched, matches RL of the whole image."""
    psf = gaussian_psf(1.5)  # 13 × 13
    image = blobs((150, 170), 120, seed=2) + 0.05
    from scipy.signal import convolve

    y = convolve(image, psf, mode="same")
    whole = richardson_lucy(torch.tensor(y), psf, 20).numpy()[6:-6, 6:-6]
    margin = tuple(2 * m for m in minimum_margin(psf.shape))  # 24 px
    tiles = tile_grid(y.shape, (64, 64), margin)

    def restore_tile(t):
        return richardson_lucy(torch.tensor(y[t.slices()]), psf, 20).numpy()[6:-6, 6:-6]

    tiled = stitch(tiles, restore_tile, y.shape, (margin[0] // 2,) * 2, dtype=np.float64)
    inner = (slice(30, -30), slice(30, -30))
    error = np.abs(tiled - whole)[inner].max() / whole[inner].max()
    assert error < 1e-3, f"max relative difference {error:.2e}"


@pytest.mark.parametrize("shape", [(70, 90), (12, 36, 37), (40, 41)])
def test_uniform_grid_has_one_padded_shape_and_stitches_exactly(shape):
    """Border windows shifted inward: one tile shape per image, cores and blending unchanged."""
    ndim = len(shape)
    plain = tile_grid(shape, (32,) * ndim, (5,) * ndim)
    uniform = tile_grid(shape, (32,) * ndim, (5,) * ndim, uniform=True)
    assert len({t.padded_shape for t in uniform}) == 1
    assert [t.core for t in uniform] == [t.core for t in plain]
    for tile, reference in zip(uniform, plain):
        assert all(a <= ra and b >= rb for (a, b), (ra, rb) in zip(tile.padded, reference.padded))
    image = np.random.default_rng(0).random(shape)
    out = stitch(uniform, lambda t: image[t.slices()], shape, (3,) * ndim, dtype=np.float64)
    np.testing.assert_allclose(out, image, atol=1e-12)


@pytest.mark.parametrize(
    "shape, tile, margin, block",
    [((53, 41), (16, 12), (4, 3), (7, 5)), ((9, 30, 26), (5, 12, 10), (2, 3, 3), (4, 11, 9))],
)
def test_blockwise_stitch_equals_whole_stitch_bit_for_bit(shape, tile, margin, block):
    from cider.tiling import block_grid, stitch_block

    tiles = tile_grid(shape, tile, margin, uniform=True)
    rng = np.random.default_rng(3)
    restored = {t.id: rng.random(t.padded_shape, dtype=np.float32) for t in tiles}
    blend = tuple(max(1, m // 2) for m in margin)
    whole = stitch(tiles, lambda t: restored[t.id], shape, blend)
    pieced = np.full(shape, np.nan, np.float32)
    for window in block_grid(shape, block):
        pieced[tuple(slice(a, b) for a, b in window)] = stitch_block(
            tiles, lambda t: restored[t.id], shape, blend, window
        )
    np.testing.assert_array_equal(pieced, whole)
