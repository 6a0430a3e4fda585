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
    estimate: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, k2: float = 0.03
) -> torch.Tensor:
    """``1 − SSIM`` with an 11-px Gaussian window (σ = 1.5), for (N,C,Y,X) or (N,C,Z,Y,X).

    ``k2`` sets the contrast–structure constant ``C2 = (k2 · data_range)²`` (standard:
    0.03). Raised above the noise level, it keeps SSIM from rewarding an estimate whose
    local variance copies the noise's (see :func:`cider.restore.fit_generator`).
    """
    return 1 - ssim(estimate, target, data_range=data_range, win_size=11, win_sigma=1.5, K=(0.01, k2))


def _second_differences(x: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """Pure and mixed second differences of the spatial axes with their weights (1 or 2)."""
    ndim = x.ndim - 2
    axes = list(range(2, x.ndim))
    terms: list[tuple[torch.Tensor, float]] = []
    for i, a in enumerate(axes):
        pure = (
            x.narrow(a, 2, x.shape[a] - 2)
            - 2 * x.narrow(a, 1, x.shape[a] - 2)
            + x.narrow(a, 0, x.shape[a] - 2)
        )
        terms.append((pure, 1.0))
        for b in axes[i + 1 :]:
            d = x.narrow(a, 1, x.shape[a] - 1) - x.narrow(a, 0, x.shape[a] - 1)
            terms.append((d.narrow(b, 1, d.shape[b] - 1) - d.narrow(b, 0, d.shape[b] - 1), 2.0))
    assert len(terms) == ndim * (ndim + 1) // 2
    return terms


def hessian_penalty(x: torch.Tensor) -> torch.Tensor:
    """Mean L1 norm of the Hessian: ``|xx| + |yy| + 2|xy|`` (3D: all six terms).

    Parameters
    ----------
    x : torch.Tensor
        Shape (N, C, Y, X) or (N, C, Z, Y, X).
    """
    return sum(w * d.abs().mean() for d, w in _second_differences(x))


def sparsity_penalty(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute value (L1 sparsity prior for fluorescence data)."""
    return x.abs().mean()
