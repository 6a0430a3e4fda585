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
FAIL_ENV = "CIDER_FAIL_TILES"  # comma-separated tile ids whose fit raises (fault-injection for tests)


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

    def features(self, tile: str) -> Path:
        return self.work / "features" / f"{tile}.npy"

    def tile(self, tile: str) -> Path:
        return self.work / "tiles" / f"{tile}.npy"

    def metrics(self, tile: str) -> Path:
        return self.work / "metrics" / f"{tile}.json"

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
class Plan:
    """Everything the DAG needs, derived from the config and the inputs' shapes."""

    units: tuple[Unit, ...]
    tiles: tuple[Tile, ...]
    names: tuple[str, ...]
    psf_shape: tuple[int, ...]
    margin: tuple[int, ...]
    blend: tuple[int, ...]

    def tile(self, tile_id: str) -> Tile:
        return self._tiles_by_id[tile_id]

    @cached_property
    def _tiles_by_id(self) -> dict[str, Tile]:
        return {t.id: t for t in self.tiles}

    def tiles_of(self, unit_id: str) -> list[Tile]:
        return [t for t in self.tiles if t.unit_id == unit_id]

    def units_of(self, name: str) -> list[Unit]:
        return [u for u in self.units if u.name == name]


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
    tiles = [t for number, u in enumerate(units) for t in tile_grid(u.shape, tile_size, margin, unit=number)]
    small = [t.id for t in tiles if any(n < k for n, k in zip(t.padded_shape, psf_shape))]
    if small:
        raise CiderError(
            f"tiles {small[:3]} are smaller than the PSF {psf_shape}; increase 'tiling.tile_size'"
        )
    names = tuple(dict.fromkeys(u.name for u in units))
    return Plan(tuple(units), tuple(tiles), names, tuple(psf_shape), tuple(margin), tuple(blend))


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


def run_features(config: dict, tile_id: str) -> None:
    """Features + RL of one padded tile → ``features/{tile}.npy``."""
    from .restore import deconvolved_features

    tile = make_plan(config).tile(tile_id)
    prepared, rcfg, intensity = _prepared_tile(config, tile)
    value_range = (
        (intensity["feature_low"], intensity["feature_high"]) if "feature_low" in intensity else None
    )
    features = deconvolved_features(prepared, rcfg, value_range)
    io.atomic_write_npy(paths(config).features(tile_id), features.cpu().numpy().astype(np.float32))


def run_fit(config: dict, tile_id: str) -> dict:
    """Generator fit of one tile → restored padded tile (``tiles/``) and metrics JSON."""
    import torch

    from .restore import fit_generator, to_data_units

    if tile_id in os.environ.get(FAIL_ENV, "").split(","):
        raise RuntimeError(f"tile {tile_id}: failure injected through ${FAIL_ENV} (testing hook)")
    start = time.perf_counter()
    tile, p = make_plan(config).tile(tile_id), paths(config)
    prepared, rcfg, _ = _prepared_tile(config, tile)
    features = torch.from_numpy(np.load(p.features(tile_id))).to(prepared.observation.device)
    fit = fit_generator(features, prepared, rcfg)
    restored = to_data_units(fit.estimate, prepared)
    losses = fit.losses
    metrics = {
        "tile": tile_id,
        "unit": tile.unit_id,
        "padded": [list(w) for w in tile.padded],
        "iterations": len(losses),
        "final_loss": losses[-1] if losses else None,
        "chi2": fit.chi2 if math.isfinite(fit.chi2) else None,
        "stopped": fit.stopped,
        "flux_factor": fit.flux_factor,
        "loss_history": losses[:: max(1, len(losses) // 200)],
        "seconds": round(time.perf_counter() - start, 2),
        "device": str(prepared.observation.device),
    }
    if torch.cuda.is_available() and prepared.observation.device.type == "cuda":
        metrics["device_name"] = torch.cuda.get_device_name(prepared.observation.device)
    io.atomic_write_npy(p.tile(tile_id), restored)
    io.atomic_write_json(p.metrics(tile_id), metrics)
    return metrics


def run_stitch(config: dict, name: str) -> None:
    """Blend all tiles of the units of input ``name`` into OME-Zarr (and TIFF)."""
    plan, p = make_plan(config), paths(config)
    units = plan.units_of(name)
    axes = config["input"]["axes"].upper()
    outer_axes = [a for a in axes if a in "TC"]
    images = []
    for unit in units:
        tiles = plan.tiles_of(unit.id)
        images.append(stitch(tiles, lambda t: np.load(p.tile(t.id)), unit.shape, plan.blend))
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
    metrics = [json.loads(p.metrics(t.id).read_text()) for t in plan.tiles]
    units = []
    for unit in plan.units:
        before = np.asarray(_unit_array(config, unit.id)[...])
        after = stitch(plan.tiles_of(unit.id), lambda t: np.load(p.tile(t.id)), unit.shape, plan.blend)
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
    ``--config FILE`` and ``--tile``/``--unit``/``--name``.
    """
    smk = namespace.get("snakemake")
    if smk is not None:
        if smk.log:
            Path(smk.log[0]).parent.mkdir(parents=True, exist_ok=True)
            log = open(smk.log[0], "w")  # noqa: SIM115 (kept open for the job's lifetime)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        _set_threads(smk.threads)
        return validate_config(dict(smk.config)), dict(smk.wildcards)
    import argparse

    parser = argparse.ArgumentParser(description=f"run the '{rule}' rule of the cider workflow alone")
    parser.add_argument("--config", default="config/config.yaml", help="dataset config (YAML)")
    for key in ("tile", "unit", "name"):
        parser.add_argument(f"--{key}", help=f"the rule's {key} wildcard")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _set_threads(args.threads)
    wildcards = {k: getattr(args, k) for k in ("tile", "unit", "name") if getattr(args, k)}
    return load_config(args.config), wildcards


def _set_threads(threads: int) -> None:
    """Use the rule's threads, but never more than the CPUs this process may run on
    (a node that over-reports CPUs would otherwise make torch oversubscribe them)."""
    import torch

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, min(int(threads), available)))
