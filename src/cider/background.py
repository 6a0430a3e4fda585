"""Background estimates: a smooth wavelet background or one flat level per image.

**Wavelet** (``method="wavelet"``; Sparse-SIM, Zhao et al., Nat. Biotech. 2022). Each
iteration decomposes the current residual with a discrete wavelet transform, keeps
only the coarsest approximation (all detail bands set to zero) and reconstructs it: that
is the background ``B``. Data above ``B + threshold * sqrt(|data|)`` are clamped to that
value and the estimate is repeated, so bright structures stop pulling the background up.

The threshold is applied to the data scaled to a maximum of 1 (as the CiDeR demo does),
so the result does not depend on the units of the data. 3D volumes are processed plane
by plane (Z slices): light-sheet stacks are often too thin in Z for a deep wavelet
decomposition along that axis. It follows uneven illumination and autofluorescence, but
it is a local estimate: faint objects that cover much of an image (a dense field of dim
beads) are partly taken in as background.

**Flat** (``method="flat"``): one constant per image, the mean of the pixels that no
detected object reaches. Objects are detected on the data filtered by the PSF (a matched
filter, the PSF summed over Z in 3D), ``flat_threshold`` noise standard deviations above
the current level; every pixel within the PSF's radius (95 % of its energy) of a
detection is left out, and the level and the detections are re-estimated a few times.
For a camera offset plus a uniform background under faint spots, where the wavelet
estimate takes in the spots. The mean, not a median: Poisson counts are integers, and a
median is off by up to half a count, which the flux of faint spots does not survive.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pywt
from scipy import ndimage, signal

from .errors import CiderError, ImageError

__all__ = [
    "BackgroundConfig",
    "estimate_background",
    "flat_background",
    "flat_level",
    "flat_plane_sums",
    "detection_kernel",
    "wavelet_background",
    "plane_background",
]

BACKGROUND_METHODS = ("wavelet", "flat")
FLAT_ROUNDS = 6  # detect-and-re-estimate rounds of the flat level
FLAT_ENERGY = 0.95  # PSF energy within the radius left out around each detection


@dataclass(frozen=True)
class BackgroundConfig:
    """Parameters of the wavelet background estimate.

    Attributes
    ----------
    enabled : bool
        Whether :func:`cider.restore` estimates and subtracts a background.
    method : {"wavelet", "flat"}
        A smooth wavelet background, or one flat level per image (see the module
        docstring).
    flat_threshold : float
        ``flat``: detection threshold, in noise standard deviations of the PSF-filtered
        data (4: 3 × 10⁻⁵ false detections per pixel; a lower threshold leaves out more
        noise peaks and biases the level low: on 30 draws of a field of 25 faint beads
        on 100 photons, mean −0.12 photons at 3, −0.06 at 4, standard deviation 0.17).
    wavelet : str
        PyWavelets wavelet name.
    level : int
        Decomposition level (lowered to ``log2`` of the smaller plane side if larger).
    iterations : int
        Number of clamp-and-re-estimate iterations.
    threshold : float
        Clamp data above ``B + threshold * sqrt(|data|)`` (data scaled to max 1).
    """

    enabled: bool = False
    method: str = "wavelet"
    flat_threshold: float = 4.0
    wavelet: str = "db6"
    level: int = 7
    iterations: int = 3
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in BACKGROUND_METHODS:
            raise CiderError(f"background.method must be one of {BACKGROUND_METHODS}, got {self.method!r}")
        if self.flat_threshold <= 0:
            raise CiderError(f"background.flat_threshold must be positive, got {self.flat_threshold!r}")

    @property
    def is_map(self) -> bool:
        """Whether the background is an array the size of the image (wavelet), not a level."""
        return self.enabled and self.method == "wavelet"


def plane_background(plane: np.ndarray, config: BackgroundConfig, peak: float) -> np.ndarray:
    """Background of one 2D plane, with the threshold applied to ``plane / peak``.

    ``peak`` is the largest absolute value of the whole image (2D) or volume, so that the
    planes of a volume processed one at a time get what :func:`wavelet_background` gives.
    """
    plane = np.asarray(plane, dtype=np.float64)
    return _plane_background(plane / peak, config) * peak


def _plane_background(plane: np.ndarray, cfg: BackgroundConfig) -> np.ndarray:
    wavelet = pywt.Wavelet(cfg.wavelet)
    # Like MATLAB's wavedec (used by Sparse-SIM), allow levels beyond PyWavelets'
    # conservative maximum (which would give a far too detailed background on small
    # planes); stop only where the approximation would shrink below one sample.
    level = max(1, min(cfg.level, int(np.log2(min(plane.shape)))))
    residual = plane.copy()
    background = residual
    for _ in range(cfg.iterations):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Level value", category=UserWarning)
            coeffs = pywt.wavedec2(residual, wavelet, level=level, mode="symmetric")
        coeffs = [coeffs[0]] + [tuple(np.zeros_like(d) for d in band) for band in coeffs[1:]]
        background = pywt.waverec2(coeffs, wavelet, mode="symmetric")[: plane.shape[0], : plane.shape[1]]
        ceiling = background + cfg.threshold * np.sqrt(np.abs(residual))
        residual = np.where(plane > ceiling, ceiling, residual)
    return background


def wavelet_background(image: np.ndarray, config: BackgroundConfig | None = None) -> np.ndarray:
    """Estimate a smooth background of a 2D image or a 3D volume (plane-wise).

    Parameters
    ----------
    image : np.ndarray
        2D (Y, X) or 3D (Z, Y, X) data, any non-negative intensity units.
    config : BackgroundConfig, optional
        Wavelet, level, iterations and threshold.

    Returns
    -------
    np.ndarray
        Background in the units of ``image`` (float64, same shape).
    """
    cfg = config or BackgroundConfig()
    image = np.asarray(image, dtype=np.float64)
    if image.ndim not in (2, 3):
        raise ImageError(f"background: expected 2D or 3D data, got shape {image.shape}")
    peak = float(np.abs(image).max()) or 1.0
    scaled = image / peak
    if image.ndim == 2:
        return _plane_background(scaled, cfg) * peak
    return np.stack([_plane_background(plane, cfg) for plane in scaled]) * peak


def estimate_background(image: np.ndarray, config: BackgroundConfig, psf: np.ndarray) -> np.ndarray | float:
    """The background of ``config.method``: an array like ``image`` (wavelet) or a level
    (flat), in the image's units."""
    if config.method == "flat":
        return flat_background(image, psf, config)
    return wavelet_background(image, config)


def detection_kernel(psf: np.ndarray) -> np.ndarray:
    """The 2D matched filter of the flat level: the PSF (summed over Z in 3D, so that the
    out-of-focus light of objects in other planes is also caught), summing to 1."""
    kernel = np.asarray(psf, dtype=np.float64)
    kernel = kernel.sum(axis=0) if kernel.ndim == 3 else kernel
    return kernel / kernel.sum()


def _energy_radius(kernel: np.ndarray, energy: float = FLAT_ENERGY) -> float:
    """Radius (px, from the kernel's centre) that holds ``energy`` of the kernel."""
    axes = [np.arange(n) - (n - 1) / 2 for n in kernel.shape]
    radius = np.hypot(*np.meshgrid(*axes, indexing="ij")).ravel()
    order = np.argsort(radius, kind="stable")
    inside = np.searchsorted(np.cumsum(kernel.ravel()[order]), energy * kernel.sum())
    return float(radius[order][min(inside, radius.size - 1)])


def flat_plane_sums(plane: np.ndarray, kernel: np.ndarray, threshold: float = 4.0) -> tuple[float, int]:
    """Sum and number of one plane's background pixels (see the module docstring).

    Parameters
    ----------
    plane : np.ndarray
        2D data.
    kernel : np.ndarray
        :func:`detection_kernel` of the PSF.
    threshold : float
        Detection threshold in noise standard deviations of the filtered data (the noise
        taken from the variance of the pixels kept, whatever its model).

    Returns
    -------
    (float, int)
        Sum and count of the pixels kept: the level is ``sum / count``, and the planes of
        a volume add up. A round that would keep no pixel is not taken, so the count is
        at least one.
    """
    plane = np.asarray(plane, dtype=np.float64)
    pad = [(min(k // 2, n - 1),) * 2 for k, n in zip(kernel.shape, plane.shape)]
    filtered = signal.fftconvolve(np.pad(plane, pad, mode="reflect"), kernel, mode="same")
    filtered = filtered[tuple(slice(a, a + n) for (a, _), n in zip(pad, plane.shape))]
    radius = _energy_radius(kernel)
    spread = float(np.square(kernel).sum())
    keep = np.ones(plane.shape, bool)
    for _ in range(FLAT_ROUNDS):
        values = plane[keep]
        sigma = np.sqrt(values.var() * spread)
        detected = filtered > values.mean() + threshold * sigma
        if not detected.any():
            break
        kept = ndimage.distance_transform_edt(~detected) > radius
        if not kept.any():
            break
        keep = kept
    return float(plane[keep].sum()), int(np.count_nonzero(keep))


def flat_level(
    planes: Iterable[np.ndarray], kernel: np.ndarray, threshold: float = 4.0
) -> tuple[float, float]:
    """The flat level of 2D planes (read one at a time), their background pixels pooled
    (:func:`flat_plane_sums`), and the fraction of their pixels it rests on."""
    total, count, pixels = 0.0, 0, 0
    for plane in planes:
        plane_sum, plane_count = flat_plane_sums(plane, kernel, threshold)
        total, count, pixels = total + plane_sum, count + plane_count, pixels + np.size(plane)
    return total / count, count / pixels


def flat_background(image: np.ndarray, psf: np.ndarray, config: BackgroundConfig | None = None) -> float:
    """One background level for a 2D image or a 3D volume (its planes' background pixels
    pooled, :func:`flat_level`), in the image's units. The pipeline measures a large
    volume's evenly spaced planes, reading one plane at a time."""
    cfg = config or BackgroundConfig(method="flat")
    image = np.asarray(image, dtype=np.float64)
    if image.ndim not in (2, 3):
        raise ImageError(f"background: expected 2D or 3D data, got shape {image.shape}")
    stack = image[None] if image.ndim == 2 else image
    return flat_level(stack, detection_kernel(psf), cfg.flat_threshold)[0]
