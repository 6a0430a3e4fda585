"""A Hessian weight per volume without the truth: projected SURE on the voxel minimiser.

bench/README.md, "The loss against the truth", second pass, item 13. For each weight W of
``--weights`` (``hessian_noise_weight``), the fit's loss (``cider.FLUORESCENCE`` with SSIM
off, the case's true flat level subtracted, as ``bench/objective.py`` sets it up) is
minimised over the voxels from a flat start. The estimate's error on what the blur passes,
``|P(x̂ − x)|²`` with ``P = Aᵀ(AAᵀ + δ)⁻¹A``, is then estimated without the truth by
Stein's unbiased risk estimate in its projected form (Ramani et al. 2012,
doi:10.1109/TIP.2012.2183143): a Gaussian noise model with the fit's own variance (signal
dependent), the divergence by Monte-Carlo probes (a second minimisation on data plus
``eps`` of Gaussian noise each). The W of lowest SURE is the pick; the truth's projected
error and PSNR are reported beside it.

Each W costs 1 + ``--probes`` minimisations. ``--steps`` must reach the loss's minimum:
500 Adam steps do at W ≥ 60 on the CPU-sized volumes, not at W 15 / 30 (2,000 do).

    python bench/sure_weight.py --cases gauss3d_low lightsheet3d_low --weights 30 60 120 240 --steps 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from objective import (  # noqa: E402
    CASES_3D,
    FLUORESCENCE_CASES,
    RESULTS,
    VOXEL_RATE,
    _row,
    minimise_voxels,
    setup_case,
)

from cider import FLUORESCENCE, RestoreConfig  # noqa: E402
from cider.fitting import Prepared, start_level  # noqa: E402
from cider.rl import BlurOperator  # noqa: E402

DELTA = 1e-3  # regularises (AAᵀ + δ)⁻¹ in P, relative to the PSF's unit sum
EPS_REL = 0.1  # probe size, × the noise's rms standard deviation (0.02 gives the same)


def gram_solve(
    blur: BlurOperator, r: torch.Tensor, delta: float = DELTA, iterations: int = 200
) -> torch.Tensor:
    """``(AAᵀ + δ)⁻¹ r`` by conjugate gradients, ``A`` the blur (valid model), ``r`` on its
    image grid."""

    def gram(u: torch.Tensor) -> torch.Tensor:
        return blur(blur.adjoint(u)) + delta * u

    u, residual = torch.zeros_like(r), r.clone()
    direction, rr = residual.clone(), (residual * residual).sum()
    for _ in range(iterations):
        applied = gram(direction)
        step = rr / (direction * applied).sum()
        u, residual = u + step * direction, residual - step * applied
        new = (residual * residual).sum()
        if new < 1e-12 * (r * r).sum():
            break
        direction, rr = residual + new / rr * direction, new
    return u


def projected_error(error: torch.Tensor, blur: BlurOperator, delta: float = DELTA) -> float:
    """``eᵀPe = (Ae)ᵀ(AAᵀ + δ)⁻¹(Ae)`` of an object-grid error ``e``."""
    blurred = blur(error)
    return float((blurred * gram_solve(blur, blurred, delta)).sum())


def projected_sure(
    y: torch.Tensor,
    blur: BlurOperator,
    estimate: Callable[[torch.Tensor], torch.Tensor],
    variance: Callable[[torch.Tensor], torch.Tensor],
    probes: int = 1,
    eps_rel: float = EPS_REL,
    delta: float = DELTA,
    seed: int = 1,
    x: torch.Tensor | None = None,
) -> float:
    """Stein's estimate of ``|P(x̂(y) − x)|²`` less the truth's own ``xᵀPx`` (a constant).

    Parameters
    ----------
    y : torch.Tensor
        The data on the image grid, ``y = Ax + n`` with ``n`` Gaussian of ``variance``.
    blur : BlurOperator
        ``A`` (valid model: object grid → image grid).
    estimate : callable
        ``x̂``: data → object-grid estimate.
    variance : callable
        Noise variance per pixel, given the re-blurred estimate.
    probes, eps_rel, seed
        Monte-Carlo probes of the divergence, their size (× the rms noise) and seed.
    x : torch.Tensor, optional
        ``x̂(y)``, when already computed.
    """
    x = estimate(y) if x is None else x
    blurred = blur(x)
    u = gram_solve(blur, blurred, delta)
    noise = variance(blurred)
    eps = eps_rel * float(noise.mean().sqrt())
    generator = torch.Generator().manual_seed(seed)
    divergence = 0.0
    for _ in range(probes):
        b = torch.randn(y.shape, generator=generator, dtype=y.dtype)
        moved = gram_solve(blur, blur(estimate(y + eps * b)), delta)
        divergence += float((noise * b * (moved - u)).sum()) / eps / probes
    return float((blurred * u).sum() - 2 * (u * y).sum()) + 2 * divergence


def voxel_estimator(
    prepared: Prepared, config: RestoreConfig, start: torch.Tensor, steps: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """data → the loss of ``config`` (with ``prepared``'s noise model and PSF) minimised
    over the voxels from ``start``."""

    def estimate(data: torch.Tensor) -> torch.Tensor:
        observed = dataclasses.replace(prepared, observation=data)
        return minimise_voxels(start, observed, config, steps, VOXEL_RATE["flat"])

    return estimate


def run_case(name: str, args: argparse.Namespace) -> list[dict]:
    """One row per weight of ``args.weights``: the pick's inputs (SURE) and the truth's view
    (projected error, PSNR). ``args.seed``: another draw of the case (default its own)."""
    base = RestoreConfig(**{**FLUORESCENCE, "device": "cpu", "ssim_weight": 0.0})
    case, prepared, truth = setup_case(name, base, args.cache, args.seed)
    y = prepared.observation
    blur = BlurOperator(prepared.psf, y.shape, boundary="valid")
    flat = torch.full_like(truth, start_level(prepared))
    constant = projected_error(truth, blur)
    rows = []
    for weight in args.weights:
        start = time.perf_counter()
        config = base.with_(hessian_noise_weight=weight)
        estimate = voxel_estimator(prepared, config, flat, args.steps)
        x = estimate(y)
        sure = projected_sure(y, blur, estimate, prepared.noise.variance, args.probes, x=x)
        rows.append(
            {
                "W": weight,
                "sure": round(sure + constant, 2),
                "projected_error": round(projected_error(x - truth, blur), 2),
                **{k: v for k, v in _row(x, case, prepared, config).items() if k != "loss"},
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(json.dumps({name: rows[-1]}), flush=True)
    return rows


def table(results: dict) -> str:
    """Markdown: per case and W, SURE (+ the truth's constant) against the projected error."""
    lines = [
        "# Projected SURE for the Hessian weight (`bench/sure_weight.py`)",
        "",
        f"{results['command']}; {results['device']}, {results['date']}. SURE is shown plus the "
        "truth's constant xᵀPx, so that it reads against the projected error; **bold**: its pick.",
        "",
        "| case | W | SURE | projected error | PSNR | SSIM |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in results["cases"].items():
        pick = min(rows, key=lambda r: r["sure"])["W"]
        for r in rows:
            w = f"**{r['W']:g}**" if r["W"] == pick else f"{r['W']:g}"
            lines.append(
                f"| {name} | {w} | {r['sure']} | {r['projected_error']} | {r['psnr']} | {r['ssim']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=CASES_3D, choices=FLUORESCENCE_CASES)
    parser.add_argument("--weights", nargs="+", type=float, default=[30, 60, 120, 240])
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps of each minimisation")
    parser.add_argument("--probes", type=int, default=1, help="Monte-Carlo probes of the divergence")
    parser.add_argument("--device-name", default="cpu", help="for the record")
    parser.add_argument("--cache", type=Path, default=None, help="case cache folder")
    parser.add_argument("--seed", type=int, default=None, help="another draw of each case (default: its own)")
    parser.add_argument("--out", type=Path, default=RESULTS / "objective")
    args = parser.parse_args(argv)
    results = {
        "device": args.device_name,
        "date": time.strftime("%Y-%m-%d"),
        "command": "bench/sure_weight.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "cases": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.cases:
        results["cases"][name] = run_case(name, args)
        (args.out / "sure_weight.json").write_text(json.dumps(results, indent=1))
        (args.out / "sure_weight.md").write_text(table(results))
    return results


if __name__ == "__main__":
    main()
