"""The tile plan: units, tiles, fit batches and job groups (from the inputs' shapes), stored once."""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from .. import io
from ..errors import CiderError
from ..generator import Strides
from ..memory import fit_memory_bytes, largest_batch, largest_tile
from ..restore_config import RestoreConfig
from ..tiling import Tile, auto_blend, minimum_margin, tile_grid, unit_name
from .config import output_settings
from .layout import paths
from .optics import make_psf


@dataclass(frozen=True)
class Unit:
    """One image to restore: a (file, time point, channel) with a 2D/3D spatial shape."""

    id: str
    name: str
    file: str
    index: tuple[int, ...]
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "file": self.file,
            "index": list(self.index),
            "shape": list(self.shape),
        }


@dataclass(frozen=True)
class Batch:
    """The tiles one ``fit`` job restores, in passes of same-shape tiles.

    A pass (≤ ``fit.batch_size`` tiles of one padded shape) is fitted together in one
    forward pass; a job runs its passes one after another (see :func:`make_batches`).
    """

    id: str
    passes: tuple[tuple[str, ...], ...]

    @property
    def tiles(self) -> tuple[str, ...]:
        return tuple(tile for one_pass in self.passes for tile in one_pass)


@dataclass(frozen=True)
class Group:
    """What one job handles for a whole-image step: units (``background``) or names (``stitch``)."""

    id: str
    members: tuple[str, ...]


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
    groups: tuple[Group, ...] = ()  # units per background job
    parts: tuple[Group, ...] = ()  # names (input files) per stitch job
    inputs: tuple[tuple[str, tuple[int, int]], ...] = ()  # (file, fingerprint) of every input

    def to_dict(self) -> dict:
        """JSON-ready form (what ``plan.json`` holds)."""
        return {
            "units": [u.to_dict() for u in self.units],
            "tiles": [t.to_dict() for t in self.tiles],
            "batches": [{"id": b.id, "passes": [list(p) for p in b.passes]} for b in self.batches],
            "names": list(self.names),
            "groups": {g.id: list(g.members) for g in self.groups},
            "parts": {g.id: list(g.members) for g in self.parts},
            "psf_shape": list(self.psf_shape),
            "margin": list(self.margin),
            "blend": list(self.blend),
            "inputs": {file: list(print_) for file, print_ in self.inputs},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """Inverse of :meth:`to_dict`."""
        units = tuple(
            Unit(u["id"], u["name"], u["file"], tuple(u["index"]), tuple(u["shape"])) for u in data["units"]
        )
        tiles = tuple(
            Tile(
                t["id"],
                t["unit"],
                tuple(t["grid_index"]),
                tuple(tuple(w) for w in t["core"]),
                tuple(tuple(w) for w in t["padded"]),
            )
            for t in data["tiles"]
        )
        batches = tuple(Batch(b["id"], tuple(tuple(p) for p in b["passes"])) for b in data["batches"])
        inputs = tuple((file, tuple(print_)) for file, print_ in data["inputs"].items())
        return cls(
            units,
            tiles,
            batches,
            tuple(data["names"]),
            tuple(data["psf_shape"]),
            tuple(data["margin"]),
            tuple(data["blend"]),
            tuple(Group(k, tuple(v)) for k, v in data["groups"].items()),
            tuple(Group(k, tuple(v)) for k, v in data["parts"].items()),
            inputs,
        )

    def check_input(self, file: str) -> None:
        """Refuse to read an input that changed after the plan was made (size or time).

        Raises
        ------
        CiderError
            Naming the file and what to do.
        """
        expected = dict(self.inputs).get(file)
        if expected is not None and fingerprint(file) != expected:
            raise CiderError(
                f"{file}: changed after the tile plan was made (size/modification time differ from "
                "work/plan.json); run snakemake again: it replans and redoes what depends on the file"
            )

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

    def unit(self, unit_id: str) -> Unit:
        return self._units_by_id[unit_id]

    def group(self, group_id: str) -> Group:
        return self._groups_by_id[group_id]

    def part(self, part_id: str) -> Group:
        return self._parts_by_id[part_id]

    def group_of(self, unit_id: str) -> str:
        """Id of the background group of unit ``unit_id``."""
        return self._group_of_unit[unit_id]

    def tiles_of(self, unit_id: str) -> list[Tile]:
        return self._tiles_of_unit.get(unit_id, [])

    def units_of(self, name: str) -> list[Unit]:
        return self._units_of_name.get(name, [])

    def batches_of_part(self, part_id: str) -> list[str]:
        """Ids of the batches holding tiles of the names of stitch part ``part_id`` (plan order)."""
        units = [u for name in self.part(part_id).members for u in self.units_of(name)]
        return list(dict.fromkeys(self.batch_of(t.id) for u in units for t in self.tiles_of(u.id)))

    @cached_property
    def _units_by_id(self) -> dict[str, Unit]:
        return {u.id: u for u in self.units}

    @cached_property
    def _groups_by_id(self) -> dict[str, Group]:
        return {g.id: g for g in self.groups}

    @cached_property
    def _parts_by_id(self) -> dict[str, Group]:
        return {g.id: g for g in self.parts}

    @cached_property
    def _group_of_unit(self) -> dict[str, str]:
        return {u: g.id for g in self.groups for u in g.members}

    @cached_property
    def _tiles_of_unit(self) -> dict[str, list[Tile]]:
        by_unit: dict[str, list[Tile]] = {}
        for tile in self.tiles:
            by_unit.setdefault(tile.unit_id, []).append(tile)
        return by_unit

    @cached_property
    def _units_of_name(self) -> dict[str, list[Unit]]:
        by_name: dict[str, list[Unit]] = {}
        for unit in self.units:
            by_name.setdefault(unit.name, []).append(unit)
        return by_name


def _pack(items: Sequence[tuple], most: int, voxels: int) -> list[list]:
    """Consecutive ``(member, count, size)`` items into lists holding ≤ ``most`` counted
    things and ≤ ``voxels`` in size; an item over either limit is a list of its own."""
    packed: list[list] = []
    count = total = 0
    for member, n, size in items:
        if not packed or count + n > most or total + size > voxels:
            packed.append([])
            count = total = 0
        packed[-1].append(member)
        count, total = count + n, total + size
    return packed


FIT_JOB_VOXELS = 2**23  # padded-tile voxels one fit job takes on when it packs several passes
# With restore.compile, the most padded tile shapes one fit job holds: each shape is compiled
# anew (minutes), and a process compiles for at most cider.fitting.COMPILE_SHAPES of them.
COMPILE_SHAPES_PER_JOB = 4


def make_batches(
    tiles: Sequence[Tile],
    batch_size: int,
    images_per_job: int = 1,
    pass_sizes: dict[tuple[int, ...], int] | None = None,
    psf_of_tile: Sequence[int] | None = None,
    shapes_per_job: int | None = None,
) -> tuple[Batch, ...]:
    """The fit jobs: passes of ≤ ``batch_size`` same-shape tiles, packed into jobs.

    Tiles of one image all have one shape (``tile_grid(..., uniform=True)``); images of
    the same shape share passes too. Consecutive passes go into one job while it holds at
    most ``max(batch_size, images_per_job)`` tiles and ``FIT_JOB_VOXELS`` padded voxels,
    so small tiles and small images (a folder, whatever their sizes) are many to a job,
    while a pass of large 3D tiles is a job of its own. ``pass_sizes``: a smaller pass
    size for some padded shapes (what fits the GPU, :func:`gpu_pass_sizes`).
    ``psf_of_tile``: which PSF each tile is restored with (its channel's, with
    ``psf.channels``); a pass holds tiles of one PSF only. ``shapes_per_job``: the most
    padded shapes a job holds (``COMPILE_SHAPES_PER_JOB`` with ``restore.compile``).
    """
    kinds = psf_of_tile if psf_of_tile is not None else [0] * len(tiles)
    by_shape: dict[tuple[tuple[int, ...], int], list[str]] = {}
    for tile, kind in zip(tiles, kinds):
        by_shape.setdefault((tile.padded_shape, kind), []).append(tile.id)
    per_shape = pass_sizes or {}
    passes = [
        (tuple(ids[start : start + per_shape.get(shape, batch_size)]), int(np.prod(shape)))
        for (shape, _), ids in by_shape.items()
        for start in range(0, len(ids), per_shape.get(shape, batch_size))
    ]
    sizes = [(one_pass, len(one_pass), len(one_pass) * voxels) for one_pass, voxels in passes]
    jobs = _pack(sizes, max(batch_size, images_per_job), FIT_JOB_VOXELS)
    if shapes_per_job:
        shape_of = {tile.id: tile.padded_shape for tile in tiles}
        jobs = [part for job in jobs for part in _split_by_shapes(job, shape_of, shapes_per_job)]
    return tuple(Batch(f"b{number}", tuple(job)) for number, job in enumerate(jobs))


def _note_compile_cost(shapes: int, jobs: int) -> None:
    """With ``restore.compile``, say on stderr when the tiles come in more padded shapes
    than one fit job compiles for: each is compiled anew, so the jobs multiply."""
    if shapes > COMPILE_SHAPES_PER_JOB:
        print(
            f"cider: restore.compile is on and the tiles come in {shapes} padded shapes; each is "
            f"compiled anew (minutes), so the fits are split into {jobs} job(s) of at most "
            f"{COMPILE_SHAPES_PER_JOB} shapes. For a folder of differently sized images, "
            "compile rarely pays: set restore.compile: false",
            file=sys.stderr,
        )


def _split_by_shapes(job: list[tuple[str, ...]], shape_of: dict, most: int) -> list[list[tuple[str, ...]]]:
    """A job's passes in consecutive parts of at most ``most`` distinct padded shapes."""
    parts: list[list[tuple[str, ...]]] = []
    shapes: set = set()
    for one_pass in job:
        shape = shape_of[one_pass[0]]
        if not parts or (shape not in shapes and len(shapes) == most):
            parts.append([])
            shapes = set()
        parts[-1].append(one_pass)
        shapes.add(shape)
    return parts


GPU_USABLE = 0.9  # share of fit.gpu_memory_gb a pass may use (the CUDA context needs the rest)


def gpu_pass_sizes(
    shapes: Sequence[tuple[int, ...]],
    psf_shape: tuple[int, ...],
    margin: tuple[int, ...],
    tile_size: tuple[int, ...],
    fit: dict,
    least: tuple[int, ...] | None = None,
    strides: Strides = (),
) -> dict[tuple[int, ...], int]:
    """Tiles per pass for every padded tile shape, so each pass fits ``fit.gpu_memory_gb``.

    ``fit.batch_size`` where the whole pass fits (:func:`cider.memory.largest_batch`),
    fewer where not (printed once). ``least``: the smallest tile core the blending
    allows, per axis (a suggested tile size never goes below it). ``strides``: the
    generator's (``restore.generator_strides``), which change its memory.

    Raises
    ------
    CiderError
        When one tile alone does not fit, naming the memory it needs and the largest
        ``tiling.tile_size`` that fits.
    """
    gib = fit["gpu_memory_gb"]
    budget = GPU_USABLE * gib * 2**30
    sizes: dict[tuple[int, ...], int] = {}
    for shape in dict.fromkeys(shapes):
        fitted = tuple(n + k - 1 for n, k in zip(shape, psf_shape))
        size = largest_batch(fitted, budget, fit["batch_size"], strides)
        if size == 0:
            need = fit_memory_bytes(fitted, 1, strides=strides) / 2**30
            fits = largest_tile(tile_size, margin, psf_shape, budget, least, strides)
            hint = (
                f"set tiling.tile_size to at most {list(fits)}"
                if fits
                else "crop the PSF (psf.energy) or use a card with more memory"
            )
            raise CiderError(
                f"a padded tile of {list(shape)} (fitted object {list(fitted)}) needs about {need:.1f} GiB "
                f"of GPU memory, more than {GPU_USABLE:.0%} of fit.gpu_memory_gb ({gib}); {hint}"
            )
        if size < fit["batch_size"]:
            print(
                f"cider: tiles of padded shape {list(shape)} are fitted {size} per pass, not "
                f"fit.batch_size {fit['batch_size']}, to fit fit.gpu_memory_gb {gib}",
                file=sys.stderr,
            )
        sizes[shape] = size
    return sizes


GROUP_VOXELS = 2**26  # most voxels one background or stitch job takes on when it groups images


def make_groups(sizes: Sequence[tuple[str, int]], most: int, prefix: str) -> tuple[Group, ...]:
    """Consecutive items (id, voxels) into groups of ≤ ``most`` items and ≤ ``GROUP_VOXELS``.

    An item larger than ``GROUP_VOXELS`` (a large volume) is a group of its own; small
    images (a folder) are ``most`` to a group. Ids are ``prefix`` + number.
    """
    groups = _pack([(item, 1, size) for item, size in sizes], most, GROUP_VOXELS)
    return tuple(Group(f"{prefix}{number}", tuple(members)) for number, members in enumerate(groups))


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
        try:
            shape = io.check_complete(file, what="input")  # one opening: checks and shape
        except ValueError as err:
            raise CiderError(str(err)) from err
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


def _check_outputs(config: dict) -> None:
    """Refuse an output or work folder that cannot be written, before any work."""
    run = paths(config)
    places = [("output_dir", run.output)] + ([("work_dir", run.work)] if config.get("work_dir") else [])
    for key, place in places:
        try:
            io.check_writable(place, f"config key '{key}'")
        except ValueError as err:
            raise CiderError(str(err)) from err


@lru_cache(maxsize=8)
def _cached_plan(config_json: str) -> Plan:
    config = json.loads(config_json)
    _check_outputs(config)
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
    channel_of = _psf_channels(config, units)
    psf_shape = make_psf(config, ndim).shape  # with psf.channels: the shape all channels share
    tiling = config["tiling"]
    tile_size = per_axis(tiling["tile_size"], ndim, "tiling.tile_size")
    need = minimum_margin(psf_shape)
    margin = need if tiling["margin"] == "auto" else per_axis(tiling["margin"], ndim, "tiling.margin")
    if any(m < n for m, n in zip(margin, need)):
        raise CiderError(
            f"config key 'tiling.margin': {margin} is smaller than the PSF requires ({need}, the PSF size "
            f"{psf_shape} minus 1); tiles would show seams. Use 'auto' or at least {need}"
        )
    blend = (
        auto_blend(margin) if tiling["blend"] == "auto" else per_axis(tiling["blend"], ndim, "tiling.blend")
    )
    if any(4 * b > t for b, t in zip(blend, tile_size)) and tiling["blend"] == "auto":
        least = tuple(max(t, 4 * b) for b, t in zip(blend, tile_size))
        raise CiderError(
            f"the PSF {tuple(psf_shape)} is too large for tiling.tile_size {tile_size}: tiles are blended "
            f"over half the margin ({blend}; margin = PSF size − 1), which needs tile_size ≥ 4 × that; "
            f"increase tiling.tile_size to at least {least}, or crop the PSF (psf.energy)"
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
    per_job = config["jobs"]["images_per_job"]
    pass_sizes = None
    if config["fit"].get("gpu_memory_gb"):
        shapes = [t.padded_shape for t in tiles]
        least = tuple(max(8, 4 * b) for b in blend)  # tile_size ≥ 4 × blend (checked above)
        strides = RestoreConfig(generator_strides=config.get("generator_strides", "isotropic")).strides(voxel)
        pass_sizes = gpu_pass_sizes(
            shapes, tuple(psf_shape), tuple(margin), tile_size, config["fit"], least, strides
        )
    psf_of_tile = [channel_of[units[t.unit].id] for t in tiles]
    shapes_per_job = COMPILE_SHAPES_PER_JOB if config.get("compile") else None
    batches = make_batches(
        tiles, config["fit"]["batch_size"], per_job, pass_sizes, psf_of_tile, shapes_per_job
    )
    if shapes_per_job:
        _note_compile_cost(len({t.padded_shape for t in tiles}), len(batches))
    groups = make_groups([(u.id, int(np.prod(u.shape))) for u in units], per_job, "g")
    voxels_of_name: dict[str, int] = {}
    for u in units:
        voxels_of_name[u.name] = voxels_of_name.get(u.name, 0) + int(np.prod(u.shape))
    parts = make_groups(list(voxels_of_name.items()), per_job, "p")
    return Plan(
        tuple(units),
        tuple(tiles),
        batches,
        names,
        tuple(psf_shape),
        tuple(margin),
        tuple(blend),
        groups,
        parts,
    )


def psf_channel(config: dict, unit: Unit) -> int:
    """Which of ``psf.channels`` restores ``unit``: its channel (0 without psf.channels)."""
    if not config["psf"].get("channels"):
        return 0
    outer = [a for a in config["input"]["axes"].upper() if a in "TC"]
    return unit.index[outer.index("C")]


def _psf_channels(config: dict, units: Sequence[Unit]) -> dict[str, int]:
    """The PSF index of every unit; with ``psf.channels``, checks that the inputs have a C
    axis with one channel per entry.

    Raises
    ------
    CiderError
        Naming the key and, for a channel count that differs, the file.
    """
    channels = config["psf"].get("channels")
    if channels and "C" not in config["input"]["axes"].upper():
        raise CiderError(
            f"config key 'psf.channels': {len(channels)} entries, but input.axes "
            f"{config['input']['axes']!r} has no C axis; remove psf.channels or declare the channel axis"
        )
    found = {u.id: psf_channel(config, u) for u in units}
    if channels:
        per_file: dict[str, int] = {}
        for u in units:
            per_file[u.file] = max(per_file.get(u.file, 0), found[u.id] + 1)
        for file, count in per_file.items():
            if count != len(channels):
                raise CiderError(
                    f"{file}: {count} channel(s), but config key 'psf.channels' has {len(channels)} entries; "
                    "give one entry per channel, in channel order"
                )
    return found


def per_axis(value, ndim: int, key: str) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int) else tuple(value)
    if len(values) != ndim:
        raise CiderError(
            f"config key '{key}': expected {ndim} values (one per spatial axis), got {list(values)}"
        )
    return tuple(int(v) for v in values)


# The config the plan depends on; also restore.generator_strides when it is "voxel" and
# restore.compile when it is on (make_plan).
PLAN_KEYS = (
    "input",
    "psf",
    "tiling",
    "fit",
    "jobs",
    "output_dir",
    "work_dir",
)


def make_plan(config: dict) -> Plan:
    """Units, tiles, batches, PSF shape, margin and blend width: made once, then read.

    The plan is written to ``work/plan.json`` with the settings it was made from and a
    fingerprint (size, modification time) of every input file. Later calls — every job
    of the run, and the next run — read it instead of opening every input again, as long
    as the settings, the list of input files and their fingerprints are unchanged (a
    ``stat`` per file); otherwise the plan is made anew and rewritten. Cached per process.
    """
    settings = {key: output_settings(config, key) for key in PLAN_KEYS}
    restore = config.get("restore") or {}
    if restore.get("generator_strides") == "voxel":
        settings["generator_strides"] = "voxel"  # the fit's memory per tile (absent: isotropic)
    if restore.get("compile") and restore.get("method", "cider") != "rl":
        settings["compile"] = True  # fewer tile shapes per fit job (absent: off)
    return _stored_plan(json.dumps(settings, sort_keys=True, default=str))


def fingerprint(file: str) -> tuple[int, int]:
    """(size, modification time in ns) of an input; for a Zarr folder, of its metadata."""
    path = Path(file)
    if path.is_dir():
        path = next(
            (path / m for m in ("zarr.json", ".zattrs", ".zarray", ".zgroup") if (path / m).exists()), path
        )
    stat = path.stat()
    return (int(stat.st_size), int(stat.st_mtime_ns))


def _sources(settings: dict) -> list[str]:
    """The files a plan depends on: the inputs and the PSF file, if any."""
    psf_file = (settings.get("psf") or {}).get("file")
    return input_files(settings) + ([psf_file] if psf_file else [])


@lru_cache(maxsize=8)
def _stored_plan(settings_json: str) -> Plan:
    settings = json.loads(settings_json)
    store = paths(settings).plan()
    sources = _sources(settings)
    if store.exists():
        try:
            stored = json.loads(store.read_text())
        except (OSError, ValueError):
            stored = {}
        if stored.get("settings") == settings and list(stored["plan"]["inputs"]) == sources:
            plan = Plan.from_dict(stored["plan"])
            if all(fingerprint(file) == print_ for file, print_ in plan.inputs):
                return plan
    plan = _cached_plan(settings_json)
    plan = replace(plan, inputs=tuple((file, fingerprint(file)) for file in sources))
    io.atomic_write_json(store, {"settings": settings, "plan": plan.to_dict()})
    return plan
