"""Point-spread functions: validation, normalisation, Gaussian and optical models.

Convention: a PSF is applied by **convolution**, ``y = x ⊛ psf`` (as in optics and in
``scipy.ndimage.convolve``). A kernel given as a cross-correlation filter (for example
the Levin et al. benchmark kernels) must be flipped first: ``psf = kernel[::-1, ::-1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import PsfError

__all__ = [
    "clean_psf",
    "crop_to_energy",
    "psf_centroid",
    "validate_psf",
    "normalize_psf",
    "gaussian_psf",
    "widefield_psf",
    "lightsheet_psf",
]


def validate_psf(psf: np.ndarray, image_shape: Sequence[int] | None = None, name: str = "psf") -> np.ndarray:
    """Check a PSF and return it as float64 normalised to sum 1.

    Parameters
    ----------
    psf : np.ndarray
        The PSF, 2D (Y, X) or 3D (Z, Y, X).
    image_shape : sequence of int, optional
        Spatial shape of the image it will be used on. The PSF must have the same number
        of dimensions and must not be larger than the image along any axis.
    name : str
        Where the PSF came from (a file name), used in error messages.

    Returns
    -------
    np.ndarray
        Float64 PSF with odd size along every axis, summing to 1.

    Raises
    ------
    PsfError
        If the PSF is empty, not finite, has negative values, sums to zero, has the
        wrong number of dimensions, or is larger than the image. An even-sized axis is
        padded by one zero on its high side (the centre moves by half a pixel); see
        :func:`normalize_psf`.
    """
    psf = np.asarray(psf)
    if psf.size == 0:
        raise PsfError(f"{name}: the PSF is empty (shape {psf.shape}); give a non-empty array")
    if not np.issubdtype(psf.dtype, np.number) or np.iscomplexobj(psf):
        raise PsfError(f"{name}: the PSF must be real numbers, got dtype {psf.dtype}")
    psf = psf.astype(np.float64)
    if not np.all(np.isfinite(psf)):
        raise PsfError(f"{name}: the PSF contains NaN or infinite values; fix or regenerate it")
    if psf.min() < 0:
        raise PsfError(
            f"{name}: the PSF has negative values (min {psf.min():.3g}); a PSF is an intensity "
            "distribution, so subtract its background and clip at 0 before use"
        )
    if psf.sum() <= 0:
        raise PsfError(f"{name}: the PSF sums to zero; it must contain some positive values")
    if image_shape is not None:
        image_shape = tuple(int(n) for n in image_shape)
        if psf.ndim != len(image_shape):
            raise PsfError(
                f"{name}: the PSF is {psf.ndim}D (shape {psf.shape}) but the image is "
                f"{len(image_shape)}D (shape {image_shape}); give a PSF with one axis per image axis"
            )
    elif psf.ndim not in (2, 3):
        raise PsfError(f"{name}: the PSF must be 2D or 3D, got shape {psf.shape}")
    psf = normalize_psf(psf)
    if image_shape is not None and any(k > n for k, n in zip(psf.shape, image_shape)):
        raise PsfError(
            f"{name}: the PSF (shape {psf.shape}) is larger than the image (shape "
            f"{image_shape}); crop the PSF to its support or use a larger image/tile"
        )
    return psf


def normalize_psf(psf: np.ndarray) -> np.ndarray:
    """Return ``psf`` with odd size on every axis and sum 1.

    An even-sized axis gets one zero plane appended at its end so that the centre pixel
    is well defined (index ``n // 2``), as the FFT code assumes.
    """
    psf = np.asarray(psf, dtype=np.float64)
    pad = [(0, 1 - n % 2) for n in psf.shape]
    if any(p for _, p in pad):
        psf = np.pad(psf, pad)
    return psf / psf.sum()


def _as_tuple(value: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    values = (float(value),) * ndim if np.isscalar(value) else tuple(map(float, value))
    if len(values) != ndim:
        raise PsfError(f"expected {ndim} values (one per axis), got {len(values)}: {values}")
    return values


def gaussian_psf(
    sigma: float | Sequence[float], ndim: int = 2, size: int | Sequence[int] | None = None
) -> np.ndarray:
    """Sampled Gaussian PSF.

    Parameters
    ----------
    sigma : float or sequence of float
        Standard deviation in pixels, one value or one per axis (Z, Y, X order).
    ndim : int
        Number of dimensions when ``sigma`` is a single value.
    size : int or sequence of int, optional
        Odd size per axis; default ``2 * ceil(4 * sigma) + 1``.

    Returns
    -------
    np.ndarray
        Float64 PSF summing to 1.
    """
    if not np.isscalar(sigma):
        ndim = len(sigma)
    sigmas = _as_tuple(sigma, ndim)
    if min(sigmas) <= 0:
        raise PsfError(f"Gaussian PSF: sigma must be > 0, got {sigmas}")
    sizes = (
        tuple(2 * int(np.ceil(4 * s)) + 1 for s in sigmas)
        if size is None
        else tuple(int(n) for n in _as_tuple(size, ndim))
    )
    grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in sizes], indexing="ij")
    psf = np.exp(-0.5 * sum((g / s) ** 2 for g, s in zip(grids, sigmas)))
    return normalize_psf(psf)


def widefield_psf(
    shape: Sequence[int],
    voxel_size: Sequence[float],
    wavelength: float,
    na: float,
    immersion_index: float = 1.515,
    sample_index: float = 1.515,
) -> np.ndarray:
    """Widefield PSF from optical parameters (Gibson–Lanni scalar model).

    Uses the maintained ``psfmodels`` package. Distances are in micrometres.

    Parameters
    ----------
    shape : (nz, ny, nx) or (ny, nx)
        Odd PSF size in pixels; a 2D shape returns the in-focus plane.
    voxel_size : (dz, dy, dx) or (dy, dx)
        Sampling in µm (dy must equal dx).
    wavelength : float
        Emission wavelength in µm.
    na : float
        Numerical aperture of the detection objective.
    immersion_index, sample_index : float
        Refractive indices of the immersion medium and the sample.
    """
    import psfmodels

    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or len(voxel_size) != len(shape):
        raise PsfError(f"widefield PSF: shape {shape} and voxel_size {voxel_size} must both be 2D or 3D")
    if na <= 0 or na >= immersion_index:
        raise PsfError(f"widefield PSF: NA must be in (0, immersion index {immersion_index}), got {na}")
    nz = shape[0] if len(shape) == 3 else 1
    dz = voxel_size[0] if len(shape) == 3 else 0.1
    ny, nx = shape[-2:]
    size = max(ny, nx) | 1
    psf = psfmodels.make_psf(
        nz,
        size,
        dxy=float(voxel_size[-1]),
        dz=float(dz),
        NA=na,
        wvl=wavelength,
        ni=immersion_index,
        ni0=immersion_index,
        ns=sample_index,
        model="scalar",
    )
    cy, cx = size // 2, size // 2
    psf = psf[:, cy - ny // 2 : cy + ny // 2 + 1, cx - nx // 2 : cx + nx // 2 + 1]
    return normalize_psf(psf if len(shape) == 3 else psf[0])


def lightsheet_psf(
    shape: Sequence[int],
    voxel_size: Sequence[float],
    wavelength: float,
    na: float,
    sheet_thickness: float,
    immersion_index: float = 1.333,
    sample_index: float = 1.333,
) -> np.ndarray:
    """Light-sheet PSF: widefield detection PSF times a Gaussian sheet profile in Z.

    The illumination sheet is modelled as a Gaussian along Z whose full width at half
    maximum is ``sheet_thickness`` (µm); it is constant across the field of view. This
    is the usual first-order model for a (static or scanned Gaussian) light sheet.
    """
    if len(shape) != 3:
        raise PsfError(f"light-sheet PSF: needs a 3D shape (nz, ny, nx), got {tuple(shape)}")
    if sheet_thickness <= 0:
        raise PsfError(f"light-sheet PSF: sheet_thickness must be > 0 µm, got {sheet_thickness}")
    detection = widefield_psf(shape, voxel_size, wavelength, na, immersion_index, sample_index)
    z = (np.arange(detection.shape[0]) - detection.shape[0] // 2) * voxel_size[0]
    sigma = sheet_thickness / (2 * np.sqrt(2 * np.log(2)))
    sheet = np.exp(-0.5 * (z / sigma) ** 2)
    return normalize_psf(detection * sheet[:, None, None])


def psf_centroid(psf: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre of ``psf`` in pixels (index coordinates)."""
    psf = np.asarray(psf, dtype=np.float64)
    grids = np.meshgrid(*[np.arange(n) for n in psf.shape], indexing="ij")
    return np.array([float((g * psf).sum() / psf.sum()) for g in grids])


def _border(psf: np.ndarray) -> np.ndarray:
    mask = np.zeros(psf.shape, bool)
    for axis in range(psf.ndim):
        index = [slice(None)] * psf.ndim
        for edge in (0, -1):
            index[axis] = edge
            mask[tuple(index)] = True
    return psf[mask]


def _fourier_shift(psf: np.ndarray, shift: Sequence[float]) -> np.ndarray:
    """Shift by a sub-pixel amount (exact for a band-limited PSF), on a grid padded by 4 px."""
    pad = 4
    padded = np.pad(psf, pad)
    spectrum = np.fft.fftn(padded)
    phase = np.zeros(padded.shape)
    for axis, (n, d) in enumerate(zip(padded.shape, shift)):
        freq = np.fft.fftfreq(n).reshape([-1 if a == axis else 1 for a in range(psf.ndim)])
        phase = phase + freq * d
    shifted = np.fft.ifftn(spectrum * np.exp(-2j * np.pi * phase)).real
    return shifted[tuple(slice(pad, pad + n) for n in psf.shape)]


def _resample(psf: np.ndarray, psf_voxel: Sequence[float], image_voxel: Sequence[float]) -> np.ndarray:
    """Linear resampling of a centred PSF from its voxel size to the image's, keeping its centre."""
    import torch

    factors = [p / i for p, i in zip(psf_voxel, image_voxel)]  # image pixels per PSF pixel
    centre = [(n - 1) / 2 for n in psf.shape]
    half = [int(np.floor(c * f)) for c, f in zip(centre, factors)]
    out_shape = [2 * h + 1 for h in half]
    # Sample positions in the PSF's index space, as grid_sample's [-1, 1] (align_corners).
    axes = [(np.arange(m) - h) / f / max(c, 1e-9) for m, h, f, c in zip(out_shape, half, factors, centre)]
    mesh = np.meshgrid(*axes, indexing="ij")
    grid = np.stack(mesh[::-1], axis=-1)[None]  # grid_sample wants (x, y[, z]) order
    source = torch.as_tensor(psf, dtype=torch.float64)[None, None]
    sampled = torch.nn.functional.grid_sample(
        source, torch.as_tensor(grid), mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return sampled[0, 0].numpy() * float(np.prod(factors))


def crop_to_energy(psf: np.ndarray, energy: float) -> np.ndarray:
    """Smallest centred box (odd sizes) holding ``energy`` of the sum, grown one axis at a time."""
    total = psf.sum()
    centre = [n // 2 for n in psf.shape]
    half = [0] * psf.ndim

    def box(h):
        return tuple(slice(c - k, c + k + 1) for c, k in zip(centre, h))

    while psf[box(half)].sum() < energy * total:
        gains = []
        for axis in range(psf.ndim):
            trial = list(half)
            trial[axis] += 1
            ok = trial[axis] <= centre[axis]
            gains.append(psf[box(trial)].sum() if ok else -1.0)
        if max(gains) < 0:
            break
        half[int(np.argmax(gains))] += 1
    return psf[box(half)]


def clean_psf(
    psf: np.ndarray,
    name: str = "psf",
    psf_voxel_size: Sequence[float] | None = None,
    image_voxel_size: Sequence[float] | None = None,
    remove_pedestal: bool = True,
    recentre: bool = True,
    energy: float = 0.9999,
) -> tuple[np.ndarray, list[str]]:
    """Make a measured PSF safe to use, saying what was changed.

    Steps, in order (each reported in the returned notes):

    1. **Pedestal**: the median of the border voxels (camera offset, background of a bead
       stack) is subtracted and the result clipped at 0 when it exceeds 0.1 % of the peak.
    2. **Sampling**: a PSF sampled at ``psf_voxel_size`` is resampled (linearly, about
       its centre) to ``image_voxel_size`` — never applied as if on the image grid.
    3. **Centring**: even sizes get one more pixel (odd sizes have a centre pixel) and the
       intensity centroid is moved onto the centre pixel by a sub-pixel Fourier shift,
       so a shifted PSF cannot shift the result. ``recentre=False`` refuses a PSF whose
       centroid is more than 0.5 px off instead.
    4. **Support**: cropped to the smallest centred box holding ``energy`` of the sum
       (small PSFs are cheaper and fit smaller tiles), then normalised to sum 1.

    Parameters
    ----------
    psf : np.ndarray
        The PSF as measured or computed, 2D or 3D.
    name : str
        Where it came from (a file or config key), used in notes and errors.
    psf_voxel_size, image_voxel_size : sequence of float, optional
        Sampling of the PSF and of the image (same units, one per axis); both or neither.
    remove_pedestal, recentre : bool
        Switch steps 1 and 3.
    energy : float
        Fraction of the PSF's sum kept by the crop (1 = no crop).

    Returns
    -------
    psf, notes
        The cleaned PSF (odd sizes, sum 1) and one line per change made.
    """
    validate_psf(psf, name=name)  # the errors (NaN, negative, empty, ...)
    psf = np.asarray(psf, dtype=np.float64)
    psf = psf / psf.max()
    notes: list[str] = []
    if remove_pedestal:
        pedestal = float(np.median(_border(psf)))
        if pedestal > 1e-3 * psf.max():
            notes.append(
                f"{name}: removed a pedestal (border median) of {100 * pedestal / psf.max():.1f} % of the peak"
            )
            psf = np.clip(psf - pedestal, 0, None)
    if (psf_voxel_size is None) != (image_voxel_size is None):
        raise PsfError(f"{name}: give both the PSF's and the image's voxel size, or neither")
    if psf_voxel_size is not None:
        psf_voxel = _as_tuple(psf_voxel_size, psf.ndim)
        image_voxel = _as_tuple(image_voxel_size, psf.ndim)
        if not np.allclose(psf_voxel, image_voxel, rtol=1e-3):
            centred = _fourier_shift(psf, (np.array(psf.shape) - 1) / 2 - psf_centroid(psf))
            psf = np.clip(_resample(centred, psf_voxel, image_voxel), 0, None)
            notes.append(
                f"{name}: resampled from voxel size {psf_voxel} to the image's {image_voxel} "
                f"(now shape {psf.shape})"
            )
    if any(n % 2 == 0 for n in psf.shape):
        psf = np.pad(psf, [(0, 1 - n % 2) for n in psf.shape])
        notes.append(f"{name}: even size padded to {psf.shape}")
    offset = np.array([n // 2 for n in psf.shape]) - psf_centroid(psf)
    if np.abs(offset).max() > 0.05:
        if not recentre:
            if np.abs(offset).max() > 0.5:
                raise PsfError(
                    f"{name}: the PSF's centroid is {tuple(round(float(-d), 2) for d in offset)} px from its centre "
                    "pixel; the result would be shifted by as much. Recentre it (psf.recentre: true)"
                )
        else:
            psf = np.clip(_fourier_shift(psf, offset), 0, None)
            moved = tuple(round(float(d), 2) for d in offset)
            notes.append(f"{name}: centroid moved by {moved} px onto the centre pixel")
    if energy < 1:
        cropped = crop_to_energy(psf, energy)
        if cropped.shape != psf.shape:
            notes.append(f"{name}: cropped from {psf.shape} to {cropped.shape} ({energy:.4%} of its energy)")
            psf = cropped
    return normalize_psf(psf), notes
