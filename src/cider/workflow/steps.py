"""One function per rule: prepare, background, fit (batched), stitch.

Every output is written atomically (temporary name, then rename), so a killed job never
leaves a file that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from .. import io
from ..background import BackgroundConfig, wavelet_background
from ..errors import CiderError
from ..noise import NoiseModel, estimate_noise
from ..tiling import Tile, stitch
from .plan import Unit, make_plan, make_psf, paths, per_axis

FAIL_ENV = "CIDER_FAIL_TILES"  # comma-separated tile ids whose batch fails (fault injection for tests)


def _restore_config(config: dict, device: str | None = None):
    from ..restore import RestoreConfig

    r = dict(config["restore"])
    r["device"] = device or r["device"]
    return RestoreConfig(normalize=True, **r)


def _read_unit(unit: Unit, config: dict) -> np.ndarray:
    axes = config["input"]["axes"].upper()
    index, outer = [], iter(unit.index)
    for a in axes:
        index.append(next(outer) if a in "TC" else slice(None))
    try:
        return np.asarray(io.open_array(unit.file)[tuple(index)], dtype=np.float32)
    except (OSError, ValueError, KeyError) as err:
        raise CiderError(
            f"{unit.file} (unit {unit.id}, index {unit.index}): cannot read it ({err}); the file may be "
            "damaged or have changed since planning: check it, then rerun"
        ) from err


def run_prepare(config: dict) -> None:
    """Copy every unit into ``input.zarr`` (float32, chunked on the tile grid)."""
    import zarr

    plan, p = make_plan(config), paths(config)
    root = zarr.open_group(str(p.input_zarr()), mode="w")
    chunks = per_axis(config["tiling"]["tile_size"], len(plan.psf_shape), "tiling.tile_size")
    for unit in plan.units:
        plan.check_input(unit.file)
        data = _read_unit(unit, config)
        if not np.all(np.isfinite(data)):
            raise CiderError(f"{unit.file} (unit {unit.id}, index {unit.index}): contains NaN/inf values")
        array = root.create_array(unit.id, shape=data.shape, chunks=chunks, dtype="float32", overwrite=True)
        array[...] = data
    summary = {"units": [u.__dict__ | {"index": list(u.index), "shape": list(u.shape)} for u in plan.units],
               "tiles": len(plan.tiles), "psf_shape": list(plan.psf_shape), "margin": list(plan.margin),
               "blend": list(plan.blend)}  # fmt: skip
    io.atomic_write_json(p.prepared(), summary)


def unit_array(config: dict, unit_id: str):
    import zarr

    return zarr.open_array(str(paths(config).input_zarr() / unit_id), mode="r")


def run_background(config: dict, unit_id: str) -> None:
    """Background, intensity scale and noise model of one whole unit (once, so tiles agree)."""
    p = paths(config)
    data = np.asarray(unit_array(config, unit_id)[...], dtype=np.float64)
    bg_cfg = config["background"]
    if bg_cfg["enabled"]:
        background = wavelet_background(data, BackgroundConfig(**bg_cfg))
        io.atomic_write_npy(p.background(unit_id), background.astype(np.float32))
        data = data - background
    from ..restore import intensity_scale

    noise = estimate_noise(data)
    scale = intensity_scale(data)
    intensity = {
        "scale": scale,
        "mean": float(data.mean()),
        "noise": {"gain": noise.gain, "floor": noise.floor},
    }
    value_range = _feature_range(data / scale, _restore_config(config, device="cpu"))
    if value_range is not None:
        intensity["feature_low"], intensity["feature_high"] = value_range
    io.atomic_write_json(p.intensity(unit_id), intensity)


def _feature_range(observation: np.ndarray, rcfg) -> tuple[list[float], list[float]] | None:
    """The whole image's per-channel feature range (one positivity map for all its tiles)."""
    import torch

    from ..restore import feature_range

    if rcfg.generator_input == "noise":
        return None
    with torch.no_grad():
        return feature_range(torch.as_tensor(observation, dtype=torch.float32), rcfg)


def _prepared_tile(config: dict, tile: Tile, device=None):
    """A tile's prepared observation, its RestoreConfig and its image's intensity record."""
    from ..restore import prepare

    p = paths(config)
    window = tile.slices()
    unit_id = tile.unit_id
    data = np.asarray(unit_array(config, unit_id)[window], dtype=np.float64)
    background = (
        np.load(p.background(unit_id), mmap_mode="r")[window] if config["background"]["enabled"] else None
    )
    intensity = json.loads(p.intensity(unit_id).read_text())
    psf = make_psf(config, data.ndim)
    rcfg = _restore_config(config)
    noise = NoiseModel(**intensity["noise"])
    prepared = prepare(
        data,
        psf,
        rcfg,
        background,
        intensity["scale"],
        noise,
        device=device,
        mean_signal=intensity["mean"],
        voxel_size=config["input"]["voxel_size"],
    )
    return prepared, rcfg, intensity


def _tile_input(config: dict, tile: Tile):
    """Prepared observation and generator input (features + RL) of one tile."""
    from ..restore import deconvolved_features

    prepared, rcfg, intensity = _prepared_tile(config, tile)
    value_range = (
        (intensity["feature_low"], intensity["feature_high"]) if "feature_low" in intensity else None
    )
    return prepared, deconvolved_features(prepared, rcfg, value_range), rcfg


def run_fit(config: dict, batch_id: str) -> dict:
    """Features, RL and the batched generator fit of one batch of same-shape tiles.

    Writes the restored padded tiles (``tiles/{batch}.npz``, one array per tile id) and
    their metrics (``metrics/{batch}.json``). The features cost ~1 % of the fit and are
    deterministic, so they are computed here instead of round-tripping through disk.
    """
    import torch

    from ..fitting import fit_generators
    from ..restore import resolve_device, to_data_units

    plan, p = make_plan(config), paths(config)
    batch = plan.batch(batch_id)
    resolve_device(config["restore"]["device"])  # fail at start, not after the features
    failing = set(batch.tiles) & set(os.environ.get(FAIL_ENV, "").split(","))
    if failing:
        raise RuntimeError(f"tile {sorted(failing)[0]}: failure injected through ${FAIL_ENV} (testing hook)")
    start = time.perf_counter()
    tiles = [plan.tile(t) for t in batch.tiles]
    inputs = [_tile_input(config, tile) for tile in tiles]
    rcfg = inputs[0][2]
    prepared = [i[0] for i in inputs]
    fits = fit_generators([i[1] for i in inputs], prepared, rcfg, labels=[f"tile {t}" for t in batch.tiles])
    seconds = round(time.perf_counter() - start, 2)
    device = prepared[0].observation.device
    restored, records = {}, []
    for tile, fit, prep in zip(tiles, fits, prepared):
        restored[tile.id] = to_data_units(fit.estimate, prep)
        losses = fit.losses
        records.append(
            {
                "tile": tile.id,
                "batch": batch_id,
                "unit": tile.unit_id,
                "padded": [list(w) for w in tile.padded],
                "iterations": len(losses),
                "final_loss": losses[-1] if losses else None,
                "chi2": fit.chi2 if math.isfinite(fit.chi2) else None,
                "stopped": fit.stopped,
                "flux_factor": fit.flux_factor,
                "loss_history": losses[:: max(1, len(losses) // 200)],
                "seconds": round(seconds / len(tiles), 2),
                "device": str(device),
            }
        )
    batch_record = {
        "batch": batch_id,
        "tiles": records,
        "batch_size": len(tiles),
        "seconds": seconds,
        "device": str(device),
    }
    if torch.cuda.is_available() and device.type == "cuda":
        batch_record["device_name"] = torch.cuda.get_device_name(device)
        for record in records:
            record["device_name"] = batch_record["device_name"]
    io.atomic_write_npz(p.tiles(batch_id), restored)
    io.atomic_write_json(p.metrics(batch_id), batch_record)
    return batch_record


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


def tile_metrics(config: dict) -> list[dict]:
    """Fit metrics of every tile, in plan order."""
    plan, p = make_plan(config), paths(config)
    by_tile = {}
    for batch in plan.batches:
        for record in json.loads(p.metrics(batch.id).read_text())["tiles"]:
            by_tile[record["tile"]] = record
    return [by_tile[t.id] for t in plan.tiles]


def run_stitch(config: dict, name: str) -> None:
    """Blend all tiles of the units of input ``name`` into OME-Zarr (and TIFF)."""
    plan, p = make_plan(config), paths(config)
    units = plan.units_of(name)
    read_tile = TileReader(config)
    axes = config["input"]["axes"].upper()
    outer_axes = [a for a in axes if a in "TC"]
    images = []
    for unit in units:
        tiles = plan.tiles_of(unit.id)
        images.append(stitch(tiles, read_tile, unit.shape, plan.blend))
    outer_shape = [max(u.index[i] for u in units) + 1 for i in range(len(outer_axes))]
    result = np.stack(images).reshape(*outer_shape, *units[0].shape)
    result_axes = "".join(outer_axes) + "".join(a for a in axes if a in "ZYX")
    voxel = config["input"]["voxel_size"]
    io.write_ome_zarr(p.image(name), result, result_axes, voxel, levels=config["stitch"]["pyramid_levels"])
    if config["stitch"]["tiff"]:
        io.write_image(p.tiff(name), result)
