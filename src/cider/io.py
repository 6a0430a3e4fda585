"""Reading and writing images, PSFs, tiles and OME-Zarr (the only layer that touches files)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "read_image",
    "write_image",
    "read_psf",
    "atomic_write_npy",
    "atomic_write_json",
    "write_ome_zarr",
    "open_array",
]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".zarr")


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what}: no such file or folder: {path}")


def open_array(path: str | Path, what: str = "image"):
    """Open an image lazily where the format allows it (Zarr, OME-Zarr, NPY memory map).

    OME-Zarr groups open their full-resolution level (``0``). TIFF and PNG are read into
    memory. Returns an array-like with ``.shape``, ``.dtype`` and numpy slicing.
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

            return tifffile.imread(path)
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return np.asarray(im.convert("F") if im.mode not in ("L", "I;16", "I", "F") else im)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{what}: cannot read {path}: {err}") from err
    raise ValueError(f"{what}: unsupported format {path.suffix!r} for {path}; use one of {IMAGE_SUFFIXES}")


def read_image(path: str | Path, what: str = "image") -> np.ndarray:
    """Read a whole image (TIFF incl. multi-page, PNG, NPY, Zarr, OME-Zarr) into memory."""
    return np.asarray(open_array(path, what)[...])


def read_psf(path: str | Path) -> np.ndarray:
    """Read a PSF file (TIFF/PNG/NPY/Zarr); validation is :func:`cider.psf.validate_psf`."""
    return read_image(path, what="psf")


def write_image(path: str | Path, array: np.ndarray) -> None:
    """Write an image atomically: TIFF (float32 kept), PNG (8/16-bit), NPY."""
    path = Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    if suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(tmp, np.asarray(array))
    elif suffix == ".npy":
        np.save(tmp, np.asarray(array))
    elif suffix == ".png":
        from PIL import Image

        array = np.asarray(array)
        if array.dtype not in (np.uint8, np.uint16):
            array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        Image.fromarray(array).save(tmp)
    else:
        raise ValueError(f"output: unsupported format {path.suffix!r} for {path}; use .tif, .png or .npy")
    os.replace(tmp, path)


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
    """Write an OME-Zarr (NGFF 0.4) image with a multiscale pyramid, atomically.

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
        Pyramid levels; each halves Y and X (and Z when it is at least as finely
        sampled as X after halving).
    chunks : sequence of int, optional
        Chunk shape of level 0.
    """
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_multiscale

    path = Path(path)
    axes = axes.upper()
    spatial = [a for a in axes if a in "ZYX"]
    if len(voxel_size) != len(spatial):
        raise ValueError(
            f"OME-Zarr {path}: {len(spatial)} spatial axes in {axes!r} but voxel_size {voxel_size}"
        )
    units = {"Z": "micrometer", "Y": "micrometer", "X": "micrometer"}
    axes_meta = [
        {"name": a.lower(), "type": "space" if a in "ZYX" else ("channel" if a == "C" else "time"),
         **({"unit": units[a]} if a in "ZYX" else {})}
        for a in axes
    ]  # fmt: skip
    pyramid, transforms, factors = [np.asarray(array)], [], [1.0] * len(axes)
    size = dict(zip(spatial, voxel_size))
    for level in range(levels):
        scale = [size[a] * factors[i] if a in "ZYX" else 1.0 for i, a in enumerate(axes)]
        transforms.append([{"type": "scale", "scale": scale}])
        if level == levels - 1:
            break
        step = [1] * len(axes)
        for i, a in enumerate(axes):
            if a in "YX" or (
                a == "Z" and size["Z"] * factors[i] * 2 <= size["X"] * factors[axes.index("X")] * 2
            ):
                step[i] = 2 if pyramid[-1].shape[i] >= 2 else 1
        factors = [f * s for f, s in zip(factors, step)]
        pyramid.append(_downsample(pyramid[-1], step))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    store = parse_url(str(tmp), mode="w").store
    import zarr

    root = zarr.group(store=store)
    storage = {"chunks": tuple(chunks)} if chunks else None
    write_multiscale(
        pyramid, root, axes=axes_meta, coordinate_transformations=transforms, storage_options=storage
    )
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _downsample(array: np.ndarray, step: Sequence[int]) -> np.ndarray:
    """Block-average by integer ``step`` per axis (trailing remainder dropped)."""
    trimmed = array[tuple(slice(0, (n // s) * s) for n, s in zip(array.shape, step))]
    shape: list[int] = []
    for n, s in zip(trimmed.shape, step):
        shape += [n // s, s]
    return trimmed.reshape(shape).mean(axis=tuple(range(1, 2 * len(step), 2))).astype(array.dtype)
