"""How long Snakemake takes to plan and build the DAG of large datasets (dry runs).

    python bench/dag_dryrun.py                        # writes bench/results/dag_dryrun.{json,md}
    python bench/dag_dryrun.py --cases volume_10k     # one case (the others are kept)

Cases (only metadata or tiny files are written, so no disk space is needed):

- ``volume_10k``: a 6400 × 6400 Zarr array with 64-px tiles (10,000 tiles);
- ``volume_100k``: a 20,480 × 20,480 Zarr array with 64-px tiles (102,400 tiles);
- ``folder_20k``: a folder of 20,000 small TIFF images (48 × 64 px, one tile each).

Each is dry-run twice: the first run plans (opens every input, writes ``work/plan.json``),
the second reads the stored plan (one ``stat`` per input). The job counts are what a
real run would submit before SLURM grouping (``group-components``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import yaml
import zarr

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _volume(folder: Path, side: int) -> dict:
    zarr.create_array(str(folder / "big.zarr"), shape=(side, side), chunks=(64, 64), dtype="uint16")
    return {"path": str(folder / "big.zarr"), "axes": "YX", "voxel_size": [0.1, 0.1]}


def _folder(folder: Path, count: int) -> dict:
    images = folder / "images"
    images.mkdir()
    tile = (np.random.default_rng(0).random((48, 64)) * 200).astype(np.uint8)
    for number in range(count):
        tifffile.imwrite(images / f"img{number:06d}.tif", tile)
    return {"path": str(images), "axes": "YX", "voxel_size": [0.34, 0.34]}


def _job_counts(log: str) -> dict[str, int]:
    counts = {}
    for line in log.splitlines():
        words = line.split()
        if len(words) == 2 and words[1].isdigit() and words[0].isidentifier():
            counts[words[0]] = int(words[1])
    return counts


def _dry_run(folder: Path) -> tuple[float, dict[str, int]]:
    command = [
        *(sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "Snakefile")),
        *("--directory", str(folder), "--configfile", str(folder / "config.yaml"), "--cores", "2"),
    ]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(run.stderr[-2000:])
    return seconds, _job_counts(run.stdout)


def case(name: str, make_input, size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = {
            "name": name,
            "input": make_input(folder, size),
            "psf": {"gaussian_sigma": 1.5},
            "output_dir": str(folder / "out"),
            "tiling": {"tile_size": 64},
        }
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        first, counts = _dry_run(folder)
        second, _ = _dry_run(folder)
        plan = json.loads((folder / "out" / "work" / "plan.json").read_text())["plan"]
    return {
        "units": len(plan["units"]),
        "tiles": len(plan["tiles"]),
        "jobs": counts.get("total"),
        "jobs_by_rule": {k: v for k, v in counts.items() if k != "total"},
        "dry_run_seconds_planning": round(first, 1),
        "dry_run_seconds_stored_plan": round(second, 1),
    }


CASES = {"volume_10k": (_volume, 6400), "volume_100k": (_volume, 20480), "folder_20k": (_folder, 20000)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    machine = f"{platform.processor() or platform.machine()}, 2 cores (shared, noisy)"
    path = RESULTS / "dag_dryrun.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if "cases" not in result:  # an older layout: start afresh
        result = {"machine": machine, "cases": {}}
    for name in args.cases:  # each case is recorded as soon as it is measured
        make_input, size = CASES[name]
        result["cases"][name] = case(name, make_input, size)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(json.dumps({name: result["cases"][name]}), flush=True)
    lines = [
        f"# DAG dry runs ({result['machine']})",
        "",
        "| case | units | tiles | jobs | jobs by rule | dry run, planning (s) | dry run, stored plan (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in result["cases"].items():
        by_rule = ", ".join(f"{k} {v}" for k, v in c["jobs_by_rule"].items())
        lines.append(
            f"| {name} | {c['units']} | {c['tiles']} | {c['jobs']} | {by_rule} | "
            f"{c['dry_run_seconds_planning']} | {c['dry_run_seconds_stored_plan']} |"
        )
    (RESULTS / "dag_dryrun.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
