"""Microscopy benchmark: CiDeR against RL and friends on data with known truth.

    python bench/microscopy.py                         # every case and method (GPU: minutes)
    python bench/microscopy.py --cases bars gauss3d_low --methods rl cider
    python bench/microscopy.py --set data_weight=0 stop=none --tag sweep   # a sweep, stored apart
    python bench/microscopy.py --methods cider --iterations 1000 --modality case  # as the pipeline

Cases (``bench/microscopy_data.py``): flowdec ``bars`` (3D, real truth), synthetic 3D
volumes (light-sheet / widefield model PSFs and a Gaussian, z step 2–3× xy, Poisson +
read noise at two photon levels) and 2D fluorescence / bright-field plankton scenes.
One scorer for all rows (:func:`score`): PSNR and SSIM against the truth after a
least-squares intensity fit ``a·x + b``, plus photometry *without* any fit: relative error
of the total flux and median relative error of integrated bead intensities (for a row
that leaves the flat background out, ``rl_flat`` and generator rows with
``background.enabled``, against the truth less the case's known background level:
``photometry_vs: signal``); and the texture left in flat truth regions (std there, in %
of the truth's range).

Rows: ``blurred``; ``rl`` (boundary-aware RL at its best iteration count, an oracle
choice, stated); ``rl_tv`` (RL with total-variation regularisation, Dey et al. 2006, best
λ and iteration count, oracle); ``rl_flat`` (``rl`` with the flat background level of
``background.method: flat`` in its model, ``y ~ Poisson(Ax + level)``: the strongest
simple baseline on fluorescence data, oracle); ``wiener`` (best noise-to-signal
ratio, oracle);
``cider`` (package defaults; ``--modality case``: the settings the pipeline's
``restore.modality`` gives the case's kind of data, ``cider.FLUORESCENCE`` on every case
but the bright-field plankton, ``--set`` still winning), ``cider_curve`` (defaults with the stop rule off, scored
every 100 iterations: does it ever fall below the input?), ``image_rl`` and ``noise``
(ablations), ``tiled`` (the ``cider`` row's settings, restored tile by tile as the
pipeline does it, :func:`tiled_restore`, and compared with the whole-image result). Writes
``bench/results/microscopy.json`` ({case: {method: {...}}}) and
``bench/results/microscopy.md``.
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
from microscopy_data import CASES, SPOT_RADIUS, Case, box_sums, load_case  # noqa: E402
from overrides import parse_overrides  # noqa: E402

from cider import FLUORESCENCE, RestoreConfig, losses  # noqa: E402
from cider.background import flat_background  # noqa: E402
from cider.fitting import objective  # noqa: E402
from cider.restore import (  # noqa: E402
    deconvolved_features,
    feature_range,
    fit_generator,
    prepare,
    to_data_units,
)
from cider.rl import BlurOperator  # noqa: E402
from cider.tiling import Tile, auto_blend, minimum_margin, stitch, tile_grid, tile_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CURVE_EVERY = 100
RL_CHECKPOINTS = (5, 10, 15, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 1000, 1500, 2000)
TV_WEIGHTS = (0.0005, 0.002, 0.008)
WIENER_NSR = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
GENERATOR_INPUT = {"cider": "features", "cider_curve": "features", "image_rl": "image_rl", "noise": "noise"}
PROGRESS: Path | None = None  # --progress: folder of curves written while a run goes on
BRIGHTFIELD_CASES = ("plankton2d",)  # every other case is fluorescence (dark background, shot noise)
# --modality: the generator rows' settings per case, before --set.
MODALITY_SETTINGS = {
    "none": lambda name: {},
    "case": lambda name: {} if name in BRIGHTFIELD_CASES else dict(FLUORESCENCE),
}
METHODS = [
    "blurred",
    "rl",
    "rl_tv",
    "rl_flat",
    "wiener",
    "cider",
    "cider_curve",
    "image_rl",
    "noise",
    "tiled",
]
TILED_PARTS = 2  # the ``tiled`` row cuts Y and X into this many tile cores each (Z stays whole)


# ----------------------------------------------------------------------------- scoring
def _ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    from skimage.metrics import structural_similarity

    win = min(7, *[n - (1 - n % 2) for n in a.shape])
    return float(structural_similarity(a, b, data_range=data_range, win_size=win))


def score(restored: np.ndarray, case: Case, background_removed: bool = False) -> dict:
    """PSNR/SSIM after a least-squares intensity fit; photometry and flat-region texture as is.

    Parameters
    ----------
    restored : np.ndarray
        The result on the observation's field, in data units.
    case : Case
        The case (truth, spots, the truth's flat background level).
    background_removed : bool
        The method leaves the flat background out of its result (``rl_flat``, or a
        generator row with ``background.enabled``): its photometry is then scored against
        the signal, ``truth - case.background``, not against the truth with its
        background. The fit for PSNR/SSIM has an offset, so they are the same either way.

    Returns
    -------
    dict
        ``psnr``, ``ssim`` (after the fit), ``flux_err`` (% total flux error, no fit),
        ``spot_err`` (% median |error| of bead integrated intensity in 5-px boxes, no fit;
        the noise's floor under it is :func:`spot_floor`),
        ``spot_bias`` (the signed median: below 0, the beads' light is spread out of
        their boxes or lost),
        ``flat_std`` (% of the truth's range: std of the fitted result where the truth is
        flat), ``gain`` (the fit's slope: 1 = intensities already right), and
        ``photometry_vs``: ``"truth"`` or ``"signal"`` (what the flux and spot errors
        compare with).
    """
    truth = case.truth
    reference = truth - case.background if background_removed else truth
    x = np.asarray(restored, dtype=np.float64)
    design = np.stack([x.ravel(), np.ones(x.size)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, truth.ravel(), rcond=None)
    fitted = a * x + b
    data_range = float(np.ptp(truth))
    mse = float(np.mean((fitted - truth) ** 2))
    flat = _flat_mask(truth)
    out = {
        "psnr": round(10 * np.log10(data_range**2 / mse), 3),
        "ssim": round(_ssim(fitted, truth, data_range), 4),
        "flux_err": round(100 * (x.sum() / reference.sum() - 1), 2),
        "flat_std": round(100 * float(fitted[flat].std()) / data_range, 3) if flat.any() else None,
        "gain": round(float(a), 4),
        "photometry_vs": "signal" if background_removed else "truth",
    }
    if case.spots:
        t, r = box_sums(reference, case.spots, SPOT_RADIUS), box_sums(x, case.spots, SPOT_RADIUS)
        out["spot_err"] = round(100 * float(np.median(np.abs(r / t - 1))), 2)
        out["spot_bias"] = round(100 * float(np.median(r / t - 1)), 2)
    return out


def spot_floor(case: Case) -> dict:
    """What the draw's noise alone costs the spot errors: ``spot_floor`` and
    ``spot_floor_bias``, the median |error| and signed median (%) of the oracle that knows
    everything but each spot's brightness (:func:`microscopy_data.oracle_spot_errors`).
    Empty where the case has no oracle (no spots, or flowdec bars)."""
    if not case.spot_oracle:
        return {}
    errors = 100 * np.asarray(case.spot_oracle)
    return {
        "spot_floor": round(float(np.median(np.abs(errors))), 2),
        "spot_floor_bias": round(float(np.median(errors)), 2),
    }


def _flat_mask(truth: np.ndarray) -> np.ndarray:
    """Voxels whose 5-px neighbourhood of the truth is flat (within 0.5 % of its range)."""
    from scipy.ndimage import maximum_filter, minimum_filter

    spread = maximum_filter(truth, 5) - minimum_filter(truth, 5)
    return spread <= 0.005 * np.ptp(truth)


# ----------------------------------------------------------------------------- baselines
def _tensor(a: np.ndarray, device: str) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float64, device=device)


def crop_fov(estimate: torch.Tensor, psf_shape) -> np.ndarray:
    index = tuple(slice(k // 2, n - k // 2) for n, k in zip(estimate.shape, psf_shape))
    return estimate[index].cpu().numpy()


def _tv_gradient(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``div(∇x / |∇x|)`` with forward/backward differences (TV's first variation)."""
    grads = [torch.diff(x, dim=d, append=x.narrow(d, x.shape[d] - 1, 1)) for d in range(x.ndim)]
    norm = torch.sqrt(sum(g**2 for g in grads) + eps**2)
    div = torch.zeros_like(x)
    for d, g in enumerate(grads):
        n = g / norm
        div = (
            div
            + n
            - torch.roll(n, 1, dims=d)
            * (torch.arange(x.shape[d], device=x.device) > 0).view(
                [-1 if i == d else 1 for i in range(x.ndim)]
            )
        )
    return div


def rl_scores(case: Case, device: str, tv_weight: float = 0.0, background: float = 0.0) -> dict:
    """Boundary-aware RL (optionally RL-TV, optionally with a flat ``background`` in its
    model), scored at every checkpoint; best is the oracle."""
    y = _tensor(np.clip(case.observation, 0, None), device)
    op = BlurOperator(_tensor(case.psf, device), y.shape, "valid")
    weight = op.adjoint(torch.ones_like(y))
    observed = weight > 1e-4 * weight.max()
    weight = torch.where(observed, weight, torch.ones_like(weight))
    x = torch.full(op.object_shape, max(float(y.mean()) - background, 1e-12), dtype=y.dtype, device=device)
    curve, start = {}, time.perf_counter()
    for it in range(1, max(RL_CHECKPOINTS) + 1):
        update = op.adjoint(y / (op(x) + background).clamp_min(1e-12))
        denominator = weight
        if tv_weight:
            # Dey et al.: divide by (1 − λ div(∇x/|∇x|)); λ in units of the data's mean
            denominator = (weight - tv_weight * _tv_gradient(x / float(y.mean()))).clamp_min(0.05)
        x = torch.where(observed, x * update / denominator, x).clamp_min(0)
        if it in RL_CHECKPOINTS:
            curve[it] = score(crop_fov(x, case.psf.shape), case, background_removed=background > 0)
    best = max(curve, key=lambda k: curve[k]["psnr"])
    return {
        **curve[best],
        "iterations": best,
        "seconds": round(time.perf_counter() - start, 2),
        "curve": {k: v["psnr"] for k, v in curve.items()},
    }


def wiener_scores(case: Case) -> dict:
    """Wiener filter on the reflect-padded image, best noise-to-signal ratio (oracle)."""
    y = case.observation
    pad = [(k, k) for k in case.psf.shape]
    padded = np.pad(y, pad, mode="reflect")
    otf = np.fft.rfftn(np.fft.ifftshift(_embed(case.psf, padded.shape)))
    spectrum = np.fft.rfftn(padded)
    best = None
    for nsr in WIENER_NSR:
        result = np.fft.irfftn(
            spectrum * otf.conj() / (np.abs(otf) ** 2 + nsr), padded.shape, axes=tuple(range(y.ndim))
        )
        result = result[tuple(slice(k, k + n) for k, n in zip(case.psf.shape, y.shape))]
        s = {**score(result, case), "nsr": nsr}
        if best is None or s["psnr"] > best["psnr"]:
            best = s
    return best


def _embed(psf: np.ndarray, shape) -> np.ndarray:
    out = np.zeros(shape)
    start = [n // 2 - k // 2 for n, k in zip(shape, psf.shape)]
    out[tuple(slice(s, s + k) for s, k in zip(start, psf.shape))] = psf
    return out


# ----------------------------------------------------------------------------- CiDeR
def cider_config(method: str, iterations: int, device: str, overrides: dict) -> RestoreConfig:
    """The settings of a generator row: the package defaults, the row's generator input,
    then ``overrides``."""
    return RestoreConfig(iterations=iterations, device=device, generator_input=GENERATOR_INPUT[method]).with_(
        **overrides
    )


def cider_scores(
    case: Case, method: str, iterations: int, device: str, overrides: dict
) -> tuple[dict, np.ndarray]:
    """A generator-based row and its result (data units); ``cider_curve`` turns the stop
    rule off and scores every 100 it."""
    config = cider_config(method, iterations, device, overrides)
    curve: dict[int, dict] = {}
    callback = None
    if method == "cider_curve":
        config = config.with_(stop="none")

        def callback(iteration: int, loss: float, estimate: torch.Tensor) -> None:
            if (iteration + 1) % CURVE_EVERY == 0:
                restored = to_data_units(estimate, prepared)
                s = score(restored, case, config.background.enabled)
                curve[iteration + 1] = {
                    **{k: s[k] for k in ("psnr", "ssim", "flux_err", "spot_err", "spot_bias") if k in s},
                    "chi2": round(float(chi2(estimate)["chi2"]), 4),
                }
                if PROGRESS is not None:  # a run cut short still leaves its curve
                    PROGRESS.mkdir(parents=True, exist_ok=True)
                    (PROGRESS / f"{case.name}_{method}.json").write_text(json.dumps(curve))

    start = time.perf_counter()
    prepared = prepare(case.observation, case.psf, config, voxel_size=case.voxel_size or None)
    chi2 = objective(prepared, config)  # the fit's χ², for the curve
    features = deconvolved_features(prepared, config)
    fit = fit_generator(features, prepared, config, callback)
    seconds = time.perf_counter() - start
    restored = to_data_units(fit.estimate, prepared)
    out = {
        **score(restored, case, config.background.enabled),
        "iterations": fit.iterations,
        "stopped": fit.stopped,
        "chi2": round(fit.chi2, 3),
        "seconds": round(seconds, 1),
        "settings": overrides,  # what differs from the package defaults
    }
    if curve:
        out["curve"] = curve
        out["worst_psnr"] = min(c["psnr"] for c in curve.values())
        out["best_psnr"] = max(c["psnr"] for c in curve.values())
        out["best_iterations"] = max(curve, key=lambda k: curve[k]["psnr"])
    return out, restored


def tiled_restore(case: Case, config: RestoreConfig) -> tuple[np.ndarray, list[Tile], tuple[int, ...]]:
    """The case restored tile by tile, as the pipeline does it.

    Y and X are cut into :data:`TILED_PARTS` cores each (Z whole), with the pipeline's
    automatic margin (PSF size − 1) and blend (half the margin), and every padded window
    of one shape (``uniform``, as the fit batches use). The per-image quantities come
    from the whole image, as the pipeline's background job computes them once per image:
    the background (flat level or map), the intensity scale, the noise model, the mean
    signal and the features' value range. Each tile is fitted alone (a batched fit
    equals the sequential one, ``tests/test_batched_fit.py``) and the tiles are blended.

    Returns
    -------
    restored, tiles, blend
        The stitched result (data units, float64), the tiles and the blend half widths.
    """
    voxel = case.voxel_size or None
    whole = prepare(case.observation, case.psf, config, voxel_size=voxel)
    value_range = None if config.generator_input == "noise" else feature_range(whole.observation, config)
    background = whole.background_level
    if background is None and whole.background is not None:
        background = whole.background.cpu().numpy().astype(np.float64) * whole.scale
    shape = case.observation.shape
    core = tuple(n if axis < len(shape) - 2 else -(-n // TILED_PARTS) for axis, n in enumerate(shape))
    margin = minimum_margin(case.psf.shape)
    tiles = tile_grid(shape, core, margin, uniform=True)
    restored = {}
    for tile in tiles:
        window = tile.slices()
        prepared = prepare(
            case.observation[window],
            case.psf,
            config,
            background[window] if isinstance(background, np.ndarray) else background,
            whole.scale,
            whole.noise.scaled(whole.scale),
            mean_signal=whole.mean_signal * whole.scale,
            voxel_size=voxel,
        )
        fit = fit_generator(deconvolved_features(prepared, config, value_range), prepared, config)
        restored[tile.id] = to_data_units(fit.estimate, prepared)
    blend = auto_blend(margin)
    return stitch(tiles, lambda t: restored[t.id], shape, blend, np.float64), tiles, blend


def tiled_difference(tiled: np.ndarray, whole: np.ndarray, tiles: list[Tile], blend: tuple[int, ...]) -> dict:
    """How far the tiled result is from the whole-image one, in % of the whole result's
    range: RMS and largest difference over the image, RMS in the blend zones (where tiles
    overlap: a seam shows there) and away from them (where only the tiles' own fits
    differ). ``seam_rms`` well above ``core_rms`` would be a seam."""
    seam = np.zeros(whole.shape, bool)
    for tile in tiles:
        weights = tile_weights(tile, whole.shape, blend)
        seam[tile.slices()] |= (weights > 0) & (weights < 1)
    diff = (tiled - whole) / float(np.ptp(whole))

    def rms(values: np.ndarray) -> float:
        return round(100 * float(np.sqrt(np.mean(values**2))), 3) if values.size else 0.0

    return {
        "rms_diff_pct": rms(diff),
        "max_diff_pct": round(100 * float(np.abs(diff).max()), 3),
        "seam_rms_diff_pct": rms(diff[seam]),
        "core_rms_diff_pct": rms(diff[~seam]),
        "seam_voxels_pct": round(100 * float(seam.mean()), 1),
        "tiles": len(tiles),
    }


# ----------------------------------------------------------------------------- driver
def run_case(
    case: Case, methods, iterations: int, device: str, overrides: dict, modality: str = "none"
) -> dict:
    rows: dict[str, dict] = {}
    results: dict[str, np.ndarray] = {}  # generator rows' results, for the tiled row's comparison
    settings = {**MODALITY_SETTINGS[modality](case.name), **overrides}  # the generator rows'
    for method in methods:
        start = time.perf_counter()
        if method == "blurred":
            rows[method] = {**score(case.observation, case), **spot_floor(case)}
        elif method == "rl":
            rows[method] = rl_scores(case, device)
        elif method == "rl_tv":
            best = None
            for weight in TV_WEIGHTS:
                s = {**rl_scores(case, device, weight), "tv_weight": weight}
                if best is None or s["psnr"] > best["psnr"]:
                    best = s
            rows[method] = best
        elif method == "rl_flat":
            level = flat_background(case.observation, case.psf)
            rows[method] = {**rl_scores(case, device, background=level), "background_level": round(level, 4)}
        elif method == "wiener":
            rows[method] = wiener_scores(case)
        elif method == "tiled":
            rows[method] = tiled_scores(case, iterations, device, settings, results.get("cider"))
        else:
            rows[method], results[method] = cider_scores(case, method, iterations, device, settings)
        print(
            f"{case.name:18s} {method:12s} {_brief(rows[method])} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return rows


def tiled_scores(
    case: Case, iterations: int, device: str, settings: dict, whole: np.ndarray | None = None
) -> dict:
    """The ``tiled`` row: the ``cider`` row's settings, tile by tile; scored as any row,
    plus its difference from the whole-image result (``whole``: the ``cider`` row's, made
    here when that row did not run)."""
    if whole is None:
        _, whole = cider_scores(case, "cider", iterations, device, settings)
    config = cider_config("cider", iterations, device, settings)
    start = time.perf_counter()
    tiled, tiles, blend = tiled_restore(case, config)
    return {
        **score(tiled, case, config.background.enabled),
        "vs_whole": tiled_difference(tiled, np.asarray(whole, np.float64), tiles, blend),
        "seconds": round(time.perf_counter() - start, 1),
        "settings": settings,
    }


def _brief(row: dict) -> str:
    keys = ("psnr", "ssim", "flux_err", "spot_err", "flat_std", "iterations", "stopped", "worst_psnr")
    return " ".join(f"{k}={row[k]}" for k in keys if k in row)


def table(results: dict, device: str) -> str:
    """Markdown: one block per case, one row per method."""
    lines = [
        f"# Microscopy benchmark (device: {device})",
        "",
        "PSNR / SSIM after a least-squares intensity fit; flux and spot errors in % without any fit; "
        "flat std: texture in flat truth regions, % of the truth's range (lower is better). "
        "`rl`, `rl_tv`, `rl_flat`, `wiener`: best setting chosen with the truth (oracle); `rl_flat`: RL with the flat background level in its model.",
        "",
    ]
    for case, rows in results.items():
        lines += [
            f"## {case}",
            "",
            "| method | PSNR | SSIM | flux err % | spot err % | flat std % | iterations | notes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, r in rows.items():
            notes = []
            if "tv_weight" in r:
                notes.append(f"λ {r['tv_weight']}")
            if "nsr" in r:
                notes.append(f"NSR {r['nsr']}")
            if "stopped" in r:
                notes.append(f"stop: {r['stopped']}, χ² {r.get('chi2')}")
            if "worst_psnr" in r:
                last = max(map(int, r["curve"]))
                notes.append(
                    f"PSNR on {CURVE_EVERY}–{last} it.: worst {r['worst_psnr']}, best {r['best_psnr']} "
                    f"at {r['best_iterations']}"
                )
            if r.get("settings"):
                notes.append(", ".join(f"{k}={v}" for k, v in r["settings"].items()))
            if "vs_whole" in r:
                d = r["vs_whole"]
                notes.append(
                    f"{d['tiles']} tiles; vs whole image: RMS {d['rms_diff_pct']} %, max {d['max_diff_pct']} % "
                    f"(blend zones {d['seam_rms_diff_pct']} %, elsewhere {d['core_rms_diff_pct']} %)"
                )
            if "spot_floor" in r:
                notes.append(
                    f"spot error of an oracle knowing all but the spots' brightness (the noise's floor): "
                    f"{r['spot_floor']} %, signed {r['spot_floor_bias']} %"
                )
            if r.get("photometry_vs") == "signal":
                notes.append("flux/spot vs the truth less its background")
            if "seconds" in r:
                notes.append(f"{r['seconds']} s")
            lines.append(
                f"| {method} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['flux_err']} | {r.get('spot_err', '–')} "
                f"| {r.get('flat_std', '–')} | {r.get('iterations', '–')} | {'; '.join(notes)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main_parser() -> argparse.ArgumentParser:
    """The command line of this benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--iterations", type=int, default=3000, help="iteration budget of the cider rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="larger synthetic cases (GPU)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RestoreConfig overrides")
    parser.add_argument(
        "--modality",
        choices=sorted(MODALITY_SETTINGS),
        default="none",
        help="none: package defaults for the generator rows; case: the fluorescence settings on "
        "fluorescence cases, as the pipeline's restore.modality",
    )
    parser.add_argument("--tag", default="", help="suffix of the result files (sweeps)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=None, help="folder of cached cases (.npz)")
    parser.add_argument(
        "--progress", type=Path, default=None, help="write cider_curve curves here as they grow"
    )
    parser.add_argument(
        "--least-offset",
        type=float,
        default=None,
        help="stabilised Hessian's least offset / mean signal (cider.losses.LEAST_OFFSET; a sweep knob)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = main_parser().parse_args(argv)
    global PROGRESS
    PROGRESS = args.progress
    if args.least_offset is not None:
        losses.LEAST_OFFSET = args.least_offset
    overrides = parse_overrides(args.set, refused=("iterations", "device", "progress"))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    path = args.out / f"microscopy{args.tag}.json"
    results = json.loads(path.read_text()).get("cases", {}) if path.exists() else {}
    for name in args.cases:
        case = load_case(name, args.full, args.cache)
        results.setdefault(name, {}).update(
            run_case(case, args.methods, args.iterations, args.device, overrides, args.modality)
        )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "device": device_name,
        "overrides": overrides,
        "modality": args.modality,
        "least_offset": losses.LEAST_OFFSET,
        "full": args.full,
        "cases": results,
    }
    path.write_text(json.dumps(record, indent=1))
    (args.out / f"microscopy{args.tag}.md").write_text(table(results, device_name))
    return record


if __name__ == "__main__":
    main()
