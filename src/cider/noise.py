"""Signal-dependent noise model of an observation, estimated from the observation alone.

Camera data are Poisson (shot) noise plus Gaussian read noise; in data units the variance
grows linearly with the expected signal ``s``: ``var = gain · s + floor``. The model is
fitted from one image in the manner of Foi et al. (IEEE TIP 2008): a high-pass of the
image that removes smooth (blurred) signal leaves mostly noise; its robust variance,
binned by the local mean, is fitted by a line.

The high-pass is the diagonal Haar coefficient of non-overlapping 2 × 2 blocks in the last
two axes, ``(a − b − c + d) / 2``: it has unit norm (keeps the noise variance), kills
constant and linear signal exactly, and its samples are independent. A blurred image is
smooth at this scale (PSF σ ≳ 1 px), so the estimate is biased upward only slightly by
structure (the robust median-based variance ignores most of it).

The fit uses this model for its noise-aware weights (Hessian prior, SSIM constant), for
the optional data term and for the optional stopping rule (the discrepancy principle: a
re-blurred estimate that is closer to the data than the noise allows is fitting noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NoiseModel", "estimate_noise", "haar_samples", "fit_noise"]

MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class NoiseModel:
    """Noise variance ``gain · max(signal, 0) + floor`` in the units of the data it came from.

    Attributes
    ----------
    gain : float
        Variance per unit of signal (Poisson part); 0 for purely Gaussian noise.
    floor : float
        Variance at zero signal (read noise), > 0.
    """

    gain: float
    floor: float

    def variance(self, signal):
        """Variance at ``signal`` (numpy array or torch tensor)."""
        return self.gain * signal.clip(min=0) + self.floor

    def scaled(self, factor: float) -> NoiseModel:
        """The same noise for data multiplied by ``factor`` (e.g. scaled to [0, 1])."""
        return NoiseModel(self.gain * factor, self.floor * factor**2)


def haar_samples(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal Haar coefficients and local means of the 2 × 2 blocks of the last two axes
    (the samples :func:`fit_noise` fits; gather them plane by plane for a large volume)."""
    ny, nx = (n - n % 2 for n in image.shape[-2:])
    x = image[..., :ny, :nx]
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return ((a - b - c + d) / 2).ravel(), ((a + b + c + d) / 4).ravel()


def estimate_noise(image: np.ndarray, bins: int = 12, min_count: int = 64) -> NoiseModel:
    """Fit ``var = gain · signal + floor`` to the noise of ``image`` (2D or 3D).

    Parameters
    ----------
    image : np.ndarray
        Observation in data units (background removed or not: the fit uses its own local
        means).
    bins : int
        Number of intensity bins (equal counts) for the variance–mean fit.
    min_count : int
        Fewest samples a bin needs to count.

    Returns
    -------
    NoiseModel
        ``gain ≥ 0``; ``floor`` is at least 1e-6 of the image's variance scale, so the
        model never claims noise-free data.
    """
    image = np.asarray(image, dtype=np.float64)
    detail, mean = haar_samples(image)
    return fit_noise(detail, mean, float(np.ptp(image)), bins, min_count)


def fit_noise(
    detail: np.ndarray, mean: np.ndarray, value_range: float, bins: int = 12, min_count: int = 64
) -> NoiseModel:
    """The fit of :func:`estimate_noise` from Haar samples (:func:`haar_samples`).

    ``value_range`` is the image's max − min (it sets the smallest floor allowed).
    """
    scale = max(value_range, 1e-12)
    if detail.size < 2 * min_count:
        sigma = MAD_TO_SIGMA * float(np.median(np.abs(detail - np.median(detail)))) if detail.size else 0.0
        return NoiseModel(0.0, max(sigma**2, (1e-6 * scale) ** 2))
    order = np.argsort(mean)
    groups = np.array_split(order, max(1, min(bins, detail.size // min_count)))
    centres, variances, weights = [], [], []
    for group in groups:
        d = detail[group]
        sigma = MAD_TO_SIGMA * float(np.median(np.abs(d - np.median(d))))
        centres.append(float(np.median(mean[group])))
        variances.append(sigma**2)
        weights.append(len(group))
    centres_a, variances_a, weights_a = map(np.asarray, (centres, variances, weights))
    design = np.stack([centres_a.clip(min=0), np.ones_like(centres_a)], axis=1)
    sqrt_w = np.sqrt(weights_a)[:, None]
    (gain, floor), *_ = np.linalg.lstsq(design * sqrt_w, variances_a * sqrt_w[:, 0], rcond=None)
    if gain < 0:  # no signal dependence measurable: Gaussian noise
        gain, floor = 0.0, float(np.average(variances_a, weights=weights_a))
    floor = max(float(floor), float(variances_a.min()) * 0.1, (1e-6 * scale) ** 2)
    return NoiseModel(float(gain), floor)
