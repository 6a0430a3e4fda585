"""Glue between the Snakemake workflow and the library, one module per job.

- :mod:`.config`: the dataset config (schema, defaults, validation, the restore settings);
- :mod:`.layout`: where a run's files live, and the background job's records;
- :mod:`.optics`: the PSF the config describes;
- :mod:`.plan`: the plan (units, tiles, fit batches, job groups);
- :mod:`.steps`: one ``run_*`` function per rule (prepare, background, fit);
- :mod:`.stitch`: the stitch rule (blending, the output's provenance);
- :mod:`.report`: the QC report;
- :mod:`.glue`: config and wildcards for a rule script (Snakemake or shell).

Every rule script calls one ``run_*`` function with the validated config and its
wildcard, so a rule can also be run alone from the shell (see ``scripts/*.py``).
"""

from .config import SCHEMA, background_map, load_config, output_settings, restore_config, validate_config
from .glue import ALLOW_CPU_ENV, require_gpu, script_args
from .layout import Paths, drop_stale_manifests, intensity_records, paths
from .optics import make_psf
from .plan import (
    Batch,
    Group,
    Plan,
    Unit,
    input_files,
    make_batches,
    make_groups,
    make_plan,
    psf_channel,
)
from .report import boundary_seams, run_report, tile_flags
from .steps import (
    FAIL_ENV,
    run_background,
    run_fit,
    run_prepare,
    tile_metrics,
    unit_background,
)
from .stitch import TileReader, run_stitch, stitch_name

__all__ = [
    "SCHEMA",
    "background_map",
    "load_config",
    "output_settings",
    "restore_config",
    "validate_config",
    "ALLOW_CPU_ENV",
    "require_gpu",
    "script_args",
    "Batch",
    "Group",
    "Paths",
    "Plan",
    "Unit",
    "drop_stale_manifests",
    "intensity_records",
    "input_files",
    "make_batches",
    "make_groups",
    "make_plan",
    "psf_channel",
    "make_psf",
    "paths",
    "boundary_seams",
    "run_report",
    "tile_flags",
    "FAIL_ENV",
    "TileReader",
    "run_background",
    "run_fit",
    "run_prepare",
    "run_stitch",
    "stitch_name",
    "tile_metrics",
    "unit_background",
]
