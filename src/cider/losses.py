"""Loss terms of the generator fit: SSIM data term, Hessian prior, L1 sparsity.

All terms are **means** over pixels, so their weights do not depend on the image or tile
size (a tiled volume gets the same regularisation in every tile). The upstream demo's
Hessian weight of 8e-7 on a *sum* over a 275 × 275 estimate corresponds to ≈ 0.06 here;
our default, 0.02, was tuned on the Levin benchmark (bench/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["ssim_loss", "ssim_windows", "hessian_penalty", "sparsity_penalty", "variance_stabilised"]


# Added under the square root of the Frobenius norm: far below any curvature the fit
# resolves on its intensity scale (the data's maximum maps to 1).
FROBENIUS_EPS = 1e-6

# SSIM window of the isotropic case (Wang et al. 2004): Gaussian, σ = 1.5 px, 11 px wide.
WINDOW_SIGMA = 1.5
WINDOW_RADIUS = 5


def ssim_windows(ndim: int, spacing: tuple[float, ...] | None = None) -> list[torch.Tensor]:
    """One normalised 1D Gaussian window per spatial axis, of one *physical* width.

    Every axis gets σ = 1.5 finest-axis pixels, i.e. ``1.5 · min(spacing) / spacing[a]``
    of its own pixels, and a radius scaled alike (at least 1). Isotropic: 11 px, σ 1.5 on
    every axis. With a z step 3× the xy pixel, z gets σ 0.5 and 5 px, so SSIM compares
    the same physical neighbourhood along z as along x instead of one 3× deeper.
    """
    relative = [1.0] * ndim if spacing is None else [min(spacing) / s for s in spacing]
    windows = []
    for r in relative:
        sigma = WINDOW_SIGMA * r
        radius = max(1, round(WINDOW_RADIUS * r))
        coords = torch.arange(-radius, radius + 1, dtype=torch.float32)
        g = torch.exp(-(coords**2) / (2 * sigma**2))
        windows.append(g / g.sum())
    return windows


@lru_cache(maxsize=16)
def _windows_on(
    ndim: int, spacing: tuple[float, ...] | None, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """:func:`ssim_windows` on a device, made once: no host-to-device copy per iteration."""
    return tuple(w.to(device, dtype) for w in ssim_windows(ndim, spacing))


def _gaussian_filter(x: torch.Tensor, windows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of (N, C, *spatial) along every axis long enough.

    An axis shorter than its window is not filtered (the statistics are then local in
    the other axes only), as in the reference implementation (pytorch-msssim).
    """
    conv = F.conv2d if x.ndim == 4 else F.conv3d
    channels = x.shape[1]
    for axis, window in enumerate(windows, start=2):
        if x.shape[axis] < window.numel():
            continue
        shape = [1] * x.ndim
        shape[axis] = window.numel()
        weight = window.reshape(shape).expand(channels, *shape[1:])
        x = conv(x, weight, groups=channels)
    return x


def ssim_loss(
    estimate: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    k2: float | torch.Tensor = 0.03,
    per_sample: bool = False,
    spacing: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """``1 − SSIM`` with a Gaussian window, for (N, C, Y, X) or (N, C, Z, Y, X).

    Parameters
    ----------
    estimate, target : torch.Tensor
        One shape.
    data_range : float
        Value range; ``C1 = (0.01 · data_range)²``.
    k2 : float or torch.Tensor
        Sets the contrast–structure constant ``C2 = (k2 · data_range)²`` (standard:
        0.03). Raised above the noise level, it keeps SSIM from rewarding an estimate
        whose local variance copies the noise's (see :func:`cider.fitting.fit_generators`).
        A tensor of shape (N,) gives every sample its own constant.
    per_sample : bool
        Return one loss per sample, shape (N,), instead of their mean.
    spacing : tuple of float, optional
        Voxel size per spatial axis: the window has one physical width on every axis
        (:func:`ssim_windows`). Default: isotropic, 11 px with σ = 1.5 (the standard
        window; the values equal pytorch-msssim's ``ssim`` to float rounding).
    """
    if torch.is_tensor(k2) and k2.ndim:
        k2 = k2.reshape(-1, *([1] * (estimate.ndim - 1)))
    c1 = (0.01 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    spacing = None if spacing is None else tuple(float(s) for s in spacing)
    windows = _windows_on(estimate.ndim - 2, spacing, estimate.device, estimate.dtype)
    # five filter passes: faster on CPU than one pass over the five moments concatenated
    mu1, mu2, xx, yy, xy = (
        _gaussian_filter(m, windows)
        for m in (estimate, target, estimate * estimate, target * target, estimate * target)
    )
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    contrast_structure = (2 * (xy - mu1_mu2) + c2) / ((xx - mu1_sq) + (yy - mu2_sq) + c2)
    ssim_map = (2 * mu1_mu2 + c1) / (mu1_sq + mu2_sq + c1) * contrast_structure
    per_channel = ssim_map.flatten(2).mean(-1)
    value = per_channel.mean(1) if per_sample else per_channel.mean()
    return 1 - value


def _second_differences(
    x: torch.Tensor, spacing: tuple[float, ...] | None = None
) -> list[tuple[torch.Tensor, float, int]]:
    """Pure and mixed second differences of the spatial axes, their weights and counts.

    Weights: 1 (pure) and 2 (mixed), divided by ``h_a h_b`` with ``h`` the voxel spacing
    relative to the finest axis, so the differences estimate *physical* second
    derivatives (in units of the finest pixel). The count is how many entries of the
    symmetric Hessian matrix a difference stands for (1 pure, 2 mixed): the entry is the
    difference times weight / count.
    """
    ndim = x.ndim - 2
    h = [1.0] * ndim if spacing is None else [s / min(spacing) for s in spacing]
    axes = list(range(2, x.ndim))
    terms: list[tuple[torch.Tensor, float, int]] = []
    for i, a in enumerate(axes):
        pure = (
            x.narrow(a, 2, x.shape[a] - 2)
            - 2 * x.narrow(a, 1, x.shape[a] - 2)
            + x.narrow(a, 0, x.shape[a] - 2)
        )
        terms.append((pure, 1.0 / h[i] ** 2, 1))
        for j, b in enumerate(axes[i + 1 :], start=i + 1):
            d = x.narrow(a, 1, x.shape[a] - 1) - x.narrow(a, 0, x.shape[a] - 1)
            terms.append(
                (
                    d.narrow(b, 1, d.shape[b] - 1) - d.narrow(b, 0, d.shape[b] - 1),
                    2.0 / (h[i] * h[j]),
                    2,
                )
            )
    assert len(terms) == ndim * (ndim + 1) // 2
    return terms


def _on_interior(d: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``d`` cropped to the ``n − 2`` interior of every spatial axis of ``shape``.

    A pure difference (``n − 2`` along its axis) is centred on the interior; a mixed one
    (``n − 1`` along its two axes) keeps its first ``n − 2`` samples, half a voxel off.
    """
    for axis in range(2, d.ndim):
        n = shape[axis]
        if d.shape[axis] == n:
            d = d.narrow(axis, 1, n - 2)
        elif d.shape[axis] == n - 1:
            d = d.narrow(axis, 0, n - 2)
    return d


def hessian_penalty(
    x: torch.Tensor,
    spacing: tuple[float, ...] | None = None,
    per_sample: bool = False,
    norm: str = "entries",
) -> torch.Tensor:
    """Mean norm of the Hessian, by default its entries' L1 norm ``|xx| + |yy| + 2|xy|``.

    Parameters
    ----------
    x : torch.Tensor
        Shape (N, C, Y, X) or (N, C, Z, Y, X).
    spacing : tuple of float, optional
        Voxel size per spatial axis (any unit). With a z step 3× the xy pixel, a z second
        difference is divided by 9: the prior then penalises physical curvature equally
        along every axis instead of smoothing z (the coarsest axis) most. Default:
        isotropic pixels.
    per_sample : bool
        Return one value per sample, shape (N,), instead of their mean.
    norm : {"entries", "frobenius"}
        ``entries``: the sum of the entries' absolute values (3D: all six terms, each
        difference averaged over its own grid). ``frobenius``: the Frobenius norm of each
        voxel's Hessian matrix, ``√(xx² + yy² + 2 xy²)``, on the ``n − 2`` interior where
        all entries exist; unlike ``entries`` it does not depend on how the structure
        lies against the axes (bench/README.md, "The loss against the truth", second
        pass, item 8).
    """
    terms = _second_differences(x, spacing)
    if norm == "entries":
        return sum(w * _mean(d.abs(), per_sample) for d, w, _ in terms)
    if norm != "frobenius":
        raise ValueError(f"hessian_penalty: norm must be 'entries' or 'frobenius', got {norm!r}")
    squares = sum(count * (_on_interior(d, x.shape) * (w / count)) ** 2 for d, w, count in terms)
    # FROBENIUS_EPS keeps the gradient finite where the estimate is flat (all entries 0)
    return _mean((squares + FROBENIUS_EPS**2).sqrt(), per_sample)


# The stabilising offset is at least this × the mean signal: the transform's slope at zero
# is then at most √3 ≈ 1.7× its slope at the mean. Without a floor, shot-noise-dominated
# data (offset 0.03 × the mean on the 600-photon light-sheet case) made the fit stiff in
# the dark background and its loss curve erratic; 0.5 scored best of 0.25 / 0.5 / 1 over
# the five 3D cases at 1000 it. (H100, two seeds; bench/README.md, "Variance-stabilised
# Hessian").
LEAST_OFFSET = 0.5


def variance_stabilised(
    x: torch.Tensor, gain: torch.Tensor, floor: torch.Tensor, level: torch.Tensor
) -> torch.Tensor:
    """Generalised Anscombe transform of ``x``, scaled to slope 1 at the mean ``level``.

    ``2 √(m + c) · (√(x + c) − √c)`` with ``c = floor / gain`` (the signal at which shot
    noise equals read noise) and ``m = level``: under noise of variance ``gain · x +
    floor`` its noise is uniform, and near ``m`` it equals ``x`` to first order, so a
    prior weight keeps its meaning at the mean signal. A structure ``A`` above ``m`` costs
    a prior ∝ √A instead of ∝ A: bright beads are smoothed less than on the intensity
    scale, dim background more. Pure Gaussian noise (``gain`` → 0) gives ``x`` (``c`` is
    capped at 10⁶ ``m``); ``c`` is at least :data:`LEAST_OFFSET` ``m``. Written as
    ``x / (√(x + c) + √c)`` to keep float precision.

    Parameters
    ----------
    x : torch.Tensor
        Non-negative estimate, (N, C, *spatial).
    gain, floor, level : torch.Tensor
        Noise variance per unit signal, noise variance at zero signal and mean signal,
        each broadcastable to ``x`` (one value per sample).
    """
    offset = torch.minimum(floor / gain.clamp_min(1e-30), 1e6 * level.clamp_min(1e-12))
    offset = torch.maximum(offset, LEAST_OFFSET * level)
    return 2 * (level + offset).sqrt() * x / ((x + offset).sqrt() + offset.sqrt())


def sparsity_penalty(x: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Mean absolute value (L1 sparsity prior for fluorescence data)."""
    return _mean(x.abs(), per_sample)


def _mean(x: torch.Tensor, per_sample: bool) -> torch.Tensor:
    return x.flatten(1).mean(1) if per_sample else x.mean()
