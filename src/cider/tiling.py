"""Tile geometry: grid, padded read windows, blend weights, stitching arithmetic.

Pure numpy, no files. A tile has a *core* (the cores partition the image) and a *padded*
window (the core grown by ``margin`` on every side, clipped to the image) that is what
gets restored. Neighbouring padded windows overlap by ``2 * margin``. Stitching blends
neighbours across their shared core boundary with complementary smooth ramps of half
width ``blend`` (≤ margin), so that the outer ``margin - blend`` pixels of every padded
tile — where boundary effects live — get weight 0, and the weights of all tiles sum to
exactly 1 at every pixel (a product of 1D partitions of unity).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Tile",
    "unit_name",
    "tile_grid",
    "minimum_margin",
    "tile_weights",
    "stitch",
    "stitch_block",
    "block_grid",
    "cut",
]

Window = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Tile:
    """One tile of one image.

    Attributes
    ----------
    id : str
        Unique name, used as the Snakemake wildcard (``u{unit}-t{index}``).
    unit : int
        Index of the image (file × time point × channel) the tile belongs to.
    grid_index : tuple of int
        Position in the tile grid.
    core, padded : tuple of (start, stop)
        Core window and padded (read/restore) window, per axis.
    """

    id: str
    unit: int
    grid_index: tuple[int, ...]
    core: Window
    padded: Window

    def slices(self, window: str = "padded") -> tuple[slice, ...]:
        """Slices selecting the ``"core"`` or ``"padded"`` window from the image."""
        return tuple(slice(a, b) for a, b in getattr(self, window))

    @property
    def unit_id(self) -> str:
        """Name of the tile's image (the prefix of its id)."""
        return self.id.split("-")[0]

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.padded)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "unit": self.unit,
            "grid_index": list(self.grid_index),
            "core": [list(w) for w in self.core],
            "padded": [list(w) for w in self.padded],
        }


def unit_name(unit: int) -> str:
    """Name of image number ``unit`` (``u000``, ``u999``, ``u1000``…); the prefix of its tiles' ids."""
    return f"u{unit:03d}"


def minimum_margin(psf_shape: Sequence[int]) -> tuple[int, ...]:
    """Smallest allowed margin per axis: the PSF size minus one (two PSF radii).

    One radius supplies the data that blurred into the core's edge; the second keeps the
    boundary effects of restoring a cut-out tile out of the blended zone.
    """
    return tuple(int(k) - 1 for k in psf_shape)


def auto_blend(margin: Sequence[int]) -> tuple[int, ...]:
    """Blend half width per axis for ``margin`` (``tiling.blend: auto``): half the margin,
    at least 1 px."""
    return tuple(max(1, int(m) // 2) for m in margin)


def _axis_bounds(n: int, tile: int) -> list[int]:
    count = max(1, math.ceil(n / tile))
    return [round(i * n / count) for i in range(count + 1)]


def tile_grid(
    shape: Sequence[int],
    tile: Sequence[int],
    margin: Sequence[int],
    unit: int = 0,
    uniform: bool = False,
) -> list[Tile]:
    """Cut an image of ``shape`` into tiles of at most ``tile`` (cores of near-equal size).

    Parameters
    ----------
    shape : sequence of int
        Spatial shape of the image.
    tile : sequence of int
        Largest core size per axis.
    margin : sequence of int
        Padding per axis added to each core (clipped at the image border).
    unit : int
        Image index, part of the tile id.
    uniform : bool
        Give every padded window of the image one shape (the largest core plus both
        margins, at most the image): windows clipped by the image border are shifted
        inward instead, so the tile sees more of the image. Same-shape tiles can be
        fitted in one batch (:func:`cider.fitting.fit_generators`); the cores and the
        blending are unchanged.

    Returns
    -------
    list of Tile
        In C order of the grid.
    """
    if not (len(shape) == len(tile) == len(margin)):
        raise ValueError(
            f"tile_grid: shape {tuple(shape)}, tile {tuple(tile)}, margin {tuple(margin)} differ in length"
        )
    if min(tile) < 1 or min(margin) < 0:
        raise ValueError(
            f"tile_grid: tile sizes must be ≥ 1 and margins ≥ 0, got {tuple(tile)}, {tuple(margin)}"
        )
    bounds = [_axis_bounds(n, t) for n, t in zip(shape, tile)]
    size = [min(n, max(np.diff(b)) + 2 * m) for b, m, n in zip(bounds, margin, shape)]
    tiles = []
    for flat, index in enumerate(np.ndindex(*[len(b) - 1 for b in bounds])):
        core = tuple((b[i], b[i + 1]) for b, i in zip(bounds, index))
        if uniform:
            starts = [min(max(0, a - m), n - w) for (a, _), m, n, w in zip(core, margin, shape, size)]
            padded = tuple((int(a), int(a + w)) for a, w in zip(starts, size))
        else:
            padded = tuple((max(0, a - m), min(n, b + m)) for (a, b), m, n in zip(core, margin, shape))
        tiles.append(Tile(f"{unit_name(unit)}-t{flat:05d}", unit, tuple(int(i) for i in index), core, padded))
    return tiles


def _ramp(x: np.ndarray, centre: float, blend: int) -> np.ndarray:
    """Smooth step from 0 (x ≪ centre) to 1 (x ≫ centre) over [centre − blend, centre + blend]."""
    if blend == 0:
        return (x >= centre).astype(np.float64)
    t = np.clip((x - (centre - blend)) / (2 * blend), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def tile_weights(
    tile: Tile, shape: Sequence[int], blend: Sequence[int], window: Window | None = None
) -> np.ndarray:
    """Blend weights over the tile's padded window (summing to 1 across all tiles).

    Along each axis the weight rises across the tile's lower core boundary and falls
    across its upper one (not at the image border); the pixel centre ``c - 0.5`` sits
    between the last pixel of one core and the first of the next. ``window`` (image
    coordinates, inside the padded window) gives the same values over that part only.
    """
    profiles = []
    for (lo, hi), (plo, phi), b, n in zip(tile.core, window or tile.padded, blend, shape):
        x = np.arange(plo, phi, dtype=np.float64)
        w = np.ones_like(x)
        if lo > 0:
            w *= _ramp(x, lo - 0.5, b)
        if hi < n:
            w *= 1 - _ramp(x, hi - 0.5, b)
        profiles.append(w)
    weights = profiles[0]
    for p in profiles[1:]:
        weights = np.multiply.outer(weights, p)
    return weights


def cut(image: np.ndarray, tiles: Iterable[Tile]) -> list[np.ndarray]:
    """Padded tiles of ``image``."""
    return [image[t.slices()] for t in tiles]


def stitch(
    tiles: Sequence[Tile],
    read_tile: Callable[[Tile], np.ndarray],
    shape: Sequence[int],
    blend: Sequence[int],
    dtype: np.dtype = np.float32,
) -> np.ndarray:
    """Blend restored padded tiles into one image (the whole image in memory).

    Accumulates in float64 and casts once at the end, so that tiles equal to the input
    (identity processing) give back a float32 input bit for bit. For images larger than
    memory, :func:`stitch_block` makes the same values one block at a time.

    Parameters
    ----------
    tiles : sequence of Tile
        All tiles of one image.
    read_tile : callable
        Returns the restored padded tile (shape ``tile.padded_shape``).
    shape : sequence of int
        Image shape.
    blend : sequence of int
        Ramp half width per axis, at most the margin.
    dtype : numpy dtype
        Output dtype.
    """
    whole = tuple((0, int(n)) for n in shape)
    return stitch_block(tiles, read_tile, shape, blend, whole, dtype)


def stitch_block(
    tiles: Sequence[Tile],
    read_tile: Callable[[Tile], np.ndarray],
    shape: Sequence[int],
    blend: Sequence[int],
    block: Window,
    dtype: np.dtype = np.float32,
) -> np.ndarray:
    """The blended image inside ``block`` (a window of the image), from only the tiles
    whose padded window meets it.

    Every pixel sums the same products in the same tile order as a whole-image stitch,
    so the blocks of a partition put together equal :func:`stitch` bit for bit. Memory:
    the block plus one padded tile.
    """
    total = np.zeros(tuple(b - a for a, b in block), dtype=np.float64)
    for tile in tiles:
        overlap = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(tile.padded, block)]
        if any(low >= high for low, high in overlap):
            continue
        data = read_tile(tile)
        if data.shape != tile.padded_shape:
            raise ValueError(
                f"tile {tile.id}: restored shape {data.shape} != padded window {tile.padded_shape}"
            )
        source = tuple(slice(low - a, high - a) for (low, high), (a, _) in zip(overlap, tile.padded))
        target = tuple(slice(low - c, high - c) for (low, high), (c, _) in zip(overlap, block))
        part = np.asarray(data[source], dtype=np.float64)
        total[target] += tile_weights(tile, shape, blend, tuple(overlap)) * part
    return total.astype(dtype)


def block_grid(shape: Sequence[int], block: Sequence[int]) -> list[Window]:
    """Windows of size ``block`` (smaller at the far edges) that partition ``shape``."""
    starts = [range(0, n, b) for n, b in zip(shape, block)]
    return [
        tuple((a, min(a + b, n)) for a, b, n in zip(corner, block, shape))
        for corner in itertools.product(*starts)
    ]
