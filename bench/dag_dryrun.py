"""How long Snakemake takes to build the DAG of a 10,000-tile dataset (dry run).

    python bench/dag_dryrun.py            # writes bench/results/dag_dryrun.json

The input is a 6400 × 6400 Zarr array with 64-px tiles (100 × 100 = 10,000 tiles in
1,250 fit jobs of 8); only its metadata is written, so the benchmark needs no disk space.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
import zarr

from cider.workflow import make_plan, validate_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zarr.create_array(str(tmp / "big.zarr"), shape=(6400, 6400), chunks=(64, 64), dtype="float32")
        config = {"name": "big", "input": {"path": str(tmp / "big.zarr"), "axes": "YX", "voxel_size": [0.1, 0.1]},
                  "psf": {"gaussian_sigma": 1.5}, "output_dir": str(tmp / "out"), "tiling": {"tile_size": 64}}  # fmt: skip
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        start = time.perf_counter()
        plan = make_plan(validate_config(config))
        plan_seconds = time.perf_counter() - start
        command = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "-s", str(ROOT / "Snakefile"),
                   "--directory", str(tmp), "--configfile", str(tmp / "config.yaml"), "--cores", "2"]  # fmt: skip
        start = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        dry_seconds = time.perf_counter() - start
        if run.returncode:
            raise SystemExit(run.stderr[-2000:])
    result = {"tiles": len(plan.tiles), "batches": len(plan.batches), "jobs": len(plan.batches) + 4, "plan_seconds": round(plan_seconds, 2),
              "dry_run_seconds": round(dry_seconds, 1), "machine": f"{platform.processor() or platform.machine()}, "
              "2 cores (shared, noisy)", "snakemake_summary": run.stdout.strip().splitlines()[-12:]}  # fmt: skip
    out = ROOT / "bench" / "results" / "dag_dryrun.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
