"""Levin benchmark: CiDeR (ours) against classic baselines and ablations, one protocol.

    python bench/levin.py                      # 6-image subset, every row (hours on CPU)
    python bench/levin.py --subset all --methods blurred wiener rl
    python bench/levin.py --methods cider --iterations 1000 --cases im1_k1 im4_k7 \
        --set hessian_weight=0.06 rl_iterations=50   # a settings sweep, stored apart

Runs on different cases can go in parallel processes (``--threads 1`` each); a last
run without ``--cases`` then only reads the stored results and writes the table.

Writes one JSON per (method, image) under ``bench/results/levin/`` (existing ones are
reused, so a long run can be resumed) and the table ``bench/results/levin.md``.
Methods: ``blurred``; ``wiener`` (NSR 2e-3, 40-px symmetric padding); ``rl``
(boundary-aware RL, iterations in ``--rl-iterations``, best mean stated);
``selfdeblur`` (same generator and loss, fixed noise input, no features/RL);
``image_rl`` (RL on the image as generator input, no feature extractor);
``features_image`` (the image as one more input channel next to the features; not in the
default rows); ``cider`` (ours, shipped feature weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from levin_protocol import Case, load_case, score, wiener  # noqa: E402
from overrides import parse_overrides  # noqa: E402

from cider import RestoreConfig, restore  # noqa: E402
from cider.restore import feature_weights_digest  # noqa: E402
from cider.rl import richardson_lucy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "levin"
RESULTS = ROOT / "bench" / "results"
SUBSET6 = [(1, 1), (2, 3), (3, 5), (4, 7), (1, 4), (3, 8)]
GENERATOR_INPUT = {
    "cider": "features",
    "image_rl": "image_rl",
    "features_image": "features_image",
    "selfdeblur": "noise",
}
QUOTED = [
    ("paper: CiDeR (32 images)", "30.63 / 0.8956"),
    ("paper: SelfDeblur non-blind (32 images)", "29.56 / 0.8614"),
    ("upstream CiDeR, 1000 it. (6-image subset, shared README)", "33.35 / 0.9352"),
    ("upstream CiDeR, 500 it. (6-image subset, shared README)", "32.20 / 0.9249"),
]


def restore_config(method: str, iterations: int, device: str, overrides: dict) -> RestoreConfig:
    """Settings of a generator-based method: package defaults plus ``--set`` overrides."""
    return RestoreConfig(
        iterations=iterations, normalize=False, device=device, generator_input=GENERATOR_INPUT[method]
    ).with_(**overrides)


def settings(config: RestoreConfig) -> dict:
    """Every setting that can change a result; stored with it, so a stale result is not reused.

    All ``RestoreConfig`` fields, as plain JSON values, except ``progress`` (display only)
    and ``device`` (stored with the result on its own; a result is reused on any device),
    and the SHA-256 of the feature-extractor weights: ``feature_weights`` holds a name
    (``None`` for the package's default file), and a file of the same name with new
    content must not reuse the old file's results.
    """
    values = asdict(config)
    for key in ("device", "progress"):
        values.pop(key)
    values["feature_weights_sha256"] = feature_weights_digest(config)
    return json.loads(json.dumps(values))


# Fields added after results were first stored, with the value that reproduces the
# behaviour before they existed: a stored result without the field was made that way.
LEGACY = {
    "data_weight": 0.0,
    "output": "sigmoid",
    "stop": "none",
    "discrepancy": 1.0,
    "preserve_flux": False,
    "average": 0.0,
    "log_every": 10,
    "hessian_noise_weight": 0.0,
    "ssim_noise_factor": 0.0,
    "keep_best_by": "loss",
    # Results stored before the digest was: those with features carry it since the
    # migration of 2026-11-27 (their weights files were unchanged since the results were
    # made); any without it is recomputed.
    "feature_weights_sha256": None,
}


def same_settings(stored: dict | None, config: RestoreConfig, baseline: RestoreConfig) -> bool:
    """Whether a stored result was made with ``config``'s settings.

    A field missing from ``stored`` (a result made before the field existed) counts as its
    :data:`LEGACY` value when it has one, else as its value in ``baseline`` (the bench's
    settings without ``--set`` overrides).
    """
    if stored is None:
        return False
    fallback = {**settings(baseline), **LEGACY}
    return all(stored.get(key, fallback[key]) == value for key, value in settings(config).items())


def run_method(
    case: Case, method: str, iterations: int, config: RestoreConfig | None
) -> tuple[np.ndarray, dict]:
    """Restore one case with one method; return the estimate (255 × 255) and extra info."""
    if method == "blurred":
        return case.blurred, {}
    if method == "wiener":
        return wiener(case), {}
    if method == "rl":
        y = torch.tensor(case.blurred)
        x = richardson_lucy(y, case.psf, iterations, boundary="valid").numpy()
        r = case.psf.shape[0] // 2
        return x[r:-r, r:-r], {}
    result = restore(case.blurred, case.psf, config, scale=1.0)
    return result.restored, {
        "seconds": round(result.timings["total"], 1),
        "device": result.device,
        "final_loss": result.loss_history[-1],
        "settings": settings(config),
    }


def result_tag(method: str, iterations: int, overrides: dict) -> str:
    """Folder name of one row: ``cider_1000``, or ``cider_1000_hessian_weight=0.02`` with overrides."""
    if method in ("blurred", "wiener"):
        return method
    return "_".join([method, str(iterations), *(f"{k}={v}" for k, v in sorted(overrides.items()))])


def evaluate(cases, method: str, iterations: int, device: str, overrides: dict | None = None) -> list[dict]:
    """Score ``method`` on ``cases``, reusing stored results made with the same settings."""
    overrides = overrides or {}
    config = baseline = None
    if method in GENERATOR_INPUT:
        config = restore_config(method, iterations, device, overrides)
        baseline = restore_config(method, iterations, device, {})
    tag = result_tag(method, iterations, overrides)
    rows = []
    for case in cases:
        path = RESULTS / "levin" / tag / f"{case.name}.json"
        if path.exists():
            row = json.loads(path.read_text())
            if config is None or same_settings(row.get("settings"), config, baseline):
                rows.append(row)
                continue
            print(f"{tag} {case.name}: stored result was made with other settings; recomputing")
        start = time.perf_counter()
        estimate, info = run_method(case, method, iterations, config)
        row = {
            "case": case.name,
            "method": method,
            "iterations": iterations,
            **score(estimate, case.sharp),
            **info,
        }
        row.setdefault("seconds", round(time.perf_counter() - start, 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=1))
        print(
            f"{tag:16s} {case.name:8s} {row['psnr']:.2f} dB  {row['ssim']:.4f}  {row['seconds']} s",
            flush=True,
        )
        rows.append(row)
    return rows


def table(results: dict[str, list[dict]], cases) -> str:
    names = [c.name for c in cases]
    head = "| method | " + " | ".join(names) + " | **mean** |\n|---|" + "---|" * (len(names) + 1) + "\n"
    lines = []
    for tag, rows in results.items():
        by_case = {r["case"]: r for r in rows}
        cells = [f"{by_case[n]['psnr']:.2f} / {by_case[n]['ssim']:.4f}" for n in names]
        mean = f"**{np.mean([by_case[n]['psnr'] for n in names]):.2f} / {np.mean([by_case[n]['ssim'] for n in names]):.4f}**"
        lines.append(f"| {tag} | " + " | ".join(cells) + f" | {mean} |")
    quoted = "\n".join(
        f"| {name} | " + " | ".join("" for _ in names) + f" | {value} |" for name, value in QUOTED
    )
    return head + "\n".join(lines) + "\n" + quoted + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subset", choices=["6", "all"], default="6", help="6-image subset or all 32")
    parser.add_argument("--cases", nargs="+", help="only these cases of the subset, e.g. im1_k1 im4_k7")
    parser.add_argument(
        "--methods", nargs="+", default=["blurred", "wiener", "rl", "selfdeblur", "image_rl", "cider"]
    )
    parser.add_argument(
        "--iterations", type=int, nargs="+", default=[250, 500, 750, 1000], help="cider iterations"
    )
    parser.add_argument(
        "--ablation-iterations",
        type=int,
        nargs="+",
        default=[1000],
        help="iterations of the selfdeblur, image_rl and features_image rows",
    )
    parser.add_argument("--rl-iterations", type=int, nargs="+", default=[10, 20, 50, 100, 200, 400])
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="RestoreConfig overrides for the generator methods, e.g. hessian_weight=0.02",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "levin.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = SUBSET6 if args.subset == "6" else [(i, k) for i in range(1, 5) for k in range(1, 9)]
    cases = [load_case(DATA, i, k) for i, k in pairs]
    if args.cases:
        unknown = set(args.cases) - {case.name for case in cases}
        if unknown:
            parser.error(f"--cases: {sorted(unknown)} not in the {args.subset!r} subset")
        cases = [case for case in cases if case.name in args.cases]
    overrides = parse_overrides(args.set, refused=("iterations", "generator_input", "device", "progress"))
    results: dict[str, list[dict]] = {}
    for method in args.methods:
        if method in ("blurred", "wiener"):
            results[method] = evaluate(cases, method, 0, args.device)
        elif method == "rl":
            runs = {n: evaluate(cases, "rl", n, args.device) for n in args.rl_iterations}
            best = max(runs, key=lambda n: np.mean([r["psnr"] for r in runs[n]]))
            results[f"rl (best: {best} it.)"] = runs[best]
        else:
            for n in args.iterations if method == "cider" else args.ablation_iterations:
                label = f"{method} {n} it." + "".join(f", {k}={v}" for k, v in overrides.items())
                results[label] = evaluate(cases, method, n, args.device, overrides)
    text = f"Levin benchmark, {len(cases)} images, PSNR (dB) / SSIM, one scorer for every row.\n\n" + table(
        results, cases
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
