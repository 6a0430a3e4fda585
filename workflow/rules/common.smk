# Validates the config, computes the tile plan from the inputs' shapes (the DAG is known
# before anything runs) and defines the helpers the other rules use.
from cider.workflow import make_plan, paths, validate_config

config.update(validate_config(config))

PLAN = make_plan(config)
PATHS = paths(config)
LOGS = PATHS.work / "logs"
TILES = [t.id for t in PLAN.tiles]
ENV = "../../envs/cider.yaml"


wildcard_constraints:
    tile=r"u\d{3}-t\d{5}",
    unit=r"u\d{3}",
    name=r"[^/]+",


def unit_of_tile(wildcards):
    """Intensity range (and background) of the unit a tile belongs to."""
    unit = PLAN.tile(wildcards.tile).unit_id
    files = [str(PATHS.intensity(unit))]
    if config["background"]["enabled"]:
        files.append(str(PATHS.background(unit)))
    return files


def tiles_of_name(wildcards):
    """Restored tiles of every unit (time point, channel) of one input file."""
    return [
        str(PATHS.tile(t.id))
        for u in PLAN.units_of(wildcards.name)
        for t in PLAN.tiles_of(u.id)
    ]


def background_outputs():
    """Intensity range always; the background array only when background removal is on."""
    outputs = {"intensity": str(PATHS.intensity("{unit}"))}
    if config["background"]["enabled"]:
        outputs["background"] = str(PATHS.background("{unit}"))
    return outputs


def stitch_outputs():
    """OME-Zarr always; TIFF when stitch.tiff is true."""
    outputs = {"image": directory(str(PATHS.image("{name}")))}
    if config["stitch"]["tiff"]:
        outputs["tiff"] = str(PATHS.tiff("{name}"))
    return outputs
