"""Reading and writing images, PSFs, tiles and OME-Zarr (the only layer that touches files)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = [
    "read_image",
    "image_shape",
    "check_complete",
    "check_writable",
    "png_values",
    "write_image",
    "read_psf",
    "atomic_write_npy",
    "atomic_write_json",
    "write_ome_zarr",
    "open_array",
    "voxel_size_of",
    "stated_voxel_mismatch",
]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".zarr")


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what}: no such file or folder: {path}")


def open_array(path: str | Path, what: str = "image"):
    """Open an image lazily where the format allows it (TIFF, Zarr, OME-Zarr, NPY).

    TIFF opens as a Zarr view of its pages/strips (tifffile ``aszarr``): slicing reads
    only what it needs. OME-Zarr groups open their full-resolution level (``0``). PNG is
    read into memory. Returns an array-like with ``.shape``, ``.dtype`` and numpy slicing.
    """
    path = Path(path)
    _check_exists(path, what)
    suffix = path.suffix.lower()
    try:
        if suffix == ".zarr" or (path.is_dir() and (path / "zarr.json").exists()):
            import zarr

            node = zarr.open(str(path), mode="r")
            if isinstance(node, zarr.Group):
                multiscales = node.attrs.get("ome", node.attrs).get("multiscales")
                key = multiscales[0]["datasets"][0]["path"] if multiscales else "0"
                node = node[key]
            return node
        if suffix == ".npy":
            return np.load(path, mmap_mode="r")
        if suffix in (".tif", ".tiff"):
            import tifffile
            import zarr

            return zarr.open(tifffile.imread(path, aszarr=True), mode="r")  # pages read on slicing
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return np.asarray(_png_grey(im))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{what}: cannot read {path}: {err}") from err
    raise ValueError(f"{what}: unsupported format {path.suffix!r} for {path}; use one of {IMAGE_SUFFIXES}")


# Length units of image metadata → µm (OME: UnitsLength symbols; NGFF: UDUNITS names; ImageJ).
MICRONS_PER_UNIT = {
    "µm": 1.0,
    "\u03bcm": 1.0,  # Greek mu, as some writers use
    "um": 1.0,
    "micron": 1.0,
    "micrometer": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
}


def voxel_size_of(path: str | Path) -> dict[str, float]:
    """The voxel size an image file states about itself, in µm by axis (``"z"``, ``"y"``,
    ``"x"``); only the axes it states with a length unit (empty: nothing stated).

    Read from an OME-TIFF's OME-XML (``PhysicalSize*``), an ImageJ TIFF's calibration
    (``unit``, ``spacing`` and the X/YResolution tags) or an OME-Zarr's first multiscale
    level (axis units and ``scale``). PNG and NPY state nothing.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            return _tiff_voxel_size(path)
        if suffix == ".zarr" or (path.is_dir() and (path / "zarr.json").exists()):
            return _ome_zarr_voxel_size(path)
    except (OSError, ValueError, KeyError, IndexError, TypeError, ZeroDivisionError):
        return {}  # unreadable or malformed metadata state nothing; the data are checked elsewhere
    return {}


def stated_voxel_mismatch(
    path: str | Path, voxel_size: Sequence[float], tolerance: float = 0.01
) -> str | None:
    """What the file states about its voxel size (``"z 0.5, y 0.2, x 0.2"``, µm) when an
    axis it states differs from ``voxel_size`` (Z, Y, X or Y, X) by more than
    ``tolerance`` (relative); None when it agrees or states nothing."""
    stated = voxel_size_of(path)
    axes = "zyx"[-len(voxel_size) :]
    if not any(a in stated and abs(stated[a] - v) > tolerance * v for a, v in zip(axes, voxel_size)):
        return None
    return ", ".join(f"{a} {stated[a]:.4g}" for a in axes if a in stated)


def _tiff_voxel_size(path: Path) -> dict[str, float]:
    import xml.etree.ElementTree as ElementTree

    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.is_ome and tif.ome_metadata:
            pixels = next(
                e for e in ElementTree.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels")
            )
            found = {}
            for axis in "ZYX":
                value = pixels.get(f"PhysicalSize{axis}")
                factor = MICRONS_PER_UNIT.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
                if value is not None and factor is not None:
                    found[axis.lower()] = float(value) * factor
            return found
        meta = tif.imagej_metadata if tif.is_imagej else None
        factor = MICRONS_PER_UNIT.get(str((meta or {}).get("unit", "")).strip())
        if factor is None:  # an uncalibrated ImageJ TIFF (pixels) or a plain TIFF
            return {}
        found = {}
        tags = tif.pages[0].tags
        for axis, tag in (("y", "YResolution"), ("x", "XResolution")):
            if tag in tags:
                numerator, denominator = tags[tag].value  # pixels per unit
                found[axis] = factor * denominator / numerator
        if "spacing" in meta:
            found["z"] = factor * float(meta["spacing"])
        return found


def _ome_zarr_voxel_size(path: Path) -> dict[str, float]:
    import zarr

    node = zarr.open(str(path), mode="r")
    if not isinstance(node, zarr.Group):
        return {}
    multiscales = node.attrs.get("ome", node.attrs).get("multiscales")
    if not multiscales:
        return {}
    axes = multiscales[0]["axes"]
    scale = next(
        t["scale"] for t in multiscales[0]["datasets"][0]["coordinateTransformations"] if t["type"] == "scale"
    )
    found = {}
    for axis, step in zip(axes, scale):
        factor = MICRONS_PER_UNIT.get(axis.get("unit", "")) if isinstance(axis, dict) else None
        if factor is not None and axis.get("type") == "space" and axis["name"] in ("z", "y", "x"):
            found[axis["name"]] = float(step) * factor
    return found


PNG_GREY_MODES = ("L", "I;16", "I;16B", "I;16L", "I", "F")


def _png_grey(im):
    """One grey channel from a PNG, the one reading the CLI and the pipeline share.

    Grey PNGs (8/16-bit) are kept as they are. Palette, grey+alpha, RGB and RGBA PNGs
    become 8-bit luminance, L = 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2, Pillow's
    ``convert("L")``), with alpha dropped; 1-bit PNGs become 0/255.
    """
    return im if im.mode in PNG_GREY_MODES else im.convert("L")


def image_shape(path: str | Path, what: str = "image") -> tuple[int, ...]:
    """Shape of an image as :func:`read_image` returns it, from its header only.

    PNGs have two axes whatever their colour mode (see :func:`_png_grey`).
    """
    path = Path(path)
    _check_exists(path, what)
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return tuple(tif.series[0].shape)
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return (im.height, im.width)
    except (OSError, ValueError, IndexError) as err:
        raise ValueError(f"{what}: cannot read {path}: {err}") from err
    return tuple(open_array(path, what).shape)


def check_complete(path: str | Path, what: str = "image") -> tuple[int, ...]:
    """Refuse a file that is cut short (an interrupted copy), before any work is done.

    Cheap: TIFF strips/tiles must lie inside the file (offsets from the headers), NPY
    data must fill the file, PNG chunks are checked by Pillow's ``verify`` (CRCs, no
    decoding). Zarr stores are not checked here (their chunks are read when needed).

    Returns
    -------
    tuple of int
        The shape, as :func:`image_shape` gives it, from the same opening of the file
        (planning opens every input once).

    Raises
    ------
    ValueError
        Naming the file and what is missing.
    """
    path = Path(path)
    _check_exists(path, what)
    suffix = path.suffix.lower()
    cut = f"{what}: {path} is incomplete (truncated or still being copied)"
    advice = "copy it again (or remove it from input.path) and rerun"
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            size = path.stat().st_size
            with _tiff_warnings() as warnings, tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape = tuple(series.shape)
                end = series.dataoffset + series.nbytes if series.dataoffset is not None else 0
                for page in series.pages if series.dataoffset is None else ():
                    if page is not None:
                        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
                        end = max([end, *ends])
            if warnings:
                raise ValueError(f"{cut}: {warnings[0]}; {advice}")
            if end > size:
                raise ValueError(f"{cut}: its data needs {end} bytes, the file has {size}; {advice}")
            return shape
        if suffix == ".npy":
            return tuple(np.load(path, mmap_mode="r").shape)
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                shape = (im.height, im.width)
                im.verify()
            return shape
    except ValueError:
        raise
    except (OSError, SyntaxError, IndexError) as err:
        raise ValueError(f"{cut}: {err}; {advice}") from err
    return image_shape(path, what)


@contextmanager
def _tiff_warnings():
    """Collect what tifffile logs about broken page chains while a file is opened."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if any(word in message for word in ("invalid page offset", "corrupted", "failed to reshape")):
                found.append(message)

    logger, handler = logging.getLogger("tifffile"), Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield found
    finally:
        logger.removeHandler(handler)


def check_writable(path: str | Path, what: str) -> None:
    """Refuse an output location that cannot be created or written, without creating it.

    The nearest existing folder of ``path`` must be a folder in which a file can be
    made (tried with a temporary file, so it holds for root and on read-only mounts).

    Raises
    ------
    ValueError
        Naming ``what`` (e.g. a config key) and the folder at fault.
    """
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: {path} cannot be created, {existing} is a file; choose another location")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(
            f"{what}: cannot write in {existing} ({err.strerror}); choose a writable location"
        ) from err


def read_image(path: str | Path, what: str = "image") -> np.ndarray:
    """Read a whole image (TIFF incl. multi-page, PNG, NPY, Zarr, OME-Zarr) into memory."""
    return np.asarray(open_array(path, what)[...])


def read_psf(path: str | Path) -> np.ndarray:
    """Read a PSF file (TIFF/PNG/NPY/Zarr); validation is :func:`cider.psf.validate_psf`."""
    return read_image(path, what="psf")


def write_image(
    path: str | Path,
    array: np.ndarray,
    text: dict[str, str] | None = None,
    provenance: dict | None = None,
) -> None:
    """Write an image atomically: TIFF (float32 kept), PNG (8/16-bit integers only), NPY.

    ``text`` goes into PNG text chunks (e.g. the scaling of :func:`png_values`).
    ``provenance`` (how the image was made, JSON-ready) goes, as ``{"cider": provenance}``
    JSON, into the TIFF's ImageDescription (as the pipeline's outputs) or the PNG text
    chunk ``cider``; an NPY file has no place for it.
    Raises ``ValueError`` for data a PNG cannot hold unchanged (floats): nothing is
    clipped or rounded silently.
    """
    made = json.dumps({"cider": provenance}) if provenance is not None else None
    path = Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    if suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(tmp, np.asarray(array), description=made)
    elif suffix == ".npy":
        np.save(tmp, np.asarray(array))
    elif suffix == ".png":
        from PIL import Image, PngImagePlugin

        array = np.asarray(array)
        if array.dtype not in (np.uint8, np.uint16):
            raise ValueError(
                f"output {path}: PNG stores 8/16-bit integers, not {array.dtype}; convert with "
                "cider.io.png_values (says what it changes) or write .tif to keep the values"
            )
        info = PngImagePlugin.PngInfo()
        for key, value in (text or {}).items():
            info.add_text(key, value)
        if made is not None:
            info.add_text("cider", made)
        Image.fromarray(array).save(tmp, pnginfo=info)
    else:
        raise ValueError(f"output: unsupported format {path.suffix!r} for {path}; use .tif, .png or .npy")
    os.replace(tmp, path)


def png_values(array: np.ndarray, source_dtype: np.dtype) -> tuple[np.ndarray, dict[str, str], list[str]]:
    """Restored values made ready for a PNG, with what was changed said and recorded.

    - Integer sources keep their units: values are rounded to integers, kept in the
      source's bit depth when they fit, else written as 16-bit; negative values are
      clipped to 0 (counted in the notes).
    - Float sources, or values above 65535, are scaled so the maximum is 65535 (zero
      stays 0 unless there are negative values, then the minimum is 0); the mapping
      ``value = stored × scale + offset`` is stored in the PNG text chunks
      ``cider:scale`` / ``cider:offset`` and said in the notes.

    Returns
    -------
    values, text, notes
        The 8/16-bit array, the PNG text chunks and one line per change made.
    """
    values = np.asarray(array, dtype=np.float64)
    notes: list[str] = []
    if np.issubdtype(source_dtype, np.integer) and values.max(initial=0) < 65535.5:
        negative = int(np.count_nonzero(values < -0.5))
        if negative:
            notes.append(f"PNG: {negative} negative values clipped to 0 (write .tif to keep them)")
        rounded = np.clip(np.rint(values), 0, None)
        dtype = np.uint8 if rounded.max(initial=0) <= 255 and source_dtype == np.uint8 else np.uint16
        if dtype != source_dtype:
            notes.append(f"PNG: written as 16-bit, the restored values reach {rounded.max():.0f}")
        return rounded.astype(dtype), {}, notes
    low, high = min(0.0, float(values.min(initial=0))), float(values.max(initial=0))
    scale = (high - low) / 65535 if high > low else 1.0
    stored = np.rint((values - low) / scale).astype(np.uint16)
    text = {"cider:scale": repr(scale), "cider:offset": repr(low)}
    notes.append(
        f"PNG: values scaled to 16-bit, value = stored × {scale:.6g} + {low:.6g} (kept in the PNG's "
        "text chunks cider:scale/cider:offset); write .tif to keep the values as they are"
    )
    return stored, text, notes


def atomic_write_npy(path: str | Path, array: np.ndarray) -> None:
    """Save ``array`` to ``path`` (.npy) so that the file appears only when complete."""
    write_image(path, array)


def atomic_write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Save named arrays to ``path`` (.npz, uncompressed); the file appears only when complete.

    Raises ``ValueError`` (naming the array) if one holds NaN or infinite values.
    """
    path = Path(path)
    for name, array in arrays.items():
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{path}: refusing to write {name}, it holds NaN/infinite values")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp.npz") as f:
        np.savez(f, **arrays)
        tmp = f.name
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data: dict) -> None:
    """Write strict JSON to ``path`` atomically (temporary file, then rename).

    Raises ``ValueError`` (naming the file) for NaN or infinite values, which are not JSON.
    """
    path = Path(path)
    try:
        text = json.dumps(data, indent=2, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{path}: refusing to write non-finite values as JSON ({err})") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
        tmp = f.name
    os.replace(tmp, path)


def write_ome_zarr(
    path: str | Path,
    array: np.ndarray,
    axes: str,
    voxel_size: Sequence[float],
    levels: int = 3,
    chunks: Sequence[int] | None = None,
) -> None:
    """Write an in-memory image as OME-Zarr with a multiscale pyramid, atomically.

    Parameters
    ----------
    path : str or Path
        Output folder (``.ome.zarr``); replaced if it exists.
    array : np.ndarray
        Image with axes ``axes`` (e.g. ``"ZYX"``, ``"CYX"``, ``"TCZYX"``).
    axes : str
        Axis letters, from T, C, Z, Y, X.
    voxel_size : sequence of float
        Physical size (µm) of the spatial axes, in the order they appear in ``axes``.
    levels : int
        Pyramid levels (see :func:`finish_ome_zarr`).
    chunks : sequence of int, optional
        Chunk shape of level 0 (default: the whole array).
    """
    array = np.asarray(array)
    level0 = create_ome_zarr(path, array.shape, array.dtype, axes, chunks or array.shape)
    level0[...] = array
    finish_ome_zarr(path, axes, voxel_size, levels)


def staging_path(path: str | Path) -> Path:
    """Where a folder output (Zarr, OME-Zarr) is written before :func:`publish_folder`."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def publish_folder(path: str | Path) -> None:
    """Move the finished folder from :func:`staging_path` into place, replacing an older one."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging_path(path), path)


def create_ome_zarr(path: str | Path, shape: Sequence[int], dtype, axes: str, chunks: Sequence[int]):
    """Start an OME-Zarr image: returns its level-0 Zarr array, to be filled block by block.

    It is written under a temporary name beside ``path``; :func:`finish_ome_zarr` (same
    process) adds the pyramid and the metadata and renames it into place, so a killed
    job never leaves an OME-Zarr that looks complete.
    """
    import zarr

    staging = staging_path(path)
    if staging.exists():
        shutil.rmtree(staging)
    root = zarr.open_group(str(staging), mode="w")
    chunks = tuple(min(int(c), int(n)) for c, n in zip(chunks, shape))
    names = [a.lower() for a in axes.upper()]
    return root.create_array("0", shape=tuple(shape), chunks=chunks, dtype=dtype, dimension_names=names)


def finish_ome_zarr(
    path: str | Path,
    axes: str,
    voxel_size: Sequence[float],
    levels: int = 3,
    provenance: dict | None = None,
) -> None:
    """Build the pyramid chunk by chunk, write the NGFF metadata and move the image into place.

    Each level halves Y and X (and Z while it stays at least as finely sampled as X) by
    block averaging, computed with dask from the level before it, so memory is bounded by
    the chunks. Every level gets its ``scale`` and the ``translation`` of its first voxel's
    centre ((factor − 1) / 2 voxels of level 0), so viewers overlay the levels exactly.
    ``provenance`` (JSON-serialisable: how the image was made) goes into the group's
    ``cider`` attribute beside the NGFF metadata.
    """
    import dask.array as da
    import zarr
    from ome_zarr.writer import write_multiscales_metadata

    path, axes = Path(path), axes.upper()
    spatial = [a for a in axes if a in "ZYX"]
    if len(voxel_size) != len(spatial):
        raise ValueError(
            f"OME-Zarr {path}: {len(spatial)} spatial axes in {axes!r} but voxel_size {voxel_size}"
        )
    size = dict(zip(spatial, (float(v) for v in voxel_size)))
    root = zarr.open_group(str(staging_path(path)), mode="r+")
    level0 = root["0"]
    factors = [1] * len(axes)
    datasets = [_dataset_metadata("0", axes, size, factors)]
    previous = level0
    for number in range(1, levels):
        step = [1] * len(axes)
        current = {a: size[a] * factors[i] for i, a in enumerate(axes) if a in size}
        for i, a in enumerate(axes):
            halve = a in "YX" or (a == "Z" and current["Z"] <= current["X"])
            if halve and previous.shape[i] >= 2:
                step[i] = 2
        coarse = block_mean(da.from_zarr(previous), step)
        chunks = tuple(min(c, n) for c, n in zip(level0.chunks, coarse.shape))
        names = [a.lower() for a in axes]
        array = root.create_array(
            str(number), shape=coarse.shape, chunks=chunks, dtype=level0.dtype, dimension_names=names
        )
        da.store(coarse.rechunk(chunks), array, lock=False)
        factors = [f * s for f, s in zip(factors, step)]
        datasets.append(_dataset_metadata(str(number), axes, size, factors))
        previous = array
    axes_meta = [
        {"name": a.lower(), "type": "space", "unit": "micrometer"}
        if a in "ZYX"
        else {"name": a.lower(), "type": "channel" if a == "C" else "time"}
        for a in axes
    ]
    write_multiscales_metadata(root, datasets, axes=axes_meta)
    if provenance is not None:
        root.attrs["cider"] = provenance
    publish_folder(path)


def _dataset_metadata(name: str, axes: str, size: dict[str, float], factors: Sequence[int]) -> dict:
    scale = [round(size[a] * f, 12) if a in size else 1.0 for a, f in zip(axes, factors)]
    translation = [round(size[a] * (f - 1) / 2, 12) if a in size else 0.0 for a, f in zip(axes, factors)]
    transforms = [{"type": "scale", "scale": scale}]
    if any(translation):
        transforms.append({"type": "translation", "translation": translation})
    return {"path": name, "coordinateTransformations": transforms}


def block_mean(array, step: Sequence[int]):
    """Dask block average by integer ``step`` per axis (a trailing remainder is dropped)."""
    import dask.array as da

    chunks = tuple(max(s, (c // s) * s) for c, s in zip(array.chunksize, step))
    trimmed = array[tuple(slice(0, (n // s) * s) for n, s in zip(array.shape, step))].rechunk(chunks)
    mean = da.coarsen(np.mean, trimmed, {i: s for i, s in enumerate(step) if s > 1}, trim_excess=True)
    return mean.astype(array.dtype)


def write_tiff_pages(path: str | Path, array, description: str | None = None) -> None:
    """Write an array-like (e.g. a Zarr array larger than memory) as a multi-page TIFF,
    one 2D page at a time, atomically (BigTIFF when it needs more than 4 GB).
    ``description``: text for the first page's ImageDescription tag (e.g. provenance JSON)."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    outer = array.shape[:-2]
    pages = (np.asarray(array[index]) for index in np.ndindex(*outer))
    big = array.size * np.dtype(array.dtype).itemsize > 2**32 - 2**25
    tifffile.imwrite(
        staging,
        data=pages,
        shape=array.shape,
        dtype=array.dtype,
        bigtiff=big,
        description=description,
    )
    os.replace(staging, path)
