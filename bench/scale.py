"""Peak memory (max RSS) and wall time of the data-sized rules as the volume grows.

    python bench/scale.py                 # 1×, 4×, 16× the planes: 32×512² … 512×512² uint16
    python bench/scale.py --grow xy --sizes 1 4   # larger planes instead (32×512² → 32×1024²)

For each size, a seeded synthetic uint16 volume goes through the rule scripts run alone
(``scripts/prepare.py``, ``background.py``, ``stitch.py``, ``report.py`` — the code the
Snakemake rules run), each under ``/usr/bin/time`` for its max RSS and wall time. The
fit is replaced by identity tiles (each tile's input window): its memory is set by the
tile and batch (``bench/throughput.py``), not by the volume, and fitting a 16× volume
takes hours on 2 CPU cores. Writes ``bench/results/scale.{json,md}`` with
``rss_ratio`` = {rule: max RSS at the largest size / at the smallest}.
Target (#14): 16× the volume → every rule's peak RSS ≤ 1.2× its 1× value.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# The light-sheet case: more planes of one camera frame (1×: 8 M voxels, 16 MB as uint16).
# Rules that work plane by plane hold a plane, so their memory grows with the plane
# (``--grow xy``), not with the number of planes.
SHAPES = {
    "z": {1: (32, 512, 512), 4: (128, 512, 512), 16: (512, 512, 512)},
    "xy": {1: (32, 512, 512), 4: (32, 1024, 1024), 16: (32, 2048, 2048)},
}


def volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Seeded uint16 volume: 100 counts of background, sparse bright beads, Poisson noise,
    written plane by plane (so even the 16× case needs one plane of memory here)."""
    rng = np.random.default_rng(seed)
    for _ in range(shape[0]):
        plane = np.full(shape[1:], 100.0)
        spots = rng.integers(0, shape[1] * shape[2], size=shape[1] * shape[2] // 2000)
        plane.flat[spots] += 3000
        yield rng.poisson(plane).astype(np.uint16)


def _timed(script: str, config: Path, *extra: str) -> dict:
    """Run a rule script alone under /usr/bin/time: its max RSS (MB) and seconds."""
    command = [
        "/usr/bin/time",
        "-f",
        "%M %e",
        sys.executable,
        str(ROOT / "scripts" / script),
        "--config",
        str(config),
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{script}: {done.stderr[-3000:]}")
    rss_kb, seconds = done.stderr.strip().splitlines()[-1].split()
    return {"max_rss_mb": round(int(rss_kb) / 1024, 1), "seconds": float(seconds)}


def _identity_fit(config_path: Path) -> None:
    """Write every batch's tiles as their input windows (what a fit that changes nothing
    returns) and minimal metrics, so that stitch and report have their inputs."""
    from cider import io
    from cider.workflow import load_config, make_plan, paths
    from cider.workflow.steps import unit_array

    config = load_config(config_path)
    plan, p = make_plan(config), paths(config)
    for batch in plan.batches:
        tiles, records = {}, []
        for tile_id in batch.tiles:
            tile = plan.tile(tile_id)
            tiles[tile_id] = np.asarray(unit_array(config, tile.unit_id)[tile.slices()], dtype=np.float32)
            records.append(
                {"tile": tile_id, "iterations": 0, "final_loss": 0.0, "seconds": 0.0, "device": "none"}
            )
        io.atomic_write_npz(p.tiles(batch.id), tiles)
        io.atomic_write_json(p.metrics(batch.id), {"batch": batch.id, "tiles": records})


def run(shape: tuple[int, ...], size: int, folder: Path) -> dict:
    tifffile.imwrite(folder / "volume.tif", volume(shape), shape=shape, dtype=np.uint16)
    config = {
        "name": f"scale{size}",
        "input": {"path": str(folder / "volume.tif"), "axes": "ZYX", "voxel_size": [1.0, 0.25, 0.25]},
        "psf": {"gaussian_sigma": [1.0, 1.2, 1.2]},
        "output_dir": str(folder / "out"),
        "tiling": {"tile_size": [32, 256, 256]},
        "background": {"enabled": True},
        "stitch": {"pyramid_levels": 3, "tiff": True},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    rules = {
        "prepare": _timed("prepare.py", path),
        "background": _timed("background.py", path, "--group", "g0"),
    }
    _identity_fit(path)
    rules["stitch"] = _timed("stitch.py", path, "--part", "p0")
    rules["report"] = _timed("report.py", path)
    return {
        "shape": list(shape),
        "float32_mb": round(int(np.prod(shape)) * 4 / 2**20, 1),
        "rules": rules,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], choices=[1, 4, 16])
    parser.add_argument("--grow", choices=sorted(SHAPES), default="z", help="axes that grow (default z)")
    args = parser.parse_args()
    sizes = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            sizes[size] = run(SHAPES[args.grow][size], size, Path(tmp))
            print(json.dumps({size: sizes[size]}), flush=True)
    small, large = min(sizes), max(sizes)
    ratio = {
        rule: round(sizes[large]["rules"][rule]["max_rss_mb"] / sizes[small]["rules"][rule]["max_rss_mb"], 2)
        for rule in sizes[small]["rules"]
    }
    machine = f"{platform.processor() or platform.machine()}, 2 cores (shared, noisy), CPU only"
    result = {
        "machine": machine,
        "grow": args.grow,
        "sizes": sizes,
        "rss_ratio": ratio,
        "ratio_of": [small, large],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "scale" if args.grow == "z" else f"scale_{args.grow}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    rules = list(sizes[small]["rules"])
    lines = [
        f"# Peak RSS per rule vs volume size, growing {args.grow} ({machine})",
        "",
        "Max RSS (MB) and wall time (s) of each rule script run alone (`/usr/bin/time`); the fit is",
        "replaced by identity tiles (its memory is per tile and batch, see throughput.md).",
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
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
