"""Loss terms of the generator fit: SSIM data term, Hessian prior, L1 sparsity.

All terms are **means** over pixels, so their weights do not depend on the image or tile
size (a tiled volume gets the same regularisation in every tile). The upstream demo's
Hessian weight of 8e-7 on a *sum* over a 275 × 275 estimate corresponds to ≈ 0.06 here;
our default, 0.02, was tuned on the Levin benchmark (bench/README.md).
"""

from __future__ import annotations

import torch
from pytorch_msssim import ssim

__all__ = ["ssim_loss", "hessian_penalty", "sparsity_penalty"]


def ssim_loss(
    estimate: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    k2: float | torch.Tensor = 0.03,
    per_sample: bool = False,
) -> torch.Tensor:
    """``1 − SSIM`` with an 11-px Gaussian window (σ = 1.5), for (N,C,Y,X) or (N,C,Z,Y,X).

    ``k2`` sets the contrast–structure constant ``C2 = (k2 · data_range)²`` (standard:
    0.03). Raised above the noise level, it keeps SSIM from rewarding an estimate whose
    local variance copies the noise's (see :func:`cider.fitting.fit_generators`). A
    tensor ``k2`` of shape (N,) gives every sample its own constant.
    ``per_sample``: return one loss per sample, shape (N,), instead of their mean.
    """
    if torch.is_tensor(k2) and k2.ndim:
        k2 = k2.reshape(-1, *([1] * (estimate.ndim - 1)))
    value = ssim(
        estimate,
        target,
        data_range=data_range,
        win_size=11,
        win_sigma=1.5,
        K=(0.01, k2),
        size_average=not per_sample,
    )
    return 1 - value


def _second_differences(
    x: torch.Tensor, spacing: tuple[float, ...] | None = None
) -> list[tuple[torch.Tensor, float]]:
    """Pure and mixed second differences of the spatial axes with their weights.

    Weights: 1 (pure) and 2 (mixed), divided by ``h_a h_b`` with ``h`` the voxel spacing
    relative to the finest axis, so the differences estimate *physical* second
    derivatives (in units of the finest pixel).
    """
    ndim = x.ndim - 2
    h = [1.0] * ndim if spacing is None else [s / min(spacing) for s in spacing]
    axes = list(range(2, x.ndim))
    terms: list[tuple[torch.Tensor, float]] = []
    for i, a in enumerate(axes):
        pure = (
            x.narrow(a, 2, x.shape[a] - 2)
            - 2 * x.narrow(a, 1, x.shape[a] - 2)
            + x.narrow(a, 0, x.shape[a] - 2)
        )
        terms.append((pure, 1.0 / h[i] ** 2))
        for j, b in enumerate(axes[i + 1 :], start=i + 1):
            d = x.narrow(a, 1, x.shape[a] - 1) - x.narrow(a, 0, x.shape[a] - 1)
            terms.append(
                (d.narrow(b, 1, d.shape[b] - 1) - d.narrow(b, 0, d.shape[b] - 1), 2.0 / (h[i] * h[j]))
            )
    assert len(terms) == ndim * (ndim + 1) // 2
    return terms


def hessian_penalty(
    x: torch.Tensor, spacing: tuple[float, ...] | None = None, per_sample: bool = False
) -> torch.Tensor:
    """Mean L1 norm of the Hessian: ``|xx| + |yy| + 2|xy|`` (3D: all six terms).

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
    """
    return sum(w * _mean(d.abs(), per_sample) for d, w in _second_differences(x, spacing))


def sparsity_penalty(x: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Mean absolute value (L1 sparsity prior for fluorescence data)."""
    return _mean(x.abs(), per_sample)


def _mean(x: torch.Tensor, per_sample: bool) -> torch.Tensor:
    return x.flatten(1).mean(1) if per_sample else x.mean()
