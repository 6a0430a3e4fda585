"""Iterative wavelet background estimate (Sparse-SIM, Zhao et al., Nat. Biotech. 2022).

Each iteration decomposes the current residual with a discrete wavelet transform, keeps
only the coarsest approximation (all detail bands set to zero) and reconstructs it: that
is the background ``B``. Data above ``B + threshold * sqrt(|data|)`` are clamped to that
value and the estimate is repeated, so bright structures stop pulling the background up.

The threshold is applied to the data scaled to a maximum of 1 (as the CiDeR demo does),
so the result does not depend on the units of the data. 3D volumes are processed plane
by plane (Z slices): light-sheet stacks are often too thin in Z for a deep wavelet
decomposition along that axis.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pywt

from .errors import ImageError

__all__ = ["BackgroundConfig", "wavelet_background", "plane_background"]


@dataclass(frozen=True)
class BackgroundConfig:
    """Parameters of the wavelet background estimate.

    Attributes
    ----------
    enabled : bool
        Whether :func:`cider.restore` estimates and subtracts a background.
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
    wavelet: str = "db6"
    level: int = 7
    iterations: int = 3
    threshold: float = 0.5


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
