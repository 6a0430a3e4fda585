"""The PSF a dataset config describes: a measured file (cleaned), a Gaussian or an optical model."""

from __future__ import annotations

import json
import sys
from functools import lru_cache

import numpy as np

from .. import io
from ..errors import CiderError
from ..psf import clean_psf, gaussian_psf, lightsheet_psf, widefield_psf

PSF_KINDS = ("file", "gaussian_sigma", "model")


def make_psf(config: dict, ndim: int, channel: int = 0) -> np.ndarray:
    """The PSF the config describes (file, Gaussian or optical model), validated.

    With ``psf.channels``, the PSF of channel ``channel``: its entry over the shared
    ``psf`` keys, zero-padded about its centre to the shape common to every channel
    (tiles share one margin; zeros change no convolution). Computed once per process
    (the plan and a tile's restore both need it).
    """
    voxel = config["input"]["voxel_size"]
    channels = config["psf"].get("channels")
    if not channels:
        return _cached_psf(_key(config["psf"], voxel), ndim).copy()
    psfs = []
    for number, entry in enumerate(channels):
        if entry.get("channels"):
            raise CiderError(
                f"config key 'psf.channels' entry {number}: an entry cannot have channels itself"
            )
        shared = {k: v for k, v in config["psf"].items() if k != "channels"}
        if any(entry.get(k) not in (None, "") for k in PSF_KINDS):  # the entry's kind replaces the shared one
            shared = {k: v for k, v in shared.items() if k not in PSF_KINDS}
        try:
            psfs.append(_cached_psf(_key({**shared, **entry}, voxel), ndim))
        except CiderError as err:
            raise CiderError(f"config key 'psf.channels' entry {number} (channel {number}): {err}") from err
    common = tuple(max(p.shape[axis] for p in psfs) for axis in range(ndim))
    psf = psfs[channel]
    return np.pad(psf, [((n - k) // 2, (n - k) // 2) for n, k in zip(common, psf.shape)])


def _key(spec: dict, voxel) -> str:
    return json.dumps({"psf": spec, "voxel_size": voxel}, sort_keys=True)


@lru_cache(maxsize=8)
def _cached_psf(key: str, ndim: int) -> np.ndarray:
    config = json.loads(key)
    spec = config["psf"]
    voxel = config["voxel_size"]
    given = [f"psf.{k}" for k in ("file", "gaussian_sigma", "model") if spec.get(k) not in (None, "")]
    if len(given) > 1:
        raise CiderError(
            f"config keys {', '.join(given)}: give only one of psf.file, psf.gaussian_sigma or psf.model "
            "(they describe the PSF in different ways)"
        )
    if spec.get("file"):
        name = f"config key 'psf.file' ({spec['file']})"
        psf_voxel = spec.get("voxel_size")
        if psf_voxel is not None and voxel is None:
            raise CiderError(
                "config key 'psf.voxel_size' needs 'input.voxel_size' (the image's sampling) too"
            )
        measured = io.read_psf(spec["file"])
        if measured.ndim != ndim:
            raise CiderError(
                f"{name}: the PSF has {measured.ndim} axes (shape {measured.shape}) but the images have "
                f"{ndim} spatial axes (input.axes); give a PSF with one axis per spatial axis"
            )
        psf, notes = clean_psf(
            measured,
            name=name,
            psf_voxel_size=psf_voxel,
            image_voxel_size=voxel if psf_voxel is not None else None,
            remove_pedestal=spec["remove_pedestal"],
            recentre=spec["recentre"],
            energy=spec["energy"],
        )
        if psf_voxel is None and voxel is not None:
            notes += _unstated_sampling(name, spec["file"], voxel)
        for note in notes:
            print(f"cider: {note}", file=sys.stderr)
        return psf
    if spec.get("model"):
        size = spec.get("size")
        if not size or len(size) != ndim:
            raise CiderError(f"config key 'psf.size': give {ndim} odd sizes for psf.model {spec['model']!r}")
        needed = (
            ("wavelength", "na", "sheet_thickness") if spec["model"] == "lightsheet" else ("wavelength", "na")
        )
        missing = [f"psf.{k}" for k in needed if spec.get(k) is None]
        if missing:
            raise CiderError(
                f"config key psf.model {spec['model']!r} needs {', '.join(missing)} (see config/README.md)"
            )
        if voxel is None:
            raise CiderError(f"config key psf.model {spec['model']!r} needs input.voxel_size (µm per axis)")
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


def _unstated_sampling(name: str, file: str, voxel: list[float]) -> list[str]:
    """A note when a PSF file states another voxel size than the images' and
    ``psf.voxel_size`` is not set: it is used as sampled on the image grid (PSF files'
    metadata are often left at a default, so this is said, not refused)."""
    theirs = io.stated_voxel_mismatch(file, voxel)
    if not theirs:
        return []
    return [
        f"{name}: the file states a voxel size of {theirs} µm, the images' is {list(voxel)}; it is used "
        "as sampled on the image grid. If the file's sampling is right, set psf.voxel_size to it "
        "(the PSF is then resampled)"
    ]
