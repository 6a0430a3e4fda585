"""The stitch rule: blend the restored tiles of each input into one OME-Zarr (and TIFF),
block by block, with the provenance that says how it was made.

Every output is written atomically (temporary name, then rename), so a killed job never
leaves a file that looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import io
from ..errors import CiderError
from ..tiling import Tile, block_grid, stitch_block
from .config import background_map, restore_config
from .layout import intensity_records, paths
from .plan import Unit, make_plan, per_axis


class TileReader:
    """Reads restored tiles from the batch files (each file opened once)."""

    def __init__(self, config: dict):
        self.plan, self.paths = make_plan(config), paths(config)
        self.files: dict[str, np.lib.npyio.NpzFile] = {}

    def __call__(self, tile: Tile) -> np.ndarray:
        batch = self.plan.batch_of(tile.id)
        if batch not in self.files:
            self.files[batch] = np.load(self.paths.tiles(batch))
        return self.files[batch][tile.id]


def run_stitch(config: dict, part_id: str) -> dict:
    """Stitch every input file (name) of one part, then record what was written.

    Each name becomes one OME-Zarr (and TIFF, if asked) through :func:`stitch_name`. The
    record ``work/stitched/{part}.json`` (the rule's output) lists the files; it is
    written last, so a killed job leaves no record and the part is stitched again.
    """
    plan, p = make_plan(config), paths(config)
    images, read_tile = {}, TileReader(config)  # small images of a part share batch files
    for name in plan.part(part_id).members:
        files = stitch_name(config, name, read_tile)
        images[name] = {"files": [str(f) for f in files], "units": [u.id for u in plan.units_of(name)]}
    record = {"part": part_id, "images": images}
    io.atomic_write_json(p.stitched(part_id), record)
    return record


def stitch_name(config: dict, name: str, read_tile: TileReader | None = None) -> list[Path]:
    """Blend the tiles of every unit of input ``name`` into one OME-Zarr (and TIFF).

    Block by block: each level-0 chunk is made from only the tiles that overlap it and
    written straight into the OME-Zarr; the pyramid is built chunkwise from level 0 and
    the TIFF page by page. Memory: a chunk (the tile core size) plus a few padded tiles,
    whatever the size of the image and the number of time points and channels.

    ``read_tile`` reads the restored tiles (a :class:`TileReader`, which opens each batch
    file once; a new one if not given).

    Returns
    -------
    list[Path]
        The files written: the OME-Zarr, then the TIFF if ``stitch.tiff``.

    Raises
    ------
    CiderError
        If a block holds NaN or infinite values (naming the unit and the block), or the
        tiles were fitted with different feature weights (:func:`fitted_weights_digest`).
    """
    plan, p = make_plan(config), paths(config)
    units = plan.units_of(name)
    weights = fitted_weights_digest(config, name)  # a mix of weights stops before any block is written
    read_tile = read_tile or TileReader(config)
    axes = config["input"]["axes"].upper()
    outer_axes = "".join(a for a in axes if a in "TC")
    result_axes = outer_axes + "".join(a for a in axes if a in "ZYX")
    spatial_shape = units[0].shape
    outer_shape = tuple(max(u.index[i] for u in units) + 1 for i in range(len(outer_axes)))
    block = per_axis(config["tiling"]["tile_size"], len(spatial_shape), "tiling.tile_size")
    level0 = io.create_ome_zarr(
        p.image(name),
        (*outer_shape, *spatial_shape),
        np.float32,
        result_axes,
        (1,) * len(outer_shape) + block,
    )
    for unit in units:
        tiles = plan.tiles_of(unit.id)
        for window in block_grid(unit.shape, block):
            data = stitch_block(tiles, read_tile, unit.shape, plan.blend, window)
            if not np.all(np.isfinite(data)):
                raise CiderError(f"{name} (unit {unit.id}): block {window} holds NaN/inf values; not written")
            level0[(*unit.index, *(slice(a, b) for a, b in window))] = data
    voxel = config["input"]["voxel_size"]
    made = provenance(config, name, weights)
    if levels := background_levels(config, units):
        made["background_level"] = levels
    io.finish_ome_zarr(p.image(name), result_axes, voxel, config["stitch"]["pyramid_levels"], made)
    if not config["stitch"]["tiff"]:
        return [p.image(name)]
    io.write_tiff_pages(p.tiff(name), io.open_array(p.image(name)), json.dumps({"cider": made}))
    return [p.image(name), p.tiff(name)]


def background_levels(config: dict, units: list[Unit]) -> dict[str, dict]:
    """The flat background level the background job subtracted from each unit (in the
    input's units, above ``input.offset``) and the fraction of pixels it rests on, by
    unit id: empty unless ``background.method`` is ``flat``."""
    if not config["background"]["enabled"] or background_map(config):
        return {}
    plan, p = make_plan(config), paths(config)
    records = {u.id: intensity_records(str(p.intensity(plan.group_of(u.id))))[u.id] for u in units}
    return {
        unit: record["background_level"] for unit, record in records.items() if "background_level" in record
    }


PROVENANCE_SECTIONS = ("input", "psf", "background", "tiling", "restore", "fit", "stitch")


def fitted_weights_digest(config: dict, name: str) -> str | None:
    """SHA-256 of the feature-extractor weights that the fit jobs of ``name``'s tiles
    used, as their metrics record it (a fit node may have another install than the
    stitch node); the stitch node's own when no metrics record it (older runs).

    Raises
    ------
    CiderError
        If the tiles were fitted with different weights (naming two batches).
    """
    from ..restore import feature_weights_digest

    plan, p = make_plan(config), paths(config)
    batches = {plan.batch_of(t.id) for unit in plan.units_of(name) for t in plan.tiles_of(unit.id)}
    used: dict[str | None, str] = {}  # digest → first batch that recorded it
    for batch in sorted(batches):
        record = json.loads(p.metrics(batch).read_text())
        if "feature_weights_sha256" in record:
            used.setdefault(record["feature_weights_sha256"], batch)
    if len(used) > 1:
        (first, a), (second, b) = list(used.items())[:2]
        raise CiderError(
            f"{name}: its tiles were fitted with different feature weights (batch {a}: "
            f"{str(first)[:12]}, batch {b}: {str(second)[:12]}); install one version on every "
            f"node and rerun the fit jobs (delete {p.metrics(a).parent} and {p.tiles(a).parent})"
        )
    if used:
        return next(iter(used))
    return feature_weights_digest(restore_config(config))


def provenance(config: dict, name: str, weights_sha256: str | None) -> dict:
    """How an output was made, stored with it (OME-Zarr attribute ``cider``, TIFF
    ImageDescription): the software version, the input name, every config section that
    can change the result, with the defaults the schema filled in, and the SHA-256 of
    the feature-extractor weights the fits used (:func:`fitted_weights_digest`; ``None``
    for a generator input without features)."""
    from .. import __version__

    settings = {section: config.get(section) for section in PROVENANCE_SECTIONS}
    made = {
        "software": "cider-pipeline",
        "version": __version__,
        "input": name,
        "settings": settings,
        "feature_weights_sha256": weights_sha256,
    }
    return json.loads(json.dumps(made, default=str))
