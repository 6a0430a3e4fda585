"""CiDeR's objective against the truth: which estimate does the loss prefer, and is it the
generator or the loss that limits a 3D result?

For the synthetic cases, whose noise-free object on the fit's object grid is known
(:func:`microscopy_data.synthetic_scene`), this evaluates the generator fit's loss
(:func:`cider.fitting.objective_terms`, the settings as the pipeline runs fluorescence:
``cider.FLUORESCENCE``, the true flat background level subtracted, or with ``--level
flat`` the one the pipeline estimates) at:

- ``truth``: the true signal. If the fit's own loss is lower, the loss prefers another
  estimate to the truth (its minimum is biased, e.g. towards fitted noise or smoothness);
- ``voxels``: the loss minimised over the voxels directly (no generator, no features),
  from a flat start: what the loss alone gives, without the generator's implicit prior;
- ``voxels_from_truth``: the same from the truth: how far the loss's minimum near the
  truth is from it;
- ``rl``: RL with the level in its model, at its best iteration (oracle, as ``rl_flat``
  of ``bench/microscopy.py``);
- ``cider`` (``--cider N``): the generator fit of N iterations, and ``cider_voxels``: the
  loss minimised further over the voxels from the fit's estimate (``cider_voxels_S`` for
  each of several ``--polish-iterations`` S);
- ``capacity`` (``--capacity N``): the generator fitted to the truth itself (mean squared
  error, no blur, no noise): what N iterations of the generator can represent.

Every row: PSNR / SSIM (least-squares intensity fit), flux and spot errors (against the
signal) and the weighted loss terms.

    python bench/objective.py --cases gauss3d_low lightsheet3d_high --cider 300 --capacity 300
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from microscopy import rl_scores, score  # noqa: E402
from microscopy_data import LEVELS, SYNTHETIC, Case, load_case, synthetic_case, synthetic_scene  # noqa: E402
from overrides import parse_overrides  # noqa: E402

from cider import FLUORESCENCE, RestoreConfig  # noqa: E402
from cider.background import flat_background  # noqa: E402
from cider.fitting import (  # noqa: E402
    Generators,
    Prepared,
    fit_generator,
    learning_rate,
    objective,
    objective_terms,
    start_level,
)
from cider.restore import deconvolved_features, prepare, to_data_units  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CASES_3D = [name for name, (kind, _, _) in SYNTHETIC.items() if kind == "volume"]
FLUORESCENCE_CASES = [name for name, (kind, _, _) in SYNTHETIC.items() if kind != "plankton"]
# Adam on the softplus-parametrised voxels: from a flat start, 0.02 reaches the loss's
# plateau within 400-500 steps on the CPU-sized volumes; from an estimate, 0.01.
VOXEL_RATE = {"flat": 0.02, "estimate": 0.01}


def _terms(estimate: torch.Tensor, prepared: Prepared, config: RestoreConfig) -> dict:
    with torch.no_grad():
        terms = {k: float(v) for k, v in objective_terms(estimate, prepared, config).items()}
    terms["total"] = sum(v for k, v in terms.items() if k != "chi2")
    return {k: round(v, 5) for k, v in terms.items()}


def _row(estimate: torch.Tensor, case: Case, prepared: Prepared, config: RestoreConfig) -> dict:
    s = score(to_data_units(estimate, prepared), case, background_removed=True)
    keep = ("psnr", "ssim", "flux_err", "spot_err", "spot_bias", "flat_std")
    return {**{k: s[k] for k in keep if k in s}, "loss": _terms(estimate, prepared, config)}


def minimise_voxels(
    start: torch.Tensor, prepared: Prepared, config: RestoreConfig, iterations: int, rate: float
) -> torch.Tensor:
    """The fit's loss minimised over the voxels (softplus-parametrised, Adam) from ``start``."""
    param = torch.log(torch.expm1(start.double().clamp_min(1e-4))).float().requires_grad_()
    optimizer = torch.optim.Adam([param], lr=rate)
    loss_terms = objective(prepared, config)
    for _ in range(iterations):
        optimizer.zero_grad()
        terms = loss_terms(F.softplus(param))
        sum(v for k, v in terms.items() if k != "chi2").backward()
        optimizer.step()
    return F.softplus(param).detach()


def fit_capacity(features: torch.Tensor, truth: torch.Tensor, prepared: Prepared, config: RestoreConfig):
    """The generator of ``config`` (seed, schedule, input) fitted to ``truth`` by mean
    squared error: the best its parametrisation reaches in ``config.iterations``."""
    generators = Generators(
        features[None], config, [start_level(prepared)], None, config.strides(prepared.voxel_size)
    )
    for iteration in range(config.iterations):
        for group in generators.optimizer.param_groups:
            group["lr"] = learning_rate(config, iteration)
        generators.optimizer.zero_grad()
        loss = ((generators(features[None])[0, 0] - truth) ** 2).mean()
        loss.backward()
        generators.optimizer.step()
    with torch.no_grad():
        return generators(features[None])[0, 0]


def setup_case(
    name: str,
    config: RestoreConfig,
    cache: Path | None = None,
    seed: int | None = None,
    level: str = "true",
) -> tuple[Case, Prepared, torch.Tensor]:
    """A synthetic case as the fit gets it, with the true flat level subtracted (so that
    the truth's signal and the data agree on what is background), and its true signal
    on the fit's object grid, in the fit's units. ``seed``: another scene and noise draw
    of the same kind (default: the case's own, cached in ``cache``). ``level="flat"``:
    the level the pipeline estimates (``background.method: flat``) is subtracted
    instead, as the light-sheet configs run; the truth stays the true signal."""
    if seed is None:
        case, scene = load_case(name, cache=cache), synthetic_scene(name)
    else:
        case, scene = synthetic_case(name, seed=seed), synthetic_scene(name, seed=seed)
    photons = LEVELS[SYNTHETIC[name][2]][0]
    background = case.background if level == "true" else flat_background(case.observation, case.psf)
    prepared = prepare(case.observation, case.psf, config, background=background, voxel_size=case.voxel_size)
    truth = torch.as_tensor((scene.obj * photons - case.background) / prepared.scale, dtype=torch.float32)
    return case, prepared, truth


def run_case(name: str, args: argparse.Namespace, overrides: dict) -> dict:
    """Every row of one case."""
    config = RestoreConfig(**{**FLUORESCENCE, "device": "cpu", **overrides})
    case, prepared, truth = setup_case(name, config, args.cache, args.seed, args.level)
    rows: dict[str, dict] = {"truth": {"loss": _terms(truth, prepared, config)}}
    timings: dict[str, float] = {}

    def timed(label, make):
        start = time.perf_counter()
        out = make()
        timings[label] = round(time.perf_counter() - start, 1)
        return out

    flat = torch.full_like(truth, start_level(prepared))
    voxels = timed(
        "voxels", lambda: minimise_voxels(flat, prepared, config, args.voxel_iterations, VOXEL_RATE["flat"])
    )
    rows["voxels"] = _row(voxels, case, prepared, config)
    if not args.voxels_only:
        from_truth = timed(
            "voxels_from_truth",
            lambda: minimise_voxels(truth, prepared, config, args.voxel_iterations, VOXEL_RATE["estimate"]),
        )
        rows["voxels_from_truth"] = _row(from_truth, case, prepared, config)
        rl = rl_scores(case, "cpu", background=prepared.background_level)  # the level the fit has
        rows["rl"] = {k: rl[k] for k in ("psnr", "ssim", "flux_err", "spot_err", "iterations") if k in rl}
    if args.cider or args.capacity:
        features = deconvolved_features(prepared, config)
    if args.cider:
        fitted = config.with_(iterations=args.cider)
        estimate = timed("cider", lambda: fit_generator(features, prepared, fitted).estimate)
        rows["cider"] = {**_row(estimate, case, prepared, config), "iterations": args.cider}
        # the polish may minimise another loss (--polish-set), scored by that loss
        polish = config.with_(**parse_overrides(args.polish_set))
        for steps in args.polish_iterations:
            label = "cider_voxels" if len(args.polish_iterations) == 1 else f"cider_voxels_{steps}"
            polished = timed(
                label,
                lambda steps=steps: minimise_voxels(
                    estimate, prepared, polish, steps, VOXEL_RATE["estimate"]
                ),
            )
            rows[label] = {
                **_row(polished, case, prepared, polish),
                "iterations": steps,
                **({"settings": args.polish_set} if args.polish_set else {}),
            }
    if args.capacity:
        capacity = config.with_(iterations=args.capacity)
        estimate = timed("capacity", lambda: fit_capacity(features, truth, prepared, capacity))
        rows["capacity"] = {**_row(estimate, case, prepared, config), "iterations": args.capacity}
    return {"rows": rows, "seconds": timings, "settings": {**FLUORESCENCE, **overrides}}


def table(results: dict) -> str:
    """Markdown: one table per case."""
    lines = [
        f"# CiDeR's objective against the truth (device: {results['device']}, {results['date']})",
        "",
        "PSNR / SSIM after a least-squares intensity fit; flux and spot errors against the "
        "signal (%); loss: the fit's weighted loss (`cider.fitting.objective_terms`, lower "
        "is preferred by the fit), with its SSIM / data / Hessian terms. `rl`: RL with the "
        "level in its model at its best iteration (oracle). See `bench/objective.py`.",
    ]
    for name, case in results["cases"].items():
        lines += [
            "",
            f"## {name}",
            "",
            "| row | PSNR | SSIM | flux % | spot % | loss | SSIM term | data term | Hessian term | χ² |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row, r in case["rows"].items():
            loss = r.get("loss", {})
            cells = [r.get("psnr", "–"), r.get("ssim", "–"), r.get("flux_err", "–"), r.get("spot_err", "–")]
            cells += [loss.get(k, "–") for k in ("total", "ssim", "data", "hessian", "chi2")]
            label = f"{row} ({r['iterations']} it.)" if "iterations" in r else row
            lines.append(f"| {label} | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=CASES_3D, choices=FLUORESCENCE_CASES)
    parser.add_argument("--voxel-iterations", type=int, default=500)
    parser.add_argument("--cider", type=int, default=0, help="also the generator fit of N iterations")
    parser.add_argument(
        "--polish-iterations",
        type=int,
        nargs="+",
        default=[300],
        help="steps of the polish; several: one polish of each length, each from the fit",
    )
    parser.add_argument(
        "--polish-set",
        nargs="*",
        default=[],
        help="settings KEY=VALUE of the polish's loss (default: the fit's)",
    )
    parser.add_argument("--capacity", type=int, default=0, help="also the generator fitted to the truth")
    parser.add_argument(
        "--voxels-only",
        action="store_true",
        help="only the truth and voxels rows (a quick sweep of the loss)",
    )
    parser.add_argument("--seed", type=int, default=None, help="another draw of each case (default: its own)")
    parser.add_argument("--set", nargs="*", default=[], help="restore settings KEY=VALUE")
    parser.add_argument(
        "--level",
        choices=("true", "flat"),
        default="true",
        help="background level subtracted: the true one, or the estimated flat one",
    )
    parser.add_argument("--device-name", default="cpu", help="for the record")
    parser.add_argument("--cache", type=Path, default=None, help="case cache folder")
    parser.add_argument("--out", type=Path, default=RESULTS / "objective")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    results = {
        "device": args.device_name,
        "date": time.strftime("%Y-%m-%d"),
        "command": "bench/objective.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "level": args.level,
        "cases": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.cases:
        results["cases"][name] = run_case(name, args, overrides)
        (args.out / "objective.json").write_text(json.dumps(results, indent=1))
        (args.out / "objective.md").write_text(table(results))
        print(json.dumps({name: results["cases"][name]["rows"]}), flush=True)
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
