"""Which logged estimate should a fit return? ``keep_best``'s rules on the same fits.

    python bench/keep_best.py                       # all three sets, 2 processes
    python bench/keep_best.py --sets beads 2d --jobs 1 --out /tmp/keep_best

One generator fit per image, with the settings its kind of data gets (package defaults
on Levin and bright-field plankton, ``cider.FLUORESCENCE`` on 2D fluorescence and the
bead fields), logs its estimate every ``log_every`` iterations. Each rule then picks
one logged estimate, which goes through the fit's flux renormalisation and is scored:

- ``loss``: the lowest own loss (``keep_best_by: loss``, the package default);
- ``mean``: the lowest mean loss of the estimate's log block (``block`` until
  2026-11-27);
- ``block``: the lowest of the larger of the two (``keep_best_by: block`` now, part
  of ``cider.FLUORESCENCE``);
- ``last``: the last estimate (no ``keep_best``).

Sets: ``levin``, the 6-image subset (``bench/levin.py``'s protocol and scorer); ``2d``,
the three images of each 2D case of ``bench/schedules.py`` (microscopy scorer); ``beads``,
the fields of ``bench/beads.py`` (restored peak over RL(100)'s, spot error %). Each
row gives, per rule, the iteration picked and its scores. Writes ``keep_best.json``
and ``keep_best.md`` in ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import levin  # noqa: E402
from beads import FIELDS, field_config, load_field, rl100, spot_error  # noqa: E402
from levin_protocol import load_case as levin_case  # noqa: E402
from levin_protocol import score as levin_score  # noqa: E402
from microscopy import score as microscopy_score  # noqa: E402
from microscopy_data import load_case, synthetic_case  # noqa: E402
from schedules import settings as schedule_settings  # noqa: E402

from cider import FLUORESCENCE, RestoreConfig  # noqa: E402
from cider.fitting import _finish, _judged  # noqa: E402
from cider.restore import deconvolved_features, fit_generator, prepare, to_data_units  # noqa: E402
from cider.rl import BlurOperator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RULES = ("loss", "mean", "block", "last")
SETS = {
    "levin": [f"im{i}_k{k}" for i, k in levin.SUBSET6],
    "2d": [f"{case}:{seed}" for case in ("fluo2d_low", "plankton2d") for seed in ("case", 7, 11)],
    "beads": list(FIELDS),
}


def picks(losses: list[float], logged: list[int], log_every: int) -> dict[str, int]:
    """Index into ``logged`` (the logged iterations, 0-based) that each rule picks."""

    def block(j: int) -> list[float]:
        end = logged[j] + 1
        return losses[max(0, end - log_every) : end]

    judged = {
        "loss": lambda j: _judged(block(j), "loss"),
        "mean": lambda j: float(np.mean(block(j))),
        "block": lambda j: _judged(block(j), "block"),
    }
    chosen = {rule: min(range(len(logged)), key=key) for rule, key in judged.items()}
    return {**chosen, "last": len(logged) - 1}


def fit_once(observation: np.ndarray, psf: np.ndarray, config: RestoreConfig, **prepare_kw):
    """One fit; the flux-renormalised estimate (data units, image grid) each rule picks."""
    prepared = prepare(observation, psf, config, **prepare_kw)
    logged: list[tuple[int, torch.Tensor]] = []
    fit = fit_generator(
        deconvolved_features(prepared, config),
        prepared,
        config,
        callback=lambda iteration, loss, estimate: logged.append((iteration, estimate.clone())),
    )
    blur = BlurOperator(prepared.psf, prepared.observation.shape, boundary="valid")
    chosen = picks(fit.losses, [it for it, _ in logged], config.log_every)
    out = {}
    for rule, j in chosen.items():
        final = _finish(logged[j][1], blur, prepared, [], 0.0, "", config, rule)
        out[rule] = (logged[j][0] + 1, to_data_units(final.estimate, prepared))
    return out


def run_image(task: tuple[str, str, int]) -> dict:
    """Every rule's pick on one image of one set, scored."""
    kind, name, iterations = task
    torch.set_num_threads(1)
    if kind == "levin":
        image, kernel = name.split("_")
        i, k = int(image.removeprefix("im")), int(kernel.removeprefix("k"))
        case = levin_case(levin.DATA, i, k)
        config = levin.restore_config("cider", iterations, "cpu", {})
        chosen = fit_once(case.blurred, case.psf, config, scale=1.0)
        scores = {r: levin_score(x, case.sharp) for r, (_, x) in chosen.items()}
        scores = {r: {"psnr": round(s["psnr"], 3), "ssim": round(s["ssim"], 4)} for r, s in scores.items()}
    elif kind == "2d":
        case, seed = name.split(":")
        image = load_case(case, False) if seed == "case" else synthetic_case(case, seed=int(seed))
        config = schedule_settings(case).with_(iterations=iterations, early_stop_patience=0)
        chosen = fit_once(image.observation, image.psf, config)
        scores = {r: microscopy_score(x, image) for r, (_, x) in chosen.items()}
        scores = {r: {"psnr": s["psnr"], "ssim": s["ssim"]} for r, s in scores.items()}
    else:
        observation, psf, truth, spots, background = load_field(name)
        config, offset = field_config(name, iterations=iterations, **FLUORESCENCE)
        chosen = fit_once(observation, psf, config, offset=offset)
        peak = float(rl100(observation, psf).max()) - background
        scores = {
            r: {
                "peak_over_rl100": round(float(x.max()) / peak, 3),
                "spot_err_pct": spot_error(x, truth, spots),
            }
            for r, (_, x) in chosen.items()
        }
    row = {"set": kind, "image": name, "iterations": iterations}
    return row | {r: {"picked": chosen[r][0], **scores[r]} for r in RULES}


def table(rows: list[dict], device: str) -> str:
    """Markdown: one line per image, the iteration each rule picked and its scores."""
    lines = [
        f"# keep_best's rules on the same fits ({device})",
        "",
        "Generated by `bench/keep_best.py` (its docstring says how). Per rule: iteration picked, then",
        "PSNR / SSIM (Levin, 2D) or bead peak ÷ RL(100)'s / spot error % (beads).",
        "",
        "| set | image | it. | " + " | ".join(RULES) + " |",
        "|---" * (3 + len(RULES)) + "|",
    ]
    for row in rows:
        cells = []
        for rule in RULES:
            values = [v for k, v in row[rule].items() if k != "picked"]
            cells.append(f"{row[rule]['picked']}: " + " / ".join(f"{v:g}" for v in values))
        lines.append(f"| {row['set']} | {row['image']} | {row['iterations']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2, help="images fitted in parallel, one thread each")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    tasks = [(kind, name, args.iterations) for kind in args.sets for name in SETS[kind]]
    device = "CPU, 1 thread per process"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(run_image, tasks):
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "keep_best.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
            (args.out / "keep_best.md").write_text(table(rows, device))
    return rows


if __name__ == "__main__":
    main()
