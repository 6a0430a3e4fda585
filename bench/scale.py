"""Peak memory (max RSS) and wall time of every rule as the volume grows.

    python bench/scale.py                 # 1×, 4×, 16×: 32×512×512 … 32×2048×2048 uint16
    python bench/scale.py --sizes 1 4     # a subset

Runs the real pipeline (local profile settings, 2 cores, tiny iteration counts: this
measures the rules, not the fit's quality) on seeded synthetic uint16 volumes and reads
Snakemake's ``benchmark:`` files (``work/benchmarks``). Writes
``bench/results/scale.{json,md}`` with, per size, every rule's largest max RSS and summed
wall time, and ``rss_ratio`` = {rule: peak RSS at the largest size / at the smallest}.
Target (#14): 16× the volume → every rule's peak RSS ≤ 1.2× its 1× value.
"""

from __future__ import annotations

import argparse
import csv
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BASE = (32, 512, 512)  # 1×: 8 M voxels, 16 MB as uint16
SHAPES = {1: BASE, 4: (32, 1024, 1024), 16: (32, 2048, 2048)}


def volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Seeded uint16 volume: 100 counts of background, sparse bright beads, Poisson noise,
    written plane by plane (so even the 16× case needs one plane of memory here)."""
    rng = np.random.default_rng(seed)
    for _ in range(shape[0]):
        plane = np.full(shape[1:], 100.0)
        spots = rng.integers(0, shape[1] * shape[2], size=shape[1] * shape[2] // 2000)
        plane.flat[spots] += 3000
        yield rng.poisson(plane).astype(np.uint16)


def run(size: int, folder: Path) -> dict:
    shape = SHAPES[size]
    tifffile.imwrite(folder / "volume.tif", volume(shape), shape=shape, dtype=np.uint16)
    config = {
        "name": f"scale{size}",
        "input": {"path": str(folder / "volume.tif"), "axes": "ZYX", "voxel_size": [1.0, 0.25, 0.25]},
        "psf": {"gaussian_sigma": [1.0, 1.2, 1.2]},
        "output_dir": str(folder / "out"),
        "tiling": {"tile_size": [32, 256, 256]},
        "restore": {"iterations": 1, "rl_iterations": 1},
        "background": {"enabled": True},
        "fit": {"batch_size": 4},
        "stitch": {"pyramid_levels": 3, "tiff": True},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    command = [
        *(sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "2"),
        *("--directory", str(folder), "--configfile", str(folder / "config.yaml")),
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    rules: dict[str, dict] = {}
    for tsv in sorted((folder / "out" / "work" / "benchmarks").rglob("*.tsv")):
        rule = tsv.parent.name if tsv.parent.name != "benchmarks" else tsv.stem
        with tsv.open() as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        entry = rules.setdefault(rule, {"jobs": 0, "max_rss_mb": 0.0, "seconds": 0.0})
        entry["jobs"] += 1
        entry["max_rss_mb"] = max(entry["max_rss_mb"], float(row["max_rss"]))
        entry["seconds"] = round(entry["seconds"] + float(row["s"]), 1)
    voxels = int(np.prod(shape))
    return {
        "shape": list(shape),
        "float32_mb": round(voxels * 4 / 2**20, 1),
        "rules": rules,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], choices=sorted(SHAPES))
    args = parser.parse_args()
    sizes = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            sizes[size] = run(size, Path(tmp))
            print(json.dumps({size: sizes[size]}), flush=True)
    small, large = min(sizes), max(sizes)
    ratio = {
        rule: round(sizes[large]["rules"][rule]["max_rss_mb"] / sizes[small]["rules"][rule]["max_rss_mb"], 2)
        for rule in sizes[small]["rules"]
    }
    machine = f"{platform.processor() or platform.machine()}, 2 cores (shared, noisy), CPU only"
    result = {"machine": machine, "sizes": sizes, "rss_ratio": ratio, "ratio_of": [small, large]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2))
    rules = list(sizes[small]["rules"])
    lines = [
        f"# Peak RSS per rule vs volume size ({machine})",
        "",
        "Max RSS (MB) of the largest job of each rule, and the rule's summed wall time (s).",
        "",
        "| size | shape | float32 MB | " + " | ".join(rules) + " |",
        "|---|---|---|" + "---|" * len(rules),
    ]
    for size, s in sizes.items():
        cells = [f"{s['rules'][r]['max_rss_mb']:.0f} MB, {s['rules'][r]['seconds']} s" for r in rules]
        lines.append(
            f"| {size}× | {'×'.join(map(str, s['shape']))} | {s['float32_mb']} | " + " | ".join(cells) + " |"
        )
    lines.append(f"| RSS ratio {large}×/{small}× | | | " + " | ".join(f"{ratio[r]}" for r in rules) + " |")
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
