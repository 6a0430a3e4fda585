"""One end-to-end pipeline run on a volume larger than the memory any rule may hold (#14).

    python bench/large_run.py                          # 256×2048×2048 uint16: 4 GiB as float32
    python bench/large_run.py --shape 32 1024 1024     # a quick rehearsal

A seeded synthetic uint16 light-sheet-like volume (written plane by plane) goes through
the real Snakemake workflow, local profile: prepare → background (wavelet background on,
plane by plane) → fit → stitch (OME-Zarr with a pyramid and a TIFF) → report. Every rule
writes its Snakemake ``benchmark:`` file; the peak RSS of each rule (the largest over its
jobs) is compared with a quarter of the volume's float32 size (#14's target).

The fit is ``restore.method: rl`` with 3 iterations (no generator): a CiDeR fit of 1 G
voxels takes hours per iteration on a CPU, and its memory is set by the tile and the
pass (``cider.memory.fit_memory_bytes``, ``bench/throughput.py``), not by the volume.
Everything else is the code a CiDeR run goes through (the background job's feature
range aside, which holds one window of features: see ``bench/scale.py``).

Writes ``bench/results/large_run.{json,md}``; the work folder is deleted afterwards
unless ``--keep`` names where to put it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))

from scale import volume  # noqa: E402  (the same seeded beads-on-background volume)


def write_input(folder: Path, shape: tuple[int, ...], tile: list[int]) -> Path:
    """The uint16 volume (plane by plane) and its dataset config; returns the config."""
    tifffile.imwrite(folder / "volume.tif", volume(shape), shape=shape, dtype=np.uint16, bigtiff=True)
    config = {
        "name": "large",
        "input": {"path": str(folder / "volume.tif"), "axes": "ZYX", "voxel_size": [1.0, 0.25, 0.25]},
        "psf": {"gaussian_sigma": [1.0, 1.2, 1.2]},
        "output_dir": str(folder / "out"),
        "tiling": {"tile_size": tile},
        "restore": {"method": "rl", "rl_iterations": 3, "device": "cpu"},
        "background": {"enabled": True},
        "stitch": {"pyramid_levels": 4, "tiff": True},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def peak_per_rule(benchmarks: Path) -> dict[str, dict]:
    """Largest max RSS (MB) and summed seconds over each rule's jobs (benchmark TSVs)."""
    rules: dict[str, dict] = {}
    for tsv in sorted(benchmarks.rglob("*.tsv")):
        rule = tsv.relative_to(benchmarks).parts[0].removesuffix(".tsv")
        with tsv.open() as handle:
            row = next(csv.DictReader(handle, delimiter="\t"))
        entry = rules.setdefault(rule, {"jobs": 0, "max_rss_mb": 0.0, "seconds": 0.0})
        entry["jobs"] += 1
        entry["max_rss_mb"] = max(entry["max_rss_mb"], float(row["max_rss"]))
        entry["seconds"] = round(entry["seconds"] + float(row["s"]), 1)
    return rules


def check_output(out: Path, shape: tuple[int, ...]) -> dict:
    """The OME-Zarr's full-resolution array: shape, and every value finite, read by chunks."""
    import dask.array as da
    import zarr

    group = zarr.open_group(str(out / "volume.ome.zarr"), mode="r")
    level0 = da.from_zarr(group["0"])
    finite = bool(da.isfinite(level0).all().compute())
    return {"shape": list(level0.shape), "finite": finite, "as_input": list(level0.shape) == list(shape)}


ORDER = ("prepare", "background", "fit", "stitch", "report")


def markdown(result: dict) -> str:
    """The result as the markdown table linked from the README (rules in pipeline order)."""
    limit, shape, tile = result["rss_limit_mb"], result["shape"], result["tile_size"]
    lines = [
        f"# One end-to-end run of a {result['float32_mb'] / 1024:.1f} GiB (float32) volume ({result['machine']})",
        "",
        f"`bench/large_run.py`: {'×'.join(map(str, shape))} uint16 input, tiles {'×'.join(map(str, tile))}, "
        f"background removal on, fit = {result['fit']}, OME-Zarr (4 levels) + TIFF output. Peak RSS per "
        "rule = the largest of its jobs' Snakemake `benchmark:` max RSS; limit = a quarter of the "
        f"volume as float32 ({limit:.0f} MB). A CiDeR fit's memory is set by its tile and pass, not by "
        "the volume (`cider.memory.fit_memory_bytes`; on a GPU).",
        "",
        "| rule | jobs | peak RSS (MB) | below limit | seconds (all jobs) |",
        "|---|---|---|---|---|",
    ]
    for rule in sorted(result["rules"], key=lambda r: ORDER.index(r) if r in ORDER else len(ORDER)):
        r = result["rules"][rule]
        below = "yes" if r["max_rss_mb"] < limit else "**no**"
        lines.append(f"| {rule} | {r['jobs']} | {r['max_rss_mb']:.0f} | {below} | {r['seconds']} |")
    output = result["output"]
    lines += [
        "",
        f"Wall time of the run: {result['wall_seconds']} s (the local profile; the rules' own threads: fit 2, the others 1); "
        f"writing the input: {result['input_seconds']} s. Output level 0: shape {output['shape']}, "
        f"every value finite: {output['finite']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 2048, 2048])
    parser.add_argument("--tile", type=int, nargs=3, default=[32, 256, 256])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--work", type=Path, help="folder for the run (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder")
    parser.add_argument("--table", action="store_true", help="only rewrite the table from the JSON")
    args = parser.parse_args()
    if args.table:
        result = json.loads((RESULTS / "large_run.json").read_text())
        (RESULTS / "large_run.md").write_text(markdown(result))
        return
    shape = tuple(args.shape)
    folder = Path(args.work or tempfile.mkdtemp(prefix="cider_large_"))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    config = write_input(folder, shape, args.tile)
    written = round(time.perf_counter() - start, 1)
    command = [
        *(sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")),
        *("--profile", str(ROOT / "profiles" / "local"), "--configfile", str(config)),
        *("--directory", str(folder), "--cores", str(args.cores)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # numpy and pywt: one thread; torch: the rule's threads
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = round(time.perf_counter() - start, 1)
    (folder / "snakemake.log").write_text(run.stderr)
    if run.returncode:
        raise SystemExit(f"the run failed (folder kept: {folder}):\n{run.stderr[-4000:]}")
    float32_mb = int(np.prod(shape)) * 4 / 2**20
    rules = peak_per_rule(folder / "out" / "work" / "benchmarks")
    limit = float32_mb / 4
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {args.cores} cores, CPU only",
        "shape": list(shape),
        "dtype": "uint16",
        "float32_mb": round(float32_mb, 1),
        "tile_size": args.tile,
        "fit": "restore.method rl, rl_iterations 3",
        "rss_limit_mb": round(limit, 1),
        "rules": rules,
        "all_below_limit": all(r["max_rss_mb"] < limit for r in rules.values()),
        "input_seconds": written,
        "wall_seconds": wall,
        "output": check_output(folder / "out", shape),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "large_run.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "large_run.md").write_text(markdown(result))
    print(markdown(result))
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
