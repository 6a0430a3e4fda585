"""Glue between the Snakemake workflow and the library, one module per job.

- :mod:`.config`: the dataset config (schema, defaults, validation);
- :mod:`.plan`: paths of a run and the tile plan (units, tiles, batches);
- :mod:`.steps`: one ``run_*`` function per rule;
- :mod:`.report`: the QC report;
- :mod:`.glue`: config and wildcards for a rule script (Snakemake or shell).

Every rule script calls one ``run_*`` function with the validated config and its
wildcard, so a rule can also be run alone from the shell (see ``scripts/*.py``).
"""

from .config import SCHEMA, load_config, validate_config
from .glue import ALLOW_CPU_ENV, require_gpu, script_args
from .plan import Batch, Paths, Plan, Unit, input_files, make_batches, make_plan, make_psf, paths
from .report import run_report, seam_score, sharpness
from .steps import FAIL_ENV, TileReader, run_background, run_fit, run_prepare, run_stitch, tile_metrics

__all__ = [
    "SCHEMA",
    "load_config",
    "validate_config",
    "ALLOW_CPU_ENV",
    "require_gpu",
    "script_args",
    "Batch",
    "Paths",
    "Plan",
    "Unit",
    "input_files",
    "make_batches",
    "make_plan",
    "make_psf",
    "paths",
    "run_report",
    "seam_score",
    "sharpness",
    "FAIL_ENV",
    "TileReader",
    "run_background",
    "run_fit",
    "run_prepare",
    "run_stitch",
    "tile_metrics",
]
