# Validates the config, computes the tile plan from the inputs' shapes (the DAG is known
# before anything runs) and defines the helpers the other rules use.
from cider.errors import CiderError
from cider.workflow import make_plan, paths, validate_config

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
ENV = "../../envs/cider.yaml"


wildcard_constraints:
    batch=r"b\d+",
    unit=r"u\d+",
    name=r"[^/]+",


def settings(*keys, **parts):
    """The config a rule's outputs depend on, given to it as ``params``: Snakemake reruns the
    rule when it changes (rerun trigger "params") and says so ("Params have changed").
    """
    return {**{key: config[key] for key in keys}, **parts}


def units_of_batch(wildcards):
    """Intensity range (and background) of the batch's units, and the PSF file if any."""
    units = dict.fromkeys(
        PLAN.tile(t).unit_id for t in PLAN.batch(wildcards.batch).tiles
    )
    files = [str(PATHS.intensity(unit)) for unit in units]
    if config["background"]["enabled"]:
        files += [str(PATHS.background(unit)) for unit in units]
    if config["psf"]["file"]:
        files.append(config["psf"]["file"])  # a changed PSF file reruns the fits
    return files


def batches_of_name(wildcards):
    """Restored tiles of every unit (time point, channel) of one input file, by batch."""
    return [str(PATHS.tiles(b)) for b in PLAN.batches_of(wildcards.name)]


def background_outputs():
    """Intensity range always; the background array only when background removal is on."""
    outputs = {"intensity": str(PATHS.intensity("{unit}"))}
    if config["background"]["enabled"]:
        outputs["background"] = directory(str(PATHS.background("{unit}")))
    return outputs


def stitch_outputs():
    """OME-Zarr always; TIFF when stitch.tiff is true."""
    outputs = {"image": directory(str(PATHS.image("{name}")))}
    if config["stitch"]["tiff"]:
        outputs["tiff"] = str(PATHS.tiff("{name}"))
    return outputs
