# Validates the config, computes the tile plan from the inputs' shapes (the DAG is known
# before anything runs) and defines the helpers the other rules use.
import sys

from cider.errors import CiderError
from cider.workflow import (
    background_map,
    drop_stale_manifests,
    make_plan,
    output_settings,
    paths,
    validate_config,
)

if not config:
    raise CiderError(
        "no config: give --configfile config/datasets/X.yaml (the demo: --profile profiles/local)"
    )
config.update(validate_config(config))

PLAN = make_plan(config)
PATHS = paths(config)
LOGS = PATHS.work / "logs"
# wall time and max RSS of every job (Snakemake benchmark files)
BENCH = PATHS.work / "benchmarks"
BATCHES = [b.id for b in PLAN.batches]
PARTS = [part.id for part in PLAN.parts]
ENV = "../../envs/cider.yaml"

# A stitch job's output is its record of the images it wrote; a record whose images were
# deleted since is dropped here (by the main Snakemake process only, not by every cluster
# job that re-reads this file), so that part is stitched again.
if workflow.is_main_process:
    for part in drop_stale_manifests(PATHS, PARTS):
        print(
            f"cider: images of stitch part {part} are missing; it is stitched again",
            file=sys.stderr,
        )


wildcard_constraints:
    batch=r"b\d+",
    group=r"g\d+",
    part=r"p\d+",


def settings(*keys, **parts):
    """The config a rule's outputs depend on, given to it as ``params``: Snakemake reruns the
    rule when it changes (rerun trigger "params") and says so ("Params have changed").
    """
    return {**{key: output_settings(config, key) for key in keys}, **parts}


def groups_of_batch(wildcards):
    """Intensity records (and backgrounds) of the batch's units, and the PSF file if any."""
    groups = dict.fromkeys(
        PLAN.group_of(PLAN.tile(t).unit_id) for t in PLAN.batch(wildcards.batch).tiles
    )
    files = [str(PATHS.intensity(group)) for group in groups]
    if background_map(config):
        files += [str(PATHS.background(group)) for group in groups]
    if config["psf"]["file"]:
        files.append(config["psf"]["file"])  # a changed PSF file reruns the fits
    return files


def batches_of_part(wildcards):
    """Restored tiles of every unit of the part's input files, by batch."""
    return [str(PATHS.tiles(b)) for b in PLAN.batches_of_part(wildcards.part)]


def background_outputs():
    """Intensity records always; the background arrays only with wavelet background removal."""
    outputs = {"intensity": str(PATHS.intensity("{group}"))}
    if background_map(config):
        outputs["background"] = directory(str(PATHS.background("{group}")))
    return outputs
