"""Ground-truth cases of the microscopy benchmark: synthetic scenes, their degradation, flowdec.

Every case is a :class:`Case`: an observation in photon-like data units, the PSF, and the
truth on the observation's field of view in the same units (the blur keeps flux, so a
perfect restoration equals the truth). Synthetic observations are the ``valid`` blur of a
larger object (no boundary assumption), with Poisson noise and Gaussian read noise; all
randomness comes from the case's seed, and the noise is drawn from the blurred object as
:func:`noise_free` cleans it, so that one seed gives one realisation on every CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from cider.psf import crop_to_energy, gaussian_psf, lightsheet_psf, normalize_psf, widefield_psf
from cider.rl import BlurOperator

ROOT = Path(__file__).resolve().parents[1]
FLOWDEC = ROOT.parent / "shared" / "data" / "flowdec" / "bars-25pct"


@dataclass
class Case:
    """One benchmark case.

    Attributes
    ----------
    name : str
        Case name (a key of the results JSON).
    observation : np.ndarray
        Blurred, noisy data in data units.
    psf : np.ndarray
        PSF (odd sizes, sum 1).
    truth : np.ndarray
        The object on the observation's field of view, same units.
    spots : list of tuple
        Centres of point-like objects (for integrated spot intensity), may be empty.
    description : str
        One line for the table.
    voxel_size : tuple of float
        Sampling (Z, Y, X) or (Y, X) in µm, for the record.
    background : float
        The truth's flat level in data units (0: none): the light that a
        background-removing method leaves out, so its photometry is scored against
        ``truth - background``.
    spot_oracle : tuple of float
        Per spot, the relative error of the oracle's integrated intensity on this draw
        (:func:`oracle_spot_errors`): what the noise alone costs a method that knows
        everything but the spot's brightness. Empty where not known (flowdec bars).
    """

    name: str
    observation: np.ndarray
    psf: np.ndarray
    truth: np.ndarray
    spots: list[tuple[int, ...]] = field(default_factory=list)
    description: str = ""
    voxel_size: tuple[float, ...] = ()
    background: float = 0.0
    spot_oracle: tuple[float, ...] = ()


def _segment(shape, start, end, width, rng) -> np.ndarray:
    """Anti-aliased line from ``start`` to ``end`` drawn as Gaussian-blurred points."""
    out = np.zeros(shape)
    length = int(np.ceil(np.linalg.norm(np.subtract(end, start)))) * 2 + 2
    for t in np.linspace(0, 1, length):
        p = np.round(np.add(start, t * np.subtract(end, start))).astype(int)
        if all(0 <= q < n for q, n in zip(p, shape)):
            out[tuple(p)] = 1.0
    return gaussian_filter(out, width)


SCENE_BACKGROUND = 0.02  # the flat level of every fluorescence scene, at peak about 1
SPOT_RADIUS = 2  # integrated spot intensity: the sum of a (2 r + 1)-px box around the centre


def fluorescence_scene(shape: tuple[int, ...], seed: int, anisotropy: float = 1.0):
    """Beads, filaments and blobs on a faint flat background (peak about 1).

    Parameters
    ----------
    shape : tuple of int
        2D or 3D object shape.
    seed : int
        Random seed.
    anisotropy : float
        Z step over XY pixel: objects are thinner in Z (in pixels) by this factor.

    Returns
    -------
    scene, spots
        The object (background :data:`SCENE_BACKGROUND`) and the bead centres.
    """
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    scale = np.array([1 / anisotropy] + [1.0] * (ndim - 1)) if ndim == 3 else np.ones(ndim)
    scene = np.zeros(shape)
    volume = np.prod(shape)
    # Blobs: soft ellipsoids (cells, nuclei).
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    for _ in range(max(2, int(volume / 9000))):
        centre = [rng.uniform(0.15 * n, 0.85 * n) for n in shape]
        radii = rng.uniform(3, 7, ndim) * scale
        r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
        scene += rng.uniform(0.15, 0.4) / (1 + np.exp((np.sqrt(r2) - 1) * 6))
    # Filaments: thin lines (microtubules, neurites).
    for _ in range(max(2, int(volume / 6000))):
        start = [rng.uniform(0, n) for n in shape]
        end = [rng.uniform(0, n) for n in shape]
        line = _segment(shape, start, end, 0.6, rng)
        scene += rng.uniform(0.3, 0.7) * line / max(line.max(), 1e-12)
    # Beads: sub-resolution points.
    spots = []
    margin = [max(2, n // 10) for n in shape]
    for _ in range(max(3, int(volume / 4000))):
        centre = tuple(int(rng.integers(m, n - m)) for m, n in zip(margin, shape))
        spots.append(centre)
        point = np.zeros(shape)
        point[centre] = 1.0
        bead = gaussian_filter(point, 0.6)
        scene += rng.uniform(0.5, 1.0) * bead / bead.max()
    return scene + SCENE_BACKGROUND, spots


def plankton_scene(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Bright-field-like 2D scene: dark cells with darker rims and inner texture on a bright field."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    absorb = np.zeros(shape)
    for _ in range(max(2, int(np.prod(shape) / 1500))):
        cy, cx = rng.uniform(0.15, 0.85) * shape[0], rng.uniform(0.15, 0.85) * shape[1]
        ry, rx = rng.uniform(4, 12), rng.uniform(4, 12)
        angle = rng.uniform(0, np.pi)
        u = ((yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)) / ry
        v = (-(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)) / rx
        r = np.sqrt(u**2 + v**2)
        body = 1 / (1 + np.exp((r - 1) * 8))
        rim = np.exp(-(((r - 1) / 0.12) ** 2))
        texture = gaussian_filter(rng.random(shape), 1.0)
        absorb += body * (0.25 + 0.3 * (texture - 0.5)) + 0.35 * rim
    return 1.0 - 0.9 * np.clip(absorb, 0, 1)


def noise_free(blurred: np.ndarray) -> np.ndarray:
    """The blurred object as the mean of the Poisson draw, with FFT round-off (about
    ±1e-15 of the peak, whose sign depends on the CPU's FFT code) set to exactly 0.

    numpy's Poisson sampler draws no number for a mean of 0 and at least one for any
    positive mean, so a round-off of ``+1e-15`` instead of ``-1e-15`` (clipped to 0) in a
    dark region shifts the random stream for every later pixel: the same seed gave another
    bead field on an Intel Xeon than on an AMD EPYC (oracle spot error 4.53 against 5.14
    %). A last-bit difference in a bright pixel's mean changes its draw with a negligible
    probability, so it is left as it is (rounding it to float32 would itself have changed
    one pixel of widefield3d_high's draw).
    """
    mean = np.asarray(blurred, dtype=np.float64)
    return np.where(mean > 1e-9 * float(np.abs(mean).max(initial=0.0)), mean, 0.0)


def valid_blur(obj: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """The ``valid`` blur of ``obj`` by ``psf`` (no boundary assumption): shape
    ``obj.shape - psf.shape + 1``; field pixel ``f`` sees object pixels ``f .. f + k - 1``."""
    shape = tuple(n - k + 1 for n, k in zip(obj.shape, psf.shape))
    return BlurOperator(torch.tensor(psf), shape, "valid")(torch.tensor(obj)).numpy()


def degrade(obj: np.ndarray, psf: np.ndarray, photons: float, read_noise: float, seed: int):
    """``valid`` blur of ``obj``, scaled to ``photons`` at value 1, Poisson + read noise.

    Returns
    -------
    observation, truth, expected
        In photon units; ``truth`` is ``obj`` cropped to the observation's field,
        ``expected`` the noise-free blurred data.
    """
    expected = valid_blur(obj, psf) * photons
    return add_noise(expected, read_noise, seed), on_field(obj, psf, expected.shape) * photons, expected


def on_field(obj: np.ndarray, psf: np.ndarray, field: tuple[int, ...]) -> np.ndarray:
    """``obj`` cropped to the field of its ``valid`` blur by ``psf`` (shape ``field``)."""
    return obj[tuple(slice(k // 2, k // 2 + n) for k, n in zip(psf.shape, field))]


def add_noise(expected: np.ndarray, read_noise: float, seed: int) -> np.ndarray:
    """Poisson draw of ``expected`` (photons) plus Gaussian read noise of ``read_noise``."""
    rng = np.random.default_rng(seed)
    observation = rng.poisson(noise_free(expected)).astype(np.float64)
    return observation + rng.normal(0, read_noise, expected.shape)


def oracle_spot_errors(
    signal: np.ndarray,
    psf: np.ndarray,
    expected: np.ndarray,
    observation: np.ndarray,
    spots_obj: list[tuple[int, ...]],
    read_noise: float,
) -> tuple[float, ...]:
    """The oracle's relative error of each spot's integrated intensity on this draw.

    The oracle knows the PSF, the spot's position and shape and everything else in the
    scene; only the spot's brightness ``a`` (1 = true) is unknown. Its weighted
    least-squares estimate from the data is ``a = 1 + <t, n / v> / <t, t / v>``, with
    ``t`` the blurred box signal (:data:`SPOT_RADIUS`), ``n`` the draw's noise
    (observation − expected) and ``v`` the noise variance. Its error is the floor that the
    noise sets for any method's spot error on this draw (on average; a method with
    priors can be luckier on a few spots).

    Parameters
    ----------
    signal : np.ndarray
        The object less its flat background, in data units (the larger, unblurred grid).
    psf : np.ndarray
        The PSF of the ``valid`` blur.
    expected : np.ndarray
        The noise-free observation (``valid`` blur of the whole object).
    observation : np.ndarray
        The draw.
    spots_obj : list of tuple
        Spot centres on the object's grid.
    read_noise : float
        Gaussian read-noise std (data units).

    Returns
    -------
    tuple of float
        ``a - 1`` per spot.
    """
    r, half = SPOT_RADIUS, [k - 1 for k in psf.shape]
    variance = np.clip(expected, 0, None) + read_noise**2 + 1e-12
    errors = []
    for centre in spots_obj:
        # object window that reaches every field pixel the box's light reaches
        lo = [max(c - r - h, 0) for c, h in zip(centre, half)]
        hi = [min(c + r + h + 1, n) for c, h, n in zip(centre, half, signal.shape)]
        window = np.zeros([b - a for a, b in zip(lo, hi)])
        box = tuple(slice(c - r - a, c + r + 1 - a) for c, a in zip(centre, lo))
        window[box] = signal[tuple(slice(c - r, c + r + 1) for c in centre)]
        template = valid_blur(window, psf)  # starts at field pixel ``lo`` (see valid_blur)
        field = tuple(slice(a, a + n) for a, n in zip(lo, template.shape))
        noise = observation[field] - expected[field]
        weights = template / variance[field]
        errors.append(float((weights * noise).sum() / (weights * template).sum()))
    return tuple(errors)


class SyntheticScene(NamedTuple):
    """A synthetic case's noise-free object on the fit's object grid (field + PSF − 1)."""

    obj: np.ndarray  # the object (peak about 1; fluorescence: on SCENE_BACKGROUND)
    psf: np.ndarray
    voxel: tuple[float, ...]
    field_shape: tuple[int, ...]
    spots: list[tuple[int, ...]]  # bead centres on the object grid, 3 px inside the field


def synthetic_scene(name: str, full: bool = False, seed: int | None = None) -> SyntheticScene:
    """The object, PSF and sampling of a synthetic case (see :func:`synthetic_case`)."""
    kind, psf_kind, _ = SYNTHETIC[name]
    seed = sum(map(ord, name)) if seed is None else seed
    if kind == "volume":
        field_shape = (64, 128, 128) if full else (32, 64, 64)
        if psf_kind == "lightsheet":
            voxel = (0.6, 0.2, 0.2)  # z step 3× xy
            psf = lightsheet_psf((15, 21, 21), voxel, wavelength=0.52, na=0.8, sheet_thickness=2.0)
            psf = _crop_energy(psf, 0.995)
        elif psf_kind == "widefield":
            voxel = (0.4, 0.2, 0.2)  # z step 2× xy
            psf = widefield_psf(
                (11, 17, 17), voxel, wavelength=0.52, na=1.0, immersion_index=1.33, sample_index=1.33
            )
        else:  # the Gaussian case
            voxel = (0.36, 0.12, 0.12)
            psf = gaussian_psf((2.0, 1.2, 1.2), size=(9, 7, 7))
        anisotropy = voxel[0] / voxel[-1]
    else:
        field_shape = (256, 256) if full else (96, 96)
        voxel = (0.2, 0.2)
        psf = gaussian_psf(1.5 if kind == "plankton" else 1.8)
        anisotropy = 1.0
    obj_shape = tuple(n + k - 1 for n, k in zip(field_shape, psf.shape))
    offset = [k // 2 for k in psf.shape]
    inside: list[tuple[int, ...]] = []
    if kind == "plankton":
        obj = plankton_scene(obj_shape, seed)
    else:
        obj, spots_obj = fluorescence_scene(obj_shape, seed, anisotropy)
        inside = [
            s for s in spots_obj if all(o + 3 <= c < o + n - 3 for c, o, n in zip(s, offset, field_shape))
        ]
    return SyntheticScene(obj, psf, voxel, field_shape, inside)


def synthetic_case(name: str, full: bool = False, seed: int | None = None) -> Case:
    """One of the synthetic cases by name (see :data:`SYNTHETIC`); ``seed`` draws another
    scene and noise of the same kind (default: the case's own, from its name)."""
    kind, _, level = SYNTHETIC[name]
    seed = sum(map(ord, name)) if seed is None else seed
    obj, psf, voxel, _, inside = synthetic_scene(name, full, seed)
    offset = [k // 2 for k in psf.shape]
    spots = [tuple(c - o for c, o in zip(s, offset)) for s in inside]
    photons, read_noise = LEVELS[level]
    observation, truth, expected = degrade(obj, psf, photons, read_noise, seed + 1)
    background = 0.0 if kind == "plankton" else SCENE_BACKGROUND * photons
    oracle: tuple[float, ...] = ()
    if spots:
        oracle = oracle_spot_errors(
            obj * photons - background, psf, expected, observation, inside, read_noise
        )
    return Case(name, observation, psf, truth, spots, DESCRIPTIONS[name], voxel, background, oracle)


def bead_field(
    seed: int = 0,
    photons: float = 400.0,
    background: float = 0.0,
    shape: tuple[int, int] = (64, 64),
    sigma: float = 2.0,
    gap: int = 0,
    count: int = 12,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Point-like beads (one pixel each, ``photons`` × U(0.6, 1)) on a flat ``background``,
    blurred by a Gaussian PSF of ``sigma`` px, Poisson noise; the ``valid`` blur of a
    larger object (no boundary assumption).

    ``gap``: least distance (Chebyshev, px) between beads; 0 lets them crowd.

    Returns
    -------
    observation, psf, truth (the object on the observation's field), spots (bead
    centres in field coordinates).
    """
    psf = gaussian_psf(sigma)
    big = tuple(n + k - 1 for n, k in zip(shape, psf.shape))
    rng = np.random.default_rng(seed)
    obj = np.full(big, background)
    r = psf.shape[0] // 2
    spots: list[tuple[int, int]] = []
    while len(spots) < count:
        c = tuple(int(rng.integers(r + 4, n - r - 4)) for n in big)
        if any(max(abs(a - r - b) for a, b in zip(c, s)) < gap for s in spots):
            continue
        obj[c] += photons * rng.uniform(0.6, 1.0)
        spots.append(tuple(x - r for x in c))
    blurred = valid_blur(obj, psf)
    observation = rng.poisson(noise_free(blurred)).astype(np.float64)
    return observation, psf, obj[r:-r, r:-r], spots


def box_sums(image: np.ndarray, spots, radius: int = 4) -> np.ndarray:
    """Sum of each ``(2 radius + 1)``-px box around the spots (any number of axes; boxes
    are cut at the image's low edges)."""
    return np.asarray(
        [float(image[tuple(slice(max(c - radius, 0), c + radius + 1) for c in s)].sum()) for s in spots]
    )


def background_median(image: np.ndarray, spots, radius: int = 8) -> float:
    """Median of the pixels farther than ``radius`` (Chebyshev) from every spot."""
    far = np.ones(image.shape, bool)
    for s in spots:
        far[tuple(slice(max(c - radius, 0), c + radius + 1) for c in s)] = False
    return float(np.median(image[far]))


def _crop_energy(psf: np.ndarray, energy: float, max_shape=None) -> np.ndarray:
    """:func:`cider.psf.crop_to_energy` of the PSF (capped at ``max_shape``), normalised."""
    if max_shape is not None:
        psf = _centre_crop(psf, [min(n, m) for n, m in zip(psf.shape, max_shape)])
    return normalize_psf(crop_to_energy(psf / psf.sum(), energy))


def bars_case(psf_energy: float | None = 0.99) -> Case:
    """flowdec ``bars-25pct``: observation, truth (``actual.tif``) and PSF (``kernel.tif``).

    ``data.tif`` is, to a correlation of 0.98, ``23.7 · (actual ⊛ kernel) + 131`` plus noise
    (measured here with a periodic blur by the normalised kernel), so the truth in data
    units is ``23.7 · actual + 131`` (131: a flat background that the blur keeps). Both are
    then scaled to an observed peak of 1000. ``psf_energy`` crops the 32×64×64 kernel to
    the box holding that fraction of its energy (``None``: the full kernel, padded to odd
    sizes, at most 31 × 63 × 63 so that it fits the 32 × 64 × 64 image); the
    ``bars_fullpsf`` case (that largest box) checks that the crop changes little.
    """
    import tifffile

    observation = tifffile.imread(FLOWDEC / "data.tif").astype(np.float64)
    actual = tifffile.imread(FLOWDEC / "actual.tif").astype(np.float64)
    kernel = tifffile.imread(FLOWDEC / "kernel.tif").astype(np.float64)
    kernel = np.pad(kernel, [(0, 1 - n % 2) for n in kernel.shape])
    periodic = np.fft.irfftn(
        np.fft.rfftn(actual)
        * np.fft.rfftn(np.fft.ifftshift(_centre_crop(kernel, actual.shape) / kernel.sum())),
        actual.shape,
    )
    design = np.stack([periodic.ravel(), np.ones(periodic.size)], axis=1)
    (gain, offset), *_ = np.linalg.lstsq(design, observation.ravel(), rcond=None)
    truth = gain * actual + offset
    largest = (31, 63, 63)
    psf = _crop_energy(kernel, psf_energy or 1.0, largest)
    factor = 1000 / observation.max()
    return Case(
        "bars" if psf_energy is not None else "bars_fullpsf",
        observation * factor,
        psf,
        truth * factor,
        [],
        f"flowdec bars-25pct 32×64×64, PSF cropped to {psf.shape} ({psf_energy or 1} of its energy)",
        (),
        offset * factor,
    )


def _centre_crop(a: np.ndarray, shape) -> np.ndarray:
    start = [n // 2 - m // 2 for n, m in zip(a.shape, shape)]
    return a[tuple(slice(s, s + m) for s, m in zip(start, shape))]


LEVELS = {"low": (60.0, 2.0), "high": (600.0, 2.0), "mid": (200.0, 2.0)}
SYNTHETIC = {
    "gauss3d_low": ("volume", "gaussian", "low"),
    "lightsheet3d_low": ("volume", "lightsheet", "low"),
    "lightsheet3d_high": ("volume", "lightsheet", "high"),
    "widefield3d_low": ("volume", "widefield", "low"),
    "widefield3d_high": ("volume", "widefield", "high"),
    "fluo2d_low": ("fluo", "gaussian", "low"),
    "plankton2d": ("plankton", "gaussian", "mid"),
}
DESCRIPTIONS = {
    "gauss3d_low": "beads+filaments+blobs, Gaussian PSF σ (2, 1.2, 1.2) px, z step 3× xy, peak 60 photons",
    "lightsheet3d_low": "beads+filaments+blobs, light-sheet model PSF (NA 0.8, 2 µm sheet), z step 3× xy, peak 60 photons",
    "lightsheet3d_high": "same scene and PSF, peak 600 photons",
    "widefield3d_low": "beads+filaments+blobs, widefield model PSF (NA 1.0 water), z step 2× xy, peak 60 photons",
    "widefield3d_high": "same scene and PSF, peak 600 photons",
    "fluo2d_low": "2D beads+filaments+blobs, Gaussian PSF σ 1.8, peak 60 photons",
    "plankton2d": "2D bright-field-like plankton (dark cells, bright field), Gaussian PSF σ 1.5, 200 photons",
}
CASES = ["bars", "bars_fullpsf", *SYNTHETIC]


def load_case(name: str, full: bool = False, cache: Path | None = None) -> Case:
    """A case by name; ``bars`` needs ``../shared/data/flowdec``.

    With ``cache``, a case is read from ``cache/NAME[_full].npz`` when present and written
    there otherwise (to carry cases to a machine without psfmodels or the shared data).
    """
    if cache is not None:
        path = cache / f"{name}{'_full' if full else ''}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                if {"background", "spot_oracle"} <= meta.keys():  # an older file is rebuilt
                    return Case(
                        name,
                        f["observation"],
                        f["psf"],
                        f["truth"],
                        [tuple(s) for s in meta["spots"]],
                        meta["description"],
                        tuple(meta["voxel_size"]),
                        meta["background"],
                        tuple(meta["spot_oracle"]),
                    )
        case = load_case(name, full)
        cache.mkdir(parents=True, exist_ok=True)
        meta = {
            "spots": [list(map(int, s)) for s in case.spots],
            "description": case.description,
            "voxel_size": list(case.voxel_size),
            "background": case.background,
            "spot_oracle": list(case.spot_oracle),
        }
        np.savez_compressed(
            path, observation=case.observation, psf=case.psf, truth=case.truth, meta=json.dumps(meta)
        )
        return case
    if name.startswith("bars"):
        return bars_case(None if name == "bars_fullpsf" else 0.99)
    return synthetic_case(name, full)
