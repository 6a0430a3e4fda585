"""One function per rule: prepare, background, fit (batched); the stitch rule is in
:mod:`.stitch`.

Every output is written atomically (temporary name, then rename), so a killed job never
leaves a file that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from .. import io
from ..background import BackgroundConfig
from ..errors import CiderError
from ..noise import NoiseModel
from ..tiling import Tile, block_grid
from .config import background_map, restore_config
from .layout import intensity_records, paths
from .optics import make_psf
from .plan import Unit, make_plan, per_axis, psf_channel

FAIL_ENV = "CIDER_FAIL_TILES"  # comma-separated tile ids whose batch fails (fault injection for tests)


def _source(unit: Unit, config: dict):
    """The unit inside its input file, as a lazy array-like (nothing read yet)."""
    axes = config["input"]["axes"].upper()
    index, outer = [], iter(unit.index)
    for a in axes:
        index.append(next(outer) if a in "TC" else slice(None))
    return io.open_array(unit.file), tuple(index)


def _slabs(shape: tuple[int, ...], planes: int) -> list[slice]:
    """Runs of at most ``planes`` leading-axis planes covering a 3D shape; one for 2D."""
    if len(shape) == 2:
        return [slice(None)]
    return [slice(z, min(z + planes, shape[0])) for z in range(0, shape[0], planes)]


IN_PLACE_CHUNK_BYTES = 64 * 2**20  # a Zarr input with chunks up to this size is read where it lies


class UnitView:
    """One unit (time point, channel) of a Zarr input, read where it lies.

    ``view[window]`` reads ``source[(*outer, *window)]``: the spatial axes come last in
    every supported axis order, after T and C.
    """

    def __init__(self, source, outer: tuple[int, ...]):
        self.source, self.outer = source, tuple(outer)
        self.shape = tuple(source.shape[len(self.outer) :])
        self.chunks = tuple(getattr(source, "chunks", source.shape)[len(self.outer) :])  # PNG, NPY: one
        self.dtype = np.dtype(source.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        return self.source[(*self.outer, *(key if isinstance(key, tuple) else (key,)))]


def _in_place(unit: Unit, config: dict) -> UnitView | None:
    """The unit as a :class:`UnitView` if its input can be read where it lies, else None.

    A Zarr / OME-Zarr input is read in place when its dtype is kept as is (integer,
    float32, float64) and a chunk holds at most ``IN_PLACE_CHUNK_BYTES``; otherwise
    (e.g. one chunk for the whole volume) ``prepare`` copies it, rechunked by tile.
    """
    if not Path(unit.file).is_dir():
        return None
    source, index = _source(unit, config)
    dtype = np.dtype(source.dtype)
    kept = np.issubdtype(dtype, np.integer) or dtype in (np.float32, np.float64)
    if not kept or int(np.prod(source.chunks)) * dtype.itemsize > IN_PLACE_CHUNK_BYTES:
        return None
    return UnitView(source, index[: len(index) - len(unit.shape)])


def run_prepare(config: dict) -> None:
    """Check every unit and copy those that need it into ``input.zarr``, in the input's dtype.

    Zarr / OME-Zarr inputs with reasonable chunks are only checked (finite values) and
    then read where they lie (:func:`_in_place`); the others (TIFF, PNG, NPY, Zarr with
    huge chunks) are copied one row of chunks at a time. Chunks of the copy: the tile size
    in Y and X, one plane in Z (the background rule reads and writes plane by plane).
    Memory: one row of chunks. Integer inputs stay integer (uint16 stays uint16).
    """
    import zarr

    plan, p = make_plan(config), paths(config)
    root = zarr.open_group(str(p.input_zarr()), mode="w")
    tile = per_axis(config["tiling"]["tile_size"], len(plan.psf_shape), "tiling.tile_size")
    chunks = (1, *tile[1:]) if len(tile) == 3 else tile  # one plane deep: the background goes by plane
    in_place = []
    if config["input"]["check_voxel_size"]:
        for file in dict.fromkeys(u.file for u in plan.units):
            _check_voxel_size(config, file)
    for unit in plan.units:
        plan.check_input(unit.file)
        try:
            view = _in_place(unit, config)
            if view is not None:
                in_place.append(unit.id)
                _check_finite(unit, view, (*view.chunks[:-1], unit.shape[-1]))
                continue
            source, index = _source(unit, config)
            dtype = np.dtype(source.dtype)
            if not (np.issubdtype(dtype, np.integer) or dtype in (np.float32, np.float64)):
                dtype = np.dtype(np.float32)
            array = root.create_array(unit.id, shape=unit.shape, chunks=chunks, dtype=dtype, overwrite=True)
            outer = index[: len(index) - len(unit.shape)]
            _check_finite(unit, UnitView(source, outer), (*chunks[:-1], unit.shape[-1]), copy_to=array)
        except (OSError, KeyError, ValueError) as err:
            if isinstance(err, CiderError):
                raise
            raise CiderError(
                f"{unit.file} (unit {unit.id}, index {unit.index}): cannot read it ({err}); the file may be "
                "damaged or have changed since planning: check it, then rerun"
            ) from err
    if in_place:
        print(f"cider: {len(in_place)} unit(s) read in place from their Zarr input (not copied)")
    summary = {
        "units": [u.to_dict() for u in plan.units],
        "in_place": in_place,
        "tiles": len(plan.tiles),
        "psf_shape": list(plan.psf_shape),
        "margin": list(plan.margin),
        "blend": list(plan.blend),
    }
    io.atomic_write_json(p.prepared(), summary)


def _check_voxel_size(config: dict, file: str) -> None:
    """Refuse an input whose own metadata state another voxel size than the config's
    (more than 1 % on an axis, :func:`cider.io.stated_voxel_mismatch`).

    Raises
    ------
    CiderError
        Naming the file, both voxel sizes and the two ways out.
    """
    configured = config["input"]["voxel_size"]
    theirs = io.stated_voxel_mismatch(file, configured)
    if theirs:
        axes = "zyx"[-len(configured) :]
        raise CiderError(
            f"{file}: its metadata state a voxel size of {theirs} µm, but config key 'input.voxel_size' is "
            f"{list(configured)} (axes {axes.upper()}); the PSF model's sampling and the priors depend on it. "
            "Set input.voxel_size to the file's, or, if the file's metadata are wrong, "
            "input.check_voxel_size: false"
        )


def _check_finite(unit: Unit, view: UnitView, rows: tuple[int, ...], copy_to=None) -> None:
    """Read the unit a row of ``rows`` at a time; refuse NaN/inf; copy it if asked."""
    for row in block_grid(unit.shape, rows):
        band = tuple(slice(a, b) for a, b in row)
        data = np.asarray(view[band])
        if not np.all(np.isfinite(data)):
            where = ", ".join(f"{a}–{b}" for a, b in row)
            raise CiderError(
                f"{unit.file} (unit {unit.id}, index {unit.index}): contains NaN/inf values "
                f"(in the window {where}); fix or mask them before restoring"
            )
        if copy_to is not None:
            copy_to[band] = data


def unit_array(config: dict, unit_id: str):
    """A unit's data, lazily: a view of its Zarr input (read in place) or its copy."""
    import zarr

    view = _in_place(make_plan(config).unit(unit_id), config)
    if view is not None:
        return view
    return zarr.open_array(str(paths(config).input_zarr() / unit_id), mode="r")


NOISE_SAMPLES = 4_000_000  # Haar samples (2 × 2 blocks) the noise fit uses at most per unit


def run_background(config: dict, group_id: str) -> None:
    """Background, intensity scale, noise model and feature range of a group's units.

    Each unit (image) is handled whole, one after another (see :func:`unit_background`);
    the backgrounds go into one Zarr group (an array per unit id), the records into one
    JSON file keyed by unit id. Memory: one unit's plane and window, whatever the group.
    """
    import zarr

    plan, p = make_plan(config), paths(config)
    staging = io.staging_path(p.background(group_id))
    root = zarr.open_group(str(staging), mode="w") if background_map(config) else None
    records = {unit: unit_background(config, unit, root) for unit in plan.group(group_id).members}
    if root is not None:
        io.publish_folder(p.background(group_id))
    io.atomic_write_json(p.intensity(group_id), {"units": records})


def unit_background(config: dict, unit_id: str, root=None) -> dict:
    """Background, intensity scale, noise model and feature range of one whole unit.

    Computed once per image so that all its tiles agree, in passes over the unit plane by
    plane (the image in 2D): (1) the peak for the wavelet background, or the flat level
    (from evenly spaced planes, ≤ ``FLAT_SAMPLES`` pixels); (2) the plane-wise wavelet
    background, written into ``root[unit_id]`` (a chunked Zarr array; only when it is
    on), with the maximum, mean and range of the background-free data and the Haar
    samples of the noise fit (from evenly spaced planes, ≤ ``NOISE_SAMPLES``); (3) the
    feature range of the scaled data, by windows (:func:`_feature_range`).
    ``input.offset`` (a camera offset) is subtracted from each plane first; the
    saturation record is of the raw values. Memory: a plane and one window's features,
    not the unit.
    """
    from ..background import plane_background
    from ..noise import fit_noise, haar_samples
    from ..restore import full_scale

    data = unit_array(config, unit_id)
    offset = float(config["input"]["offset"])
    shape = data.shape
    planes = [slice(None)] if len(shape) == 2 else list(range(shape[0]))  # data[z] is 2D
    bg_cfg = BackgroundConfig(**config["background"])
    background, level = None, None
    if bg_cfg.is_map:
        chunks = data.chunks if len(shape) == 2 else (1, *data.chunks[-2:])  # written plane by plane
        background = root.create_array(unit_id, shape=shape, chunks=chunks, dtype="float32")
        peak = max(float(np.abs(np.asarray(data[z], dtype=np.float64) - offset).max()) for z in planes) or 1.0
    elif bg_cfg.enabled:
        level, fraction = _flat_level(config, unit_id, data, planes, offset, bg_cfg)
    sampled = _spaced_planes(len(planes), int(np.prod(shape[-2:])) // 4, NOISE_SAMPLES)
    high, low, total, details, means = -np.inf, np.inf, 0.0, [], []
    raw_high, at_raw_high = -np.inf, 0
    for number, z in enumerate(planes):
        plane = np.asarray(data[z], dtype=np.float64)
        top = plane.max()
        if top >= raw_high:
            at_raw_high = (at_raw_high if top == raw_high else 0) + int(np.count_nonzero(plane == top))
            raw_high = top
        plane = plane - offset - (level or 0.0)
        if background is not None:
            removed = plane_background(plane, bg_cfg, peak)
            background[z] = removed.astype(np.float32)
            plane = plane - removed
        high, low, total = max(high, plane.max()), min(low, plane.min()), total + plane.sum()
        if number in sampled:
            detail, mean = haar_samples(plane)
            details.append(detail)
            means.append(mean)
    scale = float(high) if high > 0 else 1.0
    noise = fit_noise(np.concatenate(details), np.concatenate(means), float(high - low))
    intensity = {
        "scale": scale,
        "mean": float(total) / float(np.prod(shape)),
        "noise": {"gain": noise.gain, "floor": noise.floor},
    }
    if level is not None:
        intensity["background_level"] = {"value": level, "fraction": fraction}
    full = full_scale(data.dtype, float(raw_high), at_raw_high)
    intensity["saturated"] = {"value": full, "count": at_raw_high} if full is not None else None
    rcfg = restore_config(config, device="cpu")
    value_range = _feature_range(data, background if level is None else level, scale, rcfg, offset)
    if value_range is not None:
        intensity["feature_low"], intensity["feature_high"] = value_range
        intensity["feature_source"] = _feature_source(rcfg)
    return intensity


FLAT_SAMPLES = 2**24  # pixels (evenly spaced planes) a unit's flat background level is measured on


def _flat_level(config: dict, unit_id: str, data, planes: list, offset: float, bg_cfg) -> tuple[float, float]:
    """A unit's flat background level (above ``offset``) and the fraction of the measured
    planes' pixels it rests on (:func:`cider.background.flat_level`), one plane read at a
    time."""
    from ..background import detection_kernel, flat_level

    plan = make_plan(config)
    kernel = detection_kernel(make_psf(config, len(data.shape), psf_channel(config, plan.unit(unit_id))))
    chosen = sorted(_spaced_planes(len(planes), int(np.prod(data.shape[-2:])), FLAT_SAMPLES))
    read = (np.asarray(data[planes[i]], dtype=np.float64) - offset for i in chosen)
    return flat_level(read, kernel, bg_cfg.flat_threshold)


def _feature_source(rcfg) -> dict:
    """What a feature range was computed from: the generator input and the extractor's
    weights by content (``None`` without an extractor), so a fit can tell whether the range
    is its own (:func:`_feature_value_range`)."""
    from ..restore import feature_weights_digest

    return {"generator_input": rcfg.generator_input, "feature_weights_sha256": feature_weights_digest(rcfg)}


def _spaced_planes(count: int, per_plane: int, budget: int) -> set[int]:
    """Evenly spaced planes (at least one) whose ``per_plane`` samples each stay within
    ``budget`` in all: the noise fit's Haar samples, the flat level's pixels."""
    wanted = max(1, min(count, budget // max(per_plane, 1)))
    return set(np.linspace(0, count - 1, wanted).round().astype(int).tolist())


FEATURE_HALO = 16  # px around a window: the extractor's 7 layers of 5 × 5 convolutions reach 14


def _feature_range(
    data, background, scale: float, rcfg, offset: float = 0.0, planes: int = 4, window: int = 256
):
    """The whole unit's per-channel feature range (one positivity map for all its tiles).

    Computed on windows of ``planes`` planes × ``window``² pixels, each read with a halo of
    ``FEATURE_HALO`` pixels and cropped back, so the features inside a window are the
    whole plane's (the extractor's receptive field fits in the halo) while memory stays
    at one window's feature maps, whatever the plane size. ``offset`` (``input.offset``)
    and ``background`` (an array like the unit, or a flat level) are subtracted from each
    window first.
    """
    import torch

    from ..restore import raw_features

    if not rcfg.needs_feature_range:
        return None
    plane_shape = data.shape[-2:]
    lows, highs = [], []
    for slab in _slabs(data.shape, planes):
        for core in block_grid(plane_shape, (window, window)):
            read = tuple(
                (max(0, a - FEATURE_HALO), min(n, b + FEATURE_HALO)) for (a, b), n in zip(core, plane_shape)
            )
            index = (() if data.ndim == 2 else (slab,)) + tuple(slice(a, b) for a, b in read)
            observation = np.asarray(data[index], dtype=np.float64) - offset
            if isinstance(background, float):
                observation = observation - background
            elif background is not None:
                observation = observation - np.asarray(background[index], dtype=np.float64)
            with torch.no_grad():
                features = raw_features(torch.as_tensor(observation / scale, dtype=torch.float32), rcfg)
            inner = tuple(slice(a - r, b - r) for (a, b), (r, _) in zip(core, read))
            features = features[(Ellipsis, *inner)]
            dims = tuple(range(1, features.ndim))
            lows.append(features.amin(dim=dims))
            highs.append(features.amax(dim=dims))
    return torch.stack(lows).amin(0).tolist(), torch.stack(highs).amax(0).tolist()


def _prepared_tile(config: dict, tile: Tile, device=None):
    """A tile's prepared observation, its RestoreConfig and its image's intensity record."""
    import zarr

    from ..restore import prepare

    p = paths(config)
    window = tile.slices()
    unit_id = tile.unit_id
    group = make_plan(config).group_of(unit_id)
    data = np.asarray(unit_array(config, unit_id)[window], dtype=np.float64)
    intensity = intensity_records(str(p.intensity(group)))[unit_id]
    background = (
        np.asarray(zarr.open_array(str(p.background(group) / unit_id), mode="r")[window])
        if background_map(config)
        else (intensity.get("background_level") or {}).get("value")
    )
    saturation = config["input"]["saturation"]
    if saturation == "auto":
        saturation = (intensity.get("saturated") or {}).get("value")
    psf = make_psf(config, data.ndim, psf_channel(config, make_plan(config).unit(unit_id)))
    rcfg = restore_config(config)
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
        saturation=saturation,
        offset=float(config["input"]["offset"]),
    )
    return prepared, rcfg, intensity


def _tile_input(config: dict, tile: Tile, source: dict):
    """Prepared observation and generator input (features + RL) of one tile; ``source``:
    the fit's own :func:`_feature_source`, which the unit's feature range must match."""
    from ..restore import deconvolved_features

    prepared, rcfg, intensity = _prepared_tile(config, tile)
    value_range = _feature_value_range(config, tile.unit_id, intensity, source)
    return prepared, deconvolved_features(prepared, rcfg, value_range)


def _feature_value_range(config: dict, unit_id: str, intensity: dict, wanted: dict):
    """The unit's feature range from its intensity record, checked against the fit's own
    generator input and weights (``wanted``, its :func:`_feature_source`): a range computed
    from other weights (a replaced weights file of the same name, another package version
    on the background node) or another generator input would map this fit's features
    wrongly before RL, so it stops the job.
    Records that predate ``feature_source`` are taken as they are."""
    if wanted["generator_input"] == "noise":  # noise uses no range
        return None
    if "feature_low" not in intensity:
        group = make_plan(config).group_of(unit_id)
        raise CiderError(
            f"unit {unit_id}: {paths(config).intensity(group)} has no feature range (written "
            "for restore.method rl?), and without one each tile would map its features on its "
            "own; delete that file and rerun so the background job computes it"
        )
    recorded = intensity.get("feature_source")
    if recorded is not None and recorded != wanted:
        group = make_plan(config).group_of(unit_id)
        raise CiderError(
            f"unit {unit_id}: its feature range in {paths(config).intensity(group)} was computed "
            f"from {_describe(recorded)}, but this fit uses {_describe(wanted)} "
            "(restore.generator_input, restore.feature_weights or the weights file changed); "
            "delete that file and rerun so the background job recomputes it"
        )
    return intensity["feature_low"], intensity["feature_high"]


def _describe(source: dict) -> str:
    """A feature source for messages: generator input and the weights digest's first digits."""
    digest = source.get("feature_weights_sha256")
    weights = f"weights sha256 {digest[:12]}…" if digest else "no extractor"
    return f"generator_input {source.get('generator_input')} ({weights})"


def _tile_record(tile: Tile, fit, batch_id: str, method: str, device) -> dict:
    """One tile's fit metrics (the batch's ``seconds`` are shared out afterwards)."""
    losses = fit.losses
    return {
        "tile": tile.id,
        "batch": batch_id,
        "method": method,
        "unit": tile.unit_id,
        "padded": [list(w) for w in tile.padded],
        "iterations": len(losses),
        "final_loss": losses[-1] if losses else None,
        "chi2": fit.chi2 if math.isfinite(fit.chi2) else None,
        "stopped": fit.stopped,
        "flux_factor": fit.flux_factor,
        "loss_history": losses[:: max(1, len(losses) // 200)],
        "polish_steps": len(fit.polish_losses),
        "polish_loss": [fit.polish_losses[0], fit.polish_losses[-1]] if fit.polish_losses else None,
        "seconds": None,
        "device": str(device),
    }


def _fit_pass(config: dict, rcfg, source: dict, tiles: list[Tile]):
    """Yield ``(tile, fit, prepared)`` for one pass of same-shape tiles: their generators
    fitted together, or (``restore.method: rl``) each tile's plain RL, one tile at a time
    (so only one tile's input is held)."""
    from ..fitting import fit_generators, fit_rl

    labels = [f"tile {tile.id}" for tile in tiles]
    if rcfg.method == "rl":  # the baseline: no features
        for tile, label in zip(tiles, labels):
            prepared = _prepared_tile(config, tile)[0]
            yield tile, fit_rl(prepared, rcfg, label), prepared
        return
    inputs = [_tile_input(config, tile, source) for tile in tiles]
    prepared = [i[0] for i in inputs]
    fits = fit_generators([i[1] for i in inputs], prepared, rcfg, labels=labels)
    del inputs
    yield from zip(tiles, fits, prepared)


def run_fit(config: dict, batch_id: str) -> dict:
    """Features, RL and the batched generator fit of one batch of same-shape tiles (with
    ``restore.method: rl``: plain RL of each tile instead).

    Writes the restored padded tiles (``tiles/{batch}.npz``, one array per tile id) and
    their metrics (``metrics/{batch}.json``). The features cost ~1 % of the fit and are
    deterministic, so they are computed here instead of round-tripping through disk.
    """
    import torch

    from .. import fitting
    from ..restore import resolve_device, to_data_units

    plan, p = make_plan(config), paths(config)
    batch = plan.batch(batch_id)
    # fail at start, not after the features
    requested = resolve_device(config["restore"]["device"])
    if config["restore"]["compile"] and config["restore"]["method"] != "rl":
        fitting.check_compile(requested, fitting.COMPILE_BACKEND)
    failing = set(batch.tiles) & set(os.environ.get(FAIL_ENV, "").split(","))
    if failing:
        raise RuntimeError(f"tile {sorted(failing)[0]}: failure injected through ${FAIL_ENV} (testing hook)")
    # What the features come from, hashed once per job: checked against each unit's
    # feature range and recorded in the metrics.
    rcfg = restore_config(config)
    source = _feature_source(rcfg)
    start = time.perf_counter()
    restored, records, device = {}, [], None
    for one_pass in batch.passes:  # same-shape tiles, fitted together
        pass_tiles = [plan.tile(t) for t in one_pass]
        for tile, fit, prep in _fit_pass(config, rcfg, source, pass_tiles):
            # Kept in data units only: the pass's inputs go before the next pass starts.
            restored[tile.id] = to_data_units(fit.estimate, prep)
            device = prep.observation.device
            records.append(_tile_record(tile, fit, batch_id, rcfg.method, device))
    seconds = round(time.perf_counter() - start, 2)
    for record in records:
        record["seconds"] = round(seconds / len(records), 2)
    batch_record = {
        "batch": batch_id,
        "tiles": records,
        "batch_size": len(records),
        "passes": len(batch.passes),
        "seconds": seconds,
        "device": str(device),
        "feature_weights_sha256": source["feature_weights_sha256"],
    }
    if torch.cuda.is_available() and device.type == "cuda":
        batch_record["device_name"] = torch.cuda.get_device_name(device)
        for record in records:
            record["device_name"] = batch_record["device_name"]
    io.atomic_write_npz(p.tiles(batch_id), restored)
    io.atomic_write_json(p.metrics(batch_id), batch_record)
    return batch_record


def tile_metrics(config: dict) -> list[dict]:
    """Fit metrics of every tile, in plan order."""
    plan, p = make_plan(config), paths(config)
    by_tile = {}
    for batch in plan.batches:
        for record in json.loads(p.metrics(batch.id).read_text())["tiles"]:
            by_tile[record["tile"]] = record
    return [by_tile[t.id] for t in plan.tiles]
