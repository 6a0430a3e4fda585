"""Glue between the Snakemake workflow and the library: config, plan, one function per rule.

Every rule script calls one ``run_*`` function here with the validated config and its
wildcard, so a rule can also be run alone from the shell (see ``scripts/*.py``). All
paths come from :func:`paths`; every output is written atomically (temporary name,
then rename), so a killed job never leaves a file that looks complete.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import yaml

from . import io
from .background import BackgroundConfig, wavelet_background
from .errors import CiderError
from .noise import NoiseModel, estimate_noise
from .psf import clean_psf, gaussian_psf, lightsheet_psf, widefield_psf
from .tiling import Tile, minimum_margin, stitch, tile_grid, unit_name

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
ALLOW_CPU_ENV = "CIDER_ALLOW_CPU"  # "1": a job given a GPU may still run on CPU (test clusters)
FAIL_ENV = "CIDER_FAIL_TILES"  # comma-separated tile ids whose batch fails (fault injection for tests)


# ----------------------------------------------------------------------------- config
def _fill_defaults(schema: dict, data: dict) -> dict:
    for key, sub in schema.get("properties", {}).items():
        if key not in data and "default" in sub:
            data[key] = deepcopy(sub["default"])
        if isinstance(data.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(sub, data[key])
    return data


@lru_cache(maxsize=1)
def _schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def validate_config(config: dict, source: str = "config") -> dict:
    """Validate ``config`` against the schema, fill defaults, and return it.

    Raises
    ------
    CiderError
        Naming the key (dotted path), the value and the rule it broke.
    """
    import jsonschema

    schema = _schema()
    config = _fill_defaults(schema, deepcopy(dict(config)))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        lines = []
        for err in errors:
            key = ".".join(str(p) for p in err.path) or "(top level)"
            lines.append(f"  key '{key}': {err.message}")
        raise CiderError(
            f"{source}: invalid configuration\n" + "\n".join(lines) + "\nsee config/README.md for every key"
        )
    return config


def load_config(path: str | Path) -> dict:
    """Read a YAML config file and validate it (see :func:`validate_config`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {path}")
    return validate_config(yaml.safe_load(path.read_text()) or {}, source=str(path))


# ------------------------------------------------------------------------------ paths
@dataclass(frozen=True)
class Paths:
    """Where every file of a run lives."""

    output: Path
    work: Path

    def input_zarr(self) -> Path:
        return self.work / "input.zarr"

    def prepared(self) -> Path:
        return self.work / "prepared.json"

    def background(self, unit: str) -> Path:
        return self.work / "background" / f"{unit}.npy"

    def intensity(self, unit: str) -> Path:
        return self.work / "background" / f"{unit}.json"

    def tiles(self, batch: str) -> Path:
        """Restored padded tiles of one batch, one array per tile id."""
        return self.work / "tiles" / f"{batch}.npz"

    def metrics(self, batch: str) -> Path:
        """Fit metrics of one batch's tiles."""
        return self.work / "metrics" / f"{batch}.json"

    def image(self, name: str) -> Path:
        return self.output / f"{name}.ome.zarr"

    def tiff(self, name: str) -> Path:
        return self.output / f"{name}.tif"

    def report(self) -> Path:
        return self.output / "report" / "index.html"


def paths(config: dict) -> Paths:
    output = Path(config["output_dir"])
    return Paths(output, Path(config.get("work_dir") or output / "work"))


# ------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Unit:
    """One image to restore: a (file, time point, channel) with a 2D/3D spatial shape."""

    id: str
    name: str
    file: str
    index: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    """Same-shape tiles fitted together by one ``fit`` job (``fit.batch_size`` at most)."""

    id: str
    tiles: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """Everything the DAG needs, derived from the config and the inputs' shapes."""

    units: tuple[Unit, ...]
    tiles: tuple[Tile, ...]
    batches: tuple[Batch, ...]
    names: tuple[str, ...]
    psf_shape: tuple[int, ...]
    margin: tuple[int, ...]
    blend: tuple[int, ...]

    def tile(self, tile_id: str) -> Tile:
        return self._tiles_by_id[tile_id]

    def batch(self, batch_id: str) -> Batch:
        return self._batches_by_id[batch_id]

    def batch_of(self, tile_id: str) -> str:
        """Id of the batch that fits tile ``tile_id``."""
        return self._batch_of_tile[tile_id]

    @cached_property
    def _tiles_by_id(self) -> dict[str, Tile]:
        return {t.id: t for t in self.tiles}

    @cached_property
    def _batches_by_id(self) -> dict[str, Batch]:
        return {b.id: b for b in self.batches}

    @cached_property
    def _batch_of_tile(self) -> dict[str, str]:
        return {t: b.id for b in self.batches for t in b.tiles}

    def tiles_of(self, unit_id: str) -> list[Tile]:
        return [t for t in self.tiles if t.unit_id == unit_id]

    def units_of(self, name: str) -> list[Unit]:
        return [u for u in self.units if u.name == name]

    def batches_of(self, name: str) -> list[str]:
        """Ids of the batches holding tiles of input ``name`` (in plan order)."""
        units = {u.id for u in self.units_of(name)}
        return list(dict.fromkeys(self.batch_of(t.id) for t in self.tiles if t.unit_id in units))


def make_batches(tiles: Sequence[Tile], batch_size: int) -> tuple[Batch, ...]:
    """Group tiles of one padded shape, in plan order, into batches of ``batch_size``.

    Tiles of one image all have one shape (``tile_grid(..., uniform=True)``); images of
    the same shape share batches too.
    """
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for tile in tiles:
        by_shape.setdefault(tile.padded_shape, []).append(tile.id)
    groups = [ids[i : i + batch_size] for ids in by_shape.values() for i in range(0, len(ids), batch_size)]
    return tuple(Batch(f"b{number}", tuple(ids)) for number, ids in enumerate(groups))


def input_files(config: dict) -> list[str]:
    """Files named by ``input.path``: a file, a folder (its images) or a glob."""
    pattern = str(config["input"]["path"])
    if os.path.isdir(pattern) and not pattern.rstrip("/").endswith(".zarr"):
        files = sorted(str(p) for p in Path(pattern).iterdir() if p.suffix.lower() in io.IMAGE_SUFFIXES)
    else:
        files = sorted(glob.glob(pattern))
    if not files:
        raise CiderError(
            f"config key 'input.path': no input found at {pattern!r}; give a file, folder or glob"
        )
    return files


def _file_shape(path: str) -> tuple[int, ...]:
    suffix = Path(path).suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return tuple(tif.series[0].shape)
    if suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            return (
                (im.height, im.width)
                if im.mode in ("L", "I;16", "I", "F")
                else (im.height, im.width, len(im.getbands()))
            )
    return tuple(io.open_array(path).shape)


def _units(config: dict) -> list[Unit]:
    axes = config["input"]["axes"].upper()
    spatial = "".join(a for a in axes if a in "ZYX")
    if spatial not in ("YX", "ZYX") or sorted(axes) != sorted(set(axes)) or set(axes) - set("TCZYX"):
        raise CiderError(
            f"config key 'input.axes': {axes!r} must be one of YX, CYX, ZYX, CZYX, TCZYX (letters in this order)"
        )
    units, files = [], input_files(config)
    stems = [Path(f).name.split(".")[0] for f in files]
    for file, stem in zip(files, stems):
        shape = _file_shape(file)
        if len(shape) != len(axes):
            raise CiderError(
                f"{file}: has {len(shape)} axes (shape {shape}) but config key 'input.axes' is {axes!r}"
            )
        name = stem if stems.count(stem) == 1 else f"{stem}_{len(units)}"
        outer = [n for a, n in zip(axes, shape) if a in "TC"]
        for index in np.ndindex(*outer):
            spatial_shape = tuple(n for a, n in zip(axes, shape) if a in "ZYX")
            units.append(Unit(unit_name(len(units)), name, file, tuple(int(i) for i in index), spatial_shape))
    return units


def make_psf(config: dict, ndim: int) -> np.ndarray:
    """The PSF the config describes (file, Gaussian or optical model), validated.

    Computed once per process (the plan and a tile's restore both need it).
    """
    key = json.dumps({"psf": config["psf"], "voxel_size": config["input"]["voxel_size"]}, sort_keys=True)
    return _cached_psf(key, ndim).copy()


@lru_cache(maxsize=8)
def _cached_psf(key: str, ndim: int) -> np.ndarray:
    config = json.loads(key)
    spec = config["psf"]
    voxel = config["voxel_size"]
    if spec.get("file"):
        name = f"config key 'psf.file' ({spec['file']})"
        psf_voxel = spec.get("voxel_size")
        if psf_voxel is not None and voxel is None:
            raise CiderError(
                "config key 'psf.voxel_size' needs 'input.voxel_size' (the image's sampling) too"
            )
        psf, notes = clean_psf(
            io.read_psf(spec["file"]),
            name=name,
            psf_voxel_size=psf_voxel,
            image_voxel_size=voxel if psf_voxel is not None else None,
            remove_pedestal=spec["remove_pedestal"],
            recentre=spec["recentre"],
            energy=spec["energy"],
        )
        for note in notes:
            print(f"cider: {note}", file=sys.stderr)
        return psf
    if spec.get("model"):
        size = spec.get("size")
        if not size or len(size) != ndim:
            raise CiderError(f"config key 'psf.size': give {ndim} odd sizes for psf.model {spec['model']!r}")
        indices = {k: spec[k] for k in ("immersion_index", "sample_index") if spec.get(k) is not None}
        if "immersion_index" in indices:
            indices.setdefault("sample_index", indices["immersion_index"])
        if spec["model"] == "lightsheet":
            return lightsheet_psf(
                size, voxel, spec["wavelength"], spec["na"], spec["sheet_thickness"], **indices
            )
        return widefield_psf(size, voxel, spec["wavelength"], spec["na"], **indices)
    sigma = spec.get("gaussian_sigma")
    if sigma is None:
        raise CiderError("config key 'psf': give one of 'file', 'gaussian_sigma' or 'model'")
    return gaussian_psf(sigma if isinstance(sigma, (int, float)) else tuple(sigma), ndim=ndim)


@lru_cache(maxsize=8)
def _cached_plan(config_json: str) -> Plan:
    config = json.loads(config_json)
    units = _units(config)
    ndim = len(units[0].shape)
    if any(len(u.shape) != ndim for u in units):
        raise CiderError("config key 'input.path': all inputs must have the same number of spatial axes")
    voxel = config["input"].get("voxel_size")
    if voxel is not None and len(voxel) != ndim:
        axes = config["input"]["axes"]
        raise CiderError(
            f"config key 'input.voxel_size': {voxel} has {len(voxel)} values but the images have {ndim} "
            f"spatial axes (input.axes {axes!r}); give one size per spatial axis, Z Y X order"
        )
    psf_shape = make_psf(config, ndim).shape
    tiling = config["tiling"]
    tile_size = _per_axis(tiling["tile_size"], ndim, "tiling.tile_size")
    need = minimum_margin(psf_shape)
    margin = need if tiling["margin"] == "auto" else _per_axis(tiling["margin"], ndim, "tiling.margin")
    if any(m < n for m, n in zip(margin, need)):
        raise CiderError(
            f"config key 'tiling.margin': {margin} is smaller than the PSF requires ({need}, the PSF size "
            f"{psf_shape} minus 1); tiles would show seams. Use 'auto' or at least {need}"
        )
    blend = (
        tuple(max(1, m // 2) for m in margin)
        if tiling["blend"] == "auto"
        else _per_axis(tiling["blend"], ndim, "tiling.blend")
    )
    if any(b > m or 4 * b > t for b, m, t in zip(blend, margin, tile_size)):
        raise CiderError(
            f"config key 'tiling.blend': {blend} must be ≤ margin {margin} and ≤ tile_size/4 {tile_size}"
        )
    for u in units:
        if any(k > n for k, n in zip(psf_shape, u.shape)):
            raise CiderError(f"{u.file}: image shape {u.shape} is smaller than the PSF {psf_shape}")
    tiles = [
        t
        for number, u in enumerate(units)
        for t in tile_grid(u.shape, tile_size, margin, unit=number, uniform=True)
    ]
    small = [t.id for t in tiles if any(n < k for n, k in zip(t.padded_shape, psf_shape))]
    if small:
        raise CiderError(
            f"tiles {small[:3]} are smaller than the PSF {psf_shape}; increase 'tiling.tile_size'"
        )
    names = tuple(dict.fromkeys(u.name for u in units))
    batches = make_batches(tiles, config["fit"]["batch_size"])
    return Plan(tuple(units), tuple(tiles), batches, names, tuple(psf_shape), tuple(margin), tuple(blend))


def _per_axis(value, ndim: int, key: str) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int) else tuple(value)
    if len(values) != ndim:
        raise CiderError(
            f"config key '{key}': expected {ndim} values (one per spatial axis), got {list(values)}"
        )
    return tuple(int(v) for v in values)


def make_plan(config: dict) -> Plan:
    """Units, tiles, PSF shape, margin and blend width (cached per config)."""
    return _cached_plan(json.dumps(config, sort_keys=True, default=str))


# ------------------------------------------------------------------------- rule steps
def _restore_config(config: dict, device: str | None = None):
    from .restore import RestoreConfig

    r = dict(config["restore"])
    r["device"] = device or r["device"]
    return RestoreConfig(normalize=True, **r)


def _read_unit(unit: Unit, config: dict) -> np.ndarray:
    axes = config["input"]["axes"].upper()
    array = io.open_array(unit.file)
    index, outer = [], iter(unit.index)
    for a in axes:
        index.append(next(outer) if a in "TC" else slice(None))
    return np.asarray(array[tuple(index)], dtype=np.float32)


def run_prepare(config: dict) -> None:
    """Copy every unit into ``input.zarr`` (float32, chunked on the tile grid)."""
    import zarr

    plan, p = make_plan(config), paths(config)
    root = zarr.open_group(str(p.input_zarr()), mode="w")
    chunks = _per_axis(config["tiling"]["tile_size"], len(plan.psf_shape), "tiling.tile_size")
    for unit in plan.units:
        data = _read_unit(unit, config)
        if not np.all(np.isfinite(data)):
            raise CiderError(f"{unit.file} (unit {unit.id}, index {unit.index}): contains NaN/inf values")
        array = root.create_array(unit.id, shape=data.shape, chunks=chunks, dtype="float32", overwrite=True)
        array[...] = data
    summary = {"units": [u.__dict__ | {"index": list(u.index), "shape": list(u.shape)} for u in plan.units],
               "tiles": len(plan.tiles), "psf_shape": list(plan.psf_shape), "margin": list(plan.margin),
               "blend": list(plan.blend)}  # fmt: skip
    io.atomic_write_json(p.prepared(), summary)


def _unit_array(config: dict, unit_id: str):
    import zarr

    return zarr.open_array(str(paths(config).input_zarr() / unit_id), mode="r")


def run_background(config: dict, unit_id: str) -> None:
    """Background, intensity scale and noise model of one whole unit (once, so tiles agree)."""
    p = paths(config)
    data = np.asarray(_unit_array(config, unit_id)[...], dtype=np.float64)
    bg_cfg = config["background"]
    if bg_cfg["enabled"]:
        background = wavelet_background(data, BackgroundConfig(**bg_cfg))
        io.atomic_write_npy(p.background(unit_id), background.astype(np.float32))
        data = data - background
    from .restore import intensity_scale

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

    from .restore import feature_range

    if rcfg.generator_input == "noise":
        return None
    with torch.no_grad():
        return feature_range(torch.as_tensor(observation, dtype=torch.float32), rcfg)


def _prepared_tile(config: dict, tile: Tile, device=None):
    """A tile's prepared observation, its RestoreConfig and its image's intensity record."""
    from .restore import prepare

    p = paths(config)
    window = tile.slices()
    unit_id = tile.unit_id
    data = np.asarray(_unit_array(config, unit_id)[window], dtype=np.float64)
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
    from .restore import deconvolved_features

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

    from .fitting import fit_generators
    from .restore import resolve_device, to_data_units

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


# ----------------------------------------------------------------------------- report
def sharpness(image: np.ndarray) -> float:
    """Mean absolute Laplacian over the 1–99.9 % intensity span: higher is sharper."""
    image = np.asarray(image, dtype=np.float64)
    low, high = np.percentile(image, [1, 99.9])
    lap = sum(np.diff(image, 2, axis=a)[tuple(slice(1, -1) if b != a else slice(None) for b in range(image.ndim))]
              for a in range(image.ndim))  # fmt: skip
    return float(np.abs(lap).mean() / max(high - low, 1e-12))


def seam_score(image: np.ndarray, tiles: list[Tile]) -> float:
    """Mean |gradient| across inner core boundaries over the mean |gradient| elsewhere (≈ 1: no seams)."""
    image = np.asarray(image, dtype=np.float64)
    at_seam, total, count_seam, count = 0.0, 0.0, 0, 0
    for axis in range(image.ndim):
        grad = np.abs(np.diff(image, axis=axis))
        cuts = sorted({t.core[axis][0] for t in tiles if t.core[axis][0] > 0})
        seam = np.take(grad, [c - 1 for c in cuts], axis=axis) if cuts else np.zeros(0)
        at_seam, count_seam = at_seam + seam.sum(), count_seam + seam.size
        total, count = total + grad.sum(), count + grad.size
    if not count_seam:
        return 1.0
    return float((at_seam / count_seam) / (total / count))


def _preview(image: np.ndarray) -> np.ndarray:
    plane = image.max(axis=0) if image.ndim == 3 else image
    low, high = np.percentile(plane, [0.5, 99.8])
    return np.clip((plane - low) / max(high - low, 1e-12) * 255, 0, 255).astype(np.uint8)


def run_report(config: dict) -> dict:
    """QC summary: per-tile metrics table, before/after previews, sharpness and seam scores."""
    plan, p = make_plan(config), paths(config)
    folder = p.report().parent
    folder.mkdir(parents=True, exist_ok=True)
    metrics = tile_metrics(config)
    read_tile = TileReader(config)
    units = []
    for unit in plan.units:
        before = np.asarray(_unit_array(config, unit.id)[...])
        after = stitch(plan.tiles_of(unit.id), read_tile, unit.shape, plan.blend)
        for kind, image in (("before", before), ("after", after)):
            io.write_image(folder / f"{unit.id}_{kind}.png", _preview(image))
        units.append({"unit": unit.id, "name": unit.name, "index": list(unit.index), "shape": list(unit.shape),
                      "sharpness_before": sharpness(before), "sharpness_after": sharpness(after),
                      "seam_ratio": seam_score(after, plan.tiles_of(unit.id))
                      / max(seam_score(before, plan.tiles_of(unit.id)), 1e-12)})  # fmt: skip
    summary = {"dataset": config["name"], "tiles": len(metrics), "units": units,
               "fit_seconds_total": round(sum(m["seconds"] for m in metrics), 1),
               "devices": sorted({m.get("device_name", m["device"]) for m in metrics}),
               "outputs": [str(p.image(n)) for n in plan.names]}  # fmt: skip
    rows = "".join(
        f"<tr><td>{m['tile']}</td><td>{m['iterations']}</td><td>{m['final_loss']:.4f}</td>"
        f"<td>{m['seconds']}</td><td>{m.get('device_name', m['device'])}</td></tr>"
        for m in metrics
    )
    views = "".join(
        f"<h3>{u['name']} {u['unit']} {u['index']}</h3><p>sharpness {u['sharpness_before']:.4f} → "
        f"{u['sharpness_after']:.4f}; seam ratio {u['seam_ratio']:.2f} (gradient across tile "
        "boundaries relative to the input's; ≤ 1: no seams added)</p>"
        f"<img src='{u['unit']}_before.png' width=300> <img src='{u['unit']}_after.png' width=300>"
        for u in units
    )
    html = (f"<html><head><meta charset='utf-8'><title>cider report: {config['name']}</title></head><body>"
            f"<h1>cider report: {config['name']}</h1><p>{len(metrics)} tiles, {summary['fit_seconds_total']} s of "
            f"fitting on {', '.join(summary['devices'])}. Outputs: {', '.join(summary['outputs'])}</p>"
            f"<h2>Before / after (max projection for volumes)</h2>{views}<h2>Tiles</h2><table border=1>"
            f"<tr><th>tile</th><th>iterations</th><th>final loss</th><th>seconds</th><th>device</th></tr>{rows}"
            "</table></body></html>")  # fmt: skip
    io.atomic_write_json(folder / "summary.json", summary)
    tmp = p.report().with_suffix(".tmp")
    tmp.write_text(html)
    os.replace(tmp, p.report())
    return summary


# ------------------------------------------------------------------------ script glue
def script_args(rule: str, namespace: dict) -> tuple[dict, dict]:
    """Config and wildcards for a rule script, from Snakemake or from the command line.

    Under Snakemake (``script:``) the ``snakemake`` object supplies the validated config
    and wildcards, and stdout/stderr go to the rule's log. Run alone, the script takes
    ``--config FILE`` and ``--batch``/``--unit``/``--name``.
    """
    smk = namespace.get("snakemake")
    if smk is not None:
        if smk.log:
            Path(smk.log[0]).parent.mkdir(parents=True, exist_ok=True)
            log = open(smk.log[0], "w")  # noqa: SIM115 (kept open for the job's lifetime)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        _set_threads(smk.threads)
        config = validate_config(dict(smk.config))
        return require_gpu(config, int(getattr(smk.resources, "gpu", 0) or 0)), dict(smk.wildcards)
    import argparse

    parser = argparse.ArgumentParser(description=f"run the '{rule}' rule of the cider workflow alone")
    parser.add_argument("--config", default="config/config.yaml", help="dataset config (YAML)")
    for key in ("batch", "unit", "name"):
        parser.add_argument(f"--{key}", help=f"the rule's {key} wildcard")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _set_threads(args.threads)
    wildcards = {k: getattr(args, k) for k in ("batch", "unit", "name") if getattr(args, k)}
    return load_config(args.config), wildcards


def require_gpu(config: dict, gpus: int) -> dict:
    """A job its profile gave a GPU runs on CUDA or fails at start, never silently on CPU.

    With ``restore.device: auto`` and ``gpus > 0`` the device becomes ``cuda``, so a node
    without a usable CUDA (wrong torch build, driver, no device) fails the job at once with
    :func:`cider.restore.resolve_device`'s message. ``$CIDER_ALLOW_CPU=1`` lets such a job
    run on CPU (test clusters whose "GPU" partition has none).
    """
    if gpus > 0 and config["restore"]["device"] == "auto" and os.environ.get(ALLOW_CPU_ENV) != "1":
        config = deepcopy(config)
        config["restore"]["device"] = "cuda"
    return config


def _set_threads(threads: int) -> None:
    """Use the rule's threads, but never more than the CPUs this process may run on
    (a node that over-reports CPUs would otherwise make torch oversubscribe them)."""
    import torch

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, min(int(threads), available)))
