"""Bead photometry: restored peaks, spot intensities and flux against RL and the truth.

    python bench/beads.py                        # both Hessian domains, 300 and 1000 it.
    python bench/beads.py --iterations 150 --domains stabilised
    python bench/beads.py --domains stabilised --set data_weight=100 --iterations 1000 3000 --tag _fluorescence

Fields (``microscopy_data.bead_field``): point-like beads (one pixel each) blurred by a
Gaussian PSF (σ 2 px), Poisson noise, 64 × 64 px, beads ≥ 10 px apart: a field of 12
beads at 400 and at 2,000 photons per bead (two seeds at 400) and a single bead at 400.
For each, CiDeR (package defaults, ``rl_iterations`` 20, the given ``hessian_domain``
and iteration count, ``--set`` overrides: ``data_weight=100`` with ``stabilised`` is
``cider.FLUORESCENCE``) and RL at 100 iterations (what issue #12 compares peaks with).

Reported per row: restored peak, RL(100)'s peak and the truth's; total flux error of
the field (% of the truth's); median error of the integrated spot intensity (9-px
boxes, %), next to RL(100)'s, the data's own and an oracle's: the bead amplitudes fitted
by Poisson maximum likelihood with the bead positions and the PSF known (RL on the bead
pixels alone), the floor that the field's noise sets (a 240–400-photon bead's Poisson
noise alone is 5–6.5 %); the median of the background (far from every bead) relative to
the peak.
Writes ``bench/results/beads{tag}.json`` and ``bench/results/beads{tag}.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from microscopy_data import background_median, bead_field, box_sums  # noqa: E402
from overrides import parse_overrides  # noqa: E402

from cider import RestoreConfig  # noqa: E402
from cider.restore import (  # noqa: E402
    crop_to_image,
    deconvolved_features,
    fit_generator,
    prepare,
    to_data_units,
)
from cider.rl import richardson_lucy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = {  # name: (seed, photons per bead, number of beads)
    "field_400_s0": (0, 400.0, 12),
    "field_400_s2": (2, 400.0, 12),
    "field_2000_s1": (1, 2000.0, 12),
    "single_400_s3": (3, 400.0, 1),
}


def rl100(observation: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """RL at 100 iterations on the image's grid: the valid-boundary estimate cropped as the
    CiDeR estimate is (its border, which few data constrain, can hold RL's largest value:
    1094 against 192 inside on ``field_400_s0``)."""
    return crop_to_image(richardson_lucy(torch.tensor(observation), psf, 100), psf.shape).numpy()


def oracle(observation: np.ndarray, psf: np.ndarray, spots) -> np.ndarray:
    """The bead amplitudes that best explain the data (Poisson maximum likelihood) when the
    bead positions and the PSF are known: RL on the object grid started from zero
    everywhere but the bead pixels, which its multiplicative update keeps at zero, on the
    image's grid. No method that has to find the beads can be expected to do better."""
    offset = [k // 2 for k in psf.shape]
    grid = tuple(n + k - 1 for n, k in zip(observation.shape, psf.shape))
    start = torch.zeros(grid, dtype=torch.float64)
    for spot in spots:
        start[tuple(c + o for c, o in zip(spot, offset))] = float(observation.mean())
    estimate = richardson_lucy(torch.tensor(observation), psf, 3000, init=start)
    return crop_to_image(estimate, psf.shape).numpy()


def spot_error(image: np.ndarray, truth: np.ndarray, spots) -> float:
    """Median |error| of the integrated spot intensities (9-px boxes), in %."""
    return round(100 * float(np.median(np.abs(box_sums(image, spots) / box_sums(truth, spots) - 1))), 2)


def run_field(name: str, domain: str, iterations: int, overrides: dict | None = None) -> dict:
    seed, photons, count = FIELDS[name]
    observation, psf, truth, spots = bead_field(seed, photons, gap=10, count=count)
    config = RestoreConfig(
        iterations=iterations, rl_iterations=20, hessian_domain=domain, **(overrides or {})
    )
    start = time.perf_counter()
    prepared = prepare(observation, psf, config)
    fit = fit_generator(deconvolved_features(prepared, config), prepared, config)
    restored = to_data_units(fit.estimate, prepared)
    seconds = time.perf_counter() - start
    rl = rl100(observation, psf)
    return {
        "field": name,
        "photons": photons,
        "beads": count,
        "hessian_domain": domain,
        "iterations": iterations,
        "overrides": overrides or {},
        "peak": round(float(restored.max()), 1),
        "rl100_peak": round(float(rl.max()), 1),
        "truth_peak": round(float(truth.max()), 1),
        "peak_over_rl100": round(float(restored.max() / rl.max()), 3),
        "flux_err_pct": round(100 * float(restored.sum() / truth.sum() - 1), 2),
        "spot_err_pct": spot_error(restored, truth, spots),
        "rl100_spot_err_pct": spot_error(rl, truth, spots),
        "data_spot_err_pct": spot_error(observation, truth, spots),
        "oracle_spot_err_pct": spot_error(oracle(observation, psf, spots), truth, spots),
        "background_over_peak": round(background_median(restored, spots) / float(restored.max()), 6),
        "seconds": round(seconds, 1),
    }


def table(rows: list[dict], device: str) -> str:
    overrides = ", ".join(sorted({f"{k}={v}" for r in rows for k, v in r.get("overrides", {}).items()}))
    lines = [
        f"# Bead photometry ({device})",
        "",
        "Generated by `bench/beads.py`; fields and columns are described in its docstring."
        + (f" Settings: {overrides}." if overrides else ""),
        "",
        "| field | Hessian domain | it. | peak | RL(100) peak | truth peak | peak / RL(100) | flux err % "
        "| spot err % | RL(100) spot err % | data spot err % | oracle spot err % | background / peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['field']} | {r['hessian_domain']} | {r['iterations']} | {r['peak']} | {r['rl100_peak']} | "
            f"{r['truth_peak']} | {r['peak_over_rl100']} | {r['flux_err_pct']} | {r['spot_err_pct']} | "
            f"{r['rl100_spot_err_pct']} | {r['data_spot_err_pct']} | {r['oracle_spot_err_pct']} | "
            f"{r['background_over_peak']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", nargs="+", default=list(FIELDS), choices=list(FIELDS))
    parser.add_argument("--domains", nargs="+", default=["intensity", "stabilised"])
    parser.add_argument("--iterations", nargs="+", type=int, default=[300, 1000])
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="RestoreConfig overrides")
    parser.add_argument("--tag", default="", help="suffix of the result files (beads{tag}.json)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set, refused=("iterations", "hessian_domain", "rl_iterations"))
    torch.manual_seed(0)
    rows = [
        run_field(name, domain, iterations, overrides)
        for name in args.fields
        for domain in args.domains
        for iterations in args.iterations
    ]
    device = f"CPU, {torch.get_num_threads()} thread(s)"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"beads{args.tag}.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    (args.out / f"beads{args.tag}.md").write_text(table(rows, device))
    for r in rows:
        print(r)
    return rows


if __name__ == "__main__":
    main()
