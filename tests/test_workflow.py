"""The Snakemake workflow: config validation, end-to-end 2D/3D runs, rerun of a failed tile."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

import cider
from cider import gaussian_psf
from cider.errors import CiderError
from cider.rl import BlurOperator
from cider.workflow import ALLOW_CPU_ENV, FAIL_ENV, make_batches, make_plan, require_gpu, validate_config
from cider.workflow.stitch import fitted_weights_digest

from .conftest import ROOT, blobs

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _dataset(tmp: Path, shape: tuple[int, ...], sigma, tile, seed=0, batch_size=8, **restore) -> Path:
    """Write a blurred synthetic image (valid blur of a larger scene) and its config."""
    psf = gaussian_psf(sigma, ndim=len(shape), size=5 if len(shape) == 3 else None)
    big = tuple(n + k - 1 for n, k in zip(shape, psf.shape))
    scene = blobs(big, int(np.prod(big) / 150), seed)
    image = BlurOperator(torch.tensor(psf), shape, "valid")(torch.tensor(scene)).numpy()
    image = (1000 * image + 100 + np.random.default_rng(seed).normal(0, 2, shape)).astype(np.float32)
    tifffile.imwrite(tmp / "input.tif", image)
    crop = tuple(slice(k // 2, k // 2 + n) for k, n in zip(psf.shape, shape))
    tifffile.imwrite(tmp / "truth.tif", (1000 * scene[crop] + 100).astype(np.float32))
    tifffile.imwrite(tmp / "psf.tif", psf.astype(np.float32))
    voxel = [0.5, 0.2, 0.2][-len(shape) :]
    config = {
        "name": "test",
        "input": {"path": str(tmp / "input.tif"), "axes": "ZYX"[-len(shape) :], "voxel_size": voxel},
        "psf": {"file": str(tmp / "psf.tif")},
        "output_dir": str(tmp / "out"),
        "tiling": {"tile_size": tile},
        "restore": {"iterations": 40, "rl_iterations": 10, **restore},
        "fit": {"batch_size": batch_size},
        "jobs": {"images_per_job": 1},  # a fit job per pass of batch_size tiles: reruns are per batch
        "stitch": {"pyramid_levels": 2},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snakemake(config: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [
        *SNAKEMAKE,
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(config.parent),
        "--configfile",
        str(config),
        "--cores",
        "2",
        *extra,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=900
    )


def _psnr_gain(restored: np.ndarray, before: np.ndarray, tmp: Path) -> float:
    """PSNR gain (dB) of the restored image over the input, both against the written truth.

    Judged on the truth, not on sharpness (amplified noise is sharp too).
    """
    truth = tifffile.imread(tmp / "truth.tif").astype(np.float64)
    peak = float(np.ptp(truth))

    def psnr(x):
        return 10 * np.log10(peak**2 / np.mean((np.asarray(x, np.float64) - truth) ** 2))

    return psnr(restored) - psnr(before)


def _read_ome_zarr(path: Path):
    import zarr

    group = zarr.open_group(str(path), mode="r")
    meta = group.attrs["ome"]["multiscales"][0]
    return group, meta


# ------------------------------------------------------------------------ config
def _minimal() -> dict:
    return {
        "name": "x",
        "input": {"path": "a.tif", "axes": "YX", "voxel_size": [1, 1]},
        "psf": {"gaussian_sigma": 1.0},
        "output_dir": "out",
    }


def test_schema_fills_defaults():
    config = validate_config(_minimal())
    assert config["tiling"]["margin"] == "auto" and config["restore"]["iterations"] == 3000


def test_schema_restore_defaults_are_the_library_defaults():
    from cider import RestoreConfig

    restore = validate_config(_minimal())["restore"]
    assert restore.pop("modality") == "brightfield"  # the pipeline's switch of two of them
    library = RestoreConfig()
    assert restore == {key: getattr(library, key) for key in restore}


def test_schema_rejects_unknown_key_naming_it():
    config = _minimal() | {"tiling": {"tile_sise": 64}}
    with pytest.raises(CiderError, match=r"key 'tiling'.*'tile_sise' was unexpected"):
        validate_config(config)


def test_schema_rejects_wrong_type_naming_the_key():
    config = _minimal() | {"restore": {"iterations": "many"}}
    with pytest.raises(CiderError, match=r"key 'restore.iterations': 'many' is not of type 'integer'"):
        validate_config(config)


def test_generator_input_reaches_the_fit_and_is_checked():
    from cider.workflow.config import restore_config

    config = validate_config(_minimal() | {"restore": {"generator_input": "image_rl"}})
    assert restore_config(config).generator_input == "image_rl"
    with pytest.raises(CiderError, match=r"key 'restore.generator_input': 'images' is not one of"):
        validate_config(_minimal() | {"restore": {"generator_input": "images"}})


def test_hessian_norm_reaches_the_fit_and_is_checked():
    from cider.workflow.config import restore_config

    config = validate_config(_minimal() | {"restore": {"hessian_norm": "frobenius"}})
    assert restore_config(config).hessian_norm == "frobenius"
    with pytest.raises(CiderError, match=r"key 'restore.hessian_norm': 'nuclear' is not one of"):
        validate_config(_minimal() | {"restore": {"hessian_norm": "nuclear"}})


def test_polish_and_ssim_weight_reach_the_fit_and_are_checked():
    from cider.workflow.config import restore_config

    settings = {"ssim_weight": 0.0, "data_weight": 100.0, "polish_iterations": 500}
    config = validate_config(_minimal() | {"restore": settings})
    rcfg = restore_config(config)
    assert (rcfg.ssim_weight, rcfg.polish_iterations, rcfg.polish_learning_rate) == (0.0, 500, 0.01)
    with pytest.raises(CiderError, match=r"key 'restore.polish_iterations': -1 is less than the minimum"):
        validate_config(_minimal() | {"restore": {"polish_iterations": -1}})
    with pytest.raises(CiderError, match=r"polish_iterations polishes the generator fit"):
        restore_config(validate_config(_minimal() | {"restore": {"method": "rl", "polish_iterations": 5}}))


def test_tile_record_keeps_the_polish_next_to_the_generator_history():
    from types import SimpleNamespace

    import torch

    from cider.fitting import Fit
    from cider.workflow.steps import _tile_record

    tile = SimpleNamespace(id="t0", unit_id="u000", padded=((0, 40), (0, 40)))
    fit = Fit(torch.zeros(4, 4), [3.0, 2.5, 2.0], 1.1, "iterations", polish_losses=[2.0, 1.8, 1.7, 1.6])
    record = _tile_record(tile, fit, "b0", "cider", "cpu")
    assert record["iterations"] == 3 and record["loss_history"] == [3.0, 2.5, 2.0]
    assert record["polish_steps"] == 4 and record["polish_loss"] == [2.0, 1.6]
    plain = _tile_record(tile, Fit(torch.zeros(4, 4), [3.0], 1.0, "iterations"), "b0", "cider", "cpu")
    assert plain["polish_steps"] == 0 and plain["polish_loss"] is None


def test_too_small_margin_is_an_error(tmp_path):
    config = yaml.safe_load(_dataset(tmp_path, (60, 60), 1.5, 32).read_text())
    config["tiling"]["margin"] = 4
    with pytest.raises(CiderError, match=r"tiling.margin.*smaller than the PSF requires \(\(12, 12\)"):
        make_plan(validate_config(config))


def test_axes_mismatch_names_the_file(tmp_path):
    config = yaml.safe_load(_dataset(tmp_path, (60, 60), 1.5, 32).read_text())
    config["input"]["axes"] = "ZYX"
    with pytest.raises(CiderError, match=r"input.tif: has 2 axes .* 'input.axes' is 'ZYX'"):
        make_plan(validate_config(config))


def _psf_2d_file(tmp: Path) -> dict:
    tifffile.imwrite(tmp / "psf2d.tif", gaussian_psf(1.0).astype(np.float32))
    return {"file": str(tmp / "psf2d.tif")}


def _truncated_input(tmp: Path) -> dict:
    data = (tmp / "input.tif").read_bytes()
    (tmp / "cut.tif").write_bytes(data[: len(data) // 2])
    return {"path": str(tmp / "cut.tif"), "axes": "ZYX", "voxel_size": [0.5, 0.2, 0.2]}


PLANNING_ERRORS = [
    # (what the user wrote, the message that must name it and say what to do)
    (
        "2D PSF file for ZYX data",
        {"psf": _psf_2d_file},
        r"psf.file.*the PSF has 2 axes .*but the images have 3 spatial axes",
    ),
    (
        "PSF larger than the tile",
        {"psf": {"gaussian_sigma": [2.0, 6.0, 6.0]}},
        r"PSF \(\d+, \d+, \d+\) is too large for tiling.tile_size .*increase tiling.tile_size to at least",
    ),
    (
        "model without wavelength",
        {"psf": {"model": "widefield", "na": 1.2, "size": [9, 15, 15]}},
        r"psf.model 'widefield' needs psf.wavelength",
    ),
    (
        "light-sheet model without sheet",
        {"psf": {"model": "lightsheet", "na": 0.8, "wavelength": 0.5, "size": [9, 15, 15]}},
        r"needs psf.sheet_thickness",
    ),
    (
        "zero Gaussian sigma",
        {"psf": {"gaussian_sigma": 0}},
        r"key 'psf.gaussian_sigma': 0 is less than or equal",
    ),
    (
        "file and sigma both given",
        {"psf": lambda tmp: {"file": str(tmp / "psf.tif"), "gaussian_sigma": 1.0}},
        r"psf.file, psf.gaussian_sigma: give only one",
    ),
    (
        "unknown device name",
        {"restore": {"device": "gpu0"}},
        r"key 'restore.device': 'gpu0' does not match",
    ),
    (
        "truncated input TIFF",
        {"input": _truncated_input},
        r"cut.tif is incomplete \(truncated or still being copied\).*copy it again",
    ),
    (
        "output folder that cannot be made",
        {"output_dir": lambda tmp: str(tmp / "input.tif" / "out")},
        r"config key 'output_dir': .*out cannot be created, .*input.tif is a file",
    ),
]


@pytest.mark.parametrize("what, change, message", PLANNING_ERRORS, ids=[c[0] for c in PLANNING_ERRORS])
def test_bad_configs_are_refused_at_planning_naming_the_key(tmp_path, what, change, message):
    config = yaml.safe_load(_dataset(tmp_path, (12, 36, 36), (0.8, 1.2, 1.2), [12, 24, 24]).read_text())
    for key, value in change.items():
        config[key] = value(tmp_path) if callable(value) else value
    with pytest.raises(CiderError, match=message):
        make_plan(validate_config(config))


def test_colour_pngs_plan_as_grey_images_like_the_cli_reads_them(tmp_path):
    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(folder / "rgb.png")
    Image.fromarray(rgb, "RGB").quantize(16).save(folder / "palette.png")
    config = validate_config(
        _minimal() | {"input": {"path": str(folder), "axes": "YX", "voxel_size": [1, 1]}}
    )
    config["output_dir"] = str(tmp_path / "out")
    plan = make_plan(config)
    assert [u.shape for u in plan.units] == [(40, 50), (40, 50)]


def test_voxel_size_of_the_wrong_length_is_refused_at_planning(tmp_path):
    config = yaml.safe_load(_dataset(tmp_path, (60, 60), 1.5, 32).read_text())
    config["input"]["voxel_size"] = [0.5, 0.2, 0.2]
    with pytest.raises(CiderError, match=r"input.voxel_size.*3 values but the images have 2 spatial axes"):
        make_plan(validate_config(config))


def test_psf_file_is_cleaned_and_resampled_at_planning(tmp_path, capfd):
    """A PSF file at half the image's sampling, with a pedestal: resampled, said so."""
    config = yaml.safe_load(_dataset(tmp_path, (60, 60), 1.5, 32).read_text())
    fine = gaussian_psf(3.0, size=25) * 1000 + 2.0  # 0.1 µm pixels, image has 0.2 µm
    tifffile.imwrite(tmp_path / "psf.tif", fine.astype(np.float32))
    config["psf"]["voxel_size"] = [0.1, 0.1]
    plan = make_plan(validate_config(config))
    err = capfd.readouterr().err
    assert "pedestal" in err and "resampled" in err
    assert plan.psf_shape[0] < 25


def test_batches_group_same_shape_tiles_up_to_the_batch_size(tmp_path):
    config = yaml.safe_load(_dataset(tmp_path, (70, 90), 1.5, 40, batch_size=4).read_text())
    plan = make_plan(validate_config(config))
    assert len(plan.tiles) == 6 and [len(b.tiles) for b in plan.batches] == [4, 2]
    assert [plan.batch_of(t.id) for t in plan.tiles] == ["b0"] * 4 + ["b1"] * 2
    from cider.tiling import tile_grid

    mixed = tile_grid((40, 40), (20, 20), (2, 2)) + tile_grid((30, 40), (30, 20), (2, 2), unit=1)
    batches = make_batches(mixed, 3)
    for batch in batches:  # a pass holds tiles of one shape
        for one_pass in batch.passes:
            assert len({next(t for t in mixed if t.id == i).padded_shape for i in one_pass}) == 1
    assert sorted(i for b in batches for i in b.tiles) == sorted(t.id for t in mixed)


def test_small_tiles_and_images_of_any_size_are_packed_into_few_jobs():
    """Passes of ≤ fit.batch_size same-shape tiles go into one fit job up to
    max(batch_size, jobs.images_per_job) tiles and FIT_JOB_VOXELS padded voxels."""
    from cider.tiling import tile_grid
    from cider.workflow import make_groups, plan

    small = [t for u in range(10) for t in tile_grid((20 + u % 3, 30), (64, 64), (2, 2), unit=u)]
    large = tile_grid((100, 100), (40, 40), (2, 2), unit=10)  # 9 tiles of one shape
    batches = make_batches(small + large, 2, images_per_job=4)
    # 3 shapes of small images (4, 3, 3 images), then 4 shapes of large-image tiles (4, 2, 2, 1)
    assert [[len(p) for p in b.passes] for b in batches] == [[2, 2], [2, 1], [2, 1], [2, 2], [2, 2], [1]]
    shapes = {t.id: t.padded_shape for t in small + large}
    for batch in batches:
        assert all(len({shapes[t] for t in p}) == 1 for p in batch.passes)
    assert sorted(t for b in batches for t in b.tiles) == sorted(t.id for t in small + large)
    budget = 2 * int(np.prod(large[0].padded_shape))  # room for one pass of two large tiles
    original = plan.FIT_JOB_VOXELS
    try:
        plan.FIT_JOB_VOXELS = budget
        assert all(len(b.passes) == 1 for b in make_batches(large, 2, images_per_job=64))
    finally:
        plan.FIT_JOB_VOXELS = original
    groups = make_groups([("a", 10), ("b", 10), ("c", 2**27), ("d", 10)], 2, "g")
    assert [g.members for g in groups] == [("a", "b"), ("c",), ("d",)]  # a large image: a job alone


def test_gpu_memory_sizes_passes_and_names_a_tile_size_that_fits(tmp_path, capfd):
    """fit.gpu_memory_gb: a pass holds what the card holds; a tile that does not fit alone
    is refused at planning with the largest tiling.tile_size that fits, which then plans."""
    from cider.generator import voxel_strides
    from cider.memory import fit_memory_bytes

    tifffile.imwrite(tmp_path / "v.tif", np.zeros((96, 128, 128), np.uint16))
    config = _minimal() | {
        "input": {"path": str(tmp_path / "v.tif"), "axes": "ZYX", "voxel_size": [0.5, 0.2, 0.2]},
        "psf": {"gaussian_sigma": [1.0, 1.0, 1.0]},
        "output_dir": str(tmp_path / "out"),
        "tiling": {"tile_size": [48, 64, 64]},
        "fit": {"batch_size": 8, "gpu_memory_gb": 8},
    }
    plan = make_plan(validate_config(config))
    budget = 0.9 * 8 * 2**30
    psf = plan.psf_shape
    shapes = {t.id: t.padded_shape for t in plan.tiles}
    sizes = [len(p) for b in plan.batches for p in b.passes]
    assert 1 < max(sizes) < 8  # the card, not fit.batch_size, sets the pass size
    full = {}  # padded shape -> its pass size (a shape's last pass may hold the rest only)
    for batch in plan.batches:
        for one_pass in batch.passes:
            shape = shapes[one_pass[0]]
            full[shape] = max(full.get(shape, 0), len(one_pass))
    for shape, size in full.items():
        fitted = tuple(n + k - 1 for n, k in zip(shape, psf))
        assert fit_memory_bytes(fitted, size) <= budget < fit_memory_bytes(fitted, size + 1)
    assert f"fitted {max(sizes)} per pass, not fit.batch_size 8" in capfd.readouterr().err

    # restore.generator_strides: voxel (z step 2.5× xy keeps z at the first level) is
    # counted: ~7 % more per tile here, one tile less per pass on a 12 GB card
    card = config | {"fit": {"batch_size": 8, "gpu_memory_gb": 12}}
    isotropic = make_plan(validate_config(card))
    strided = make_plan(validate_config(card | {"restore": {"generator_strides": "voxel"}}))
    most = [max(len(p) for b in plan.batches for p in b.passes) for plan in (isotropic, strided)]
    assert most[1] == most[0] - 1
    fitted = tuple(n + k - 1 for n, k in zip(strided.tiles[0].padded_shape, psf))
    strides = voxel_strides((0.5, 0.2, 0.2))
    assert fit_memory_bytes(fitted, most[1], strides=strides) <= 0.9 * 12 * 2**30

    config["fit"]["gpu_memory_gb"] = 2
    with pytest.raises(
        CiderError, match=r"needs about \d+\.\d GiB of GPU memory.*fit.gpu_memory_gb \(2\)"
    ) as error:
        make_plan(validate_config(config))
    suggested = json.loads(str(error.value).split("tiling.tile_size to at most ")[1])
    assert all(s < t for s, t in zip(suggested, [48, 64, 64]))
    config["tiling"]["tile_size"] = suggested
    assert make_plan(validate_config(config)).tiles


def test_a_job_given_a_gpu_requires_cuda(monkeypatch):
    from cider.restore import resolve_device

    config = validate_config(_minimal())
    monkeypatch.delenv(ALLOW_CPU_ENV, raising=False)
    assert require_gpu(config, 0)["restore"]["device"] == "auto"
    assert require_gpu(config, 1)["restore"]["device"] == "cuda"
    assert config["restore"]["device"] == "auto"  # the caller's config is not changed
    monkeypatch.setenv(ALLOW_CPU_ENV, "1")
    assert require_gpu(config, 1)["restore"]["device"] == "auto"
    if not torch.cuda.is_available():
        with pytest.raises(CiderError, match=r"'cuda' requested but CUDA is not usable here \(torch .*build"):
            resolve_device("cuda")
    with pytest.raises(CiderError, match=r"'gpu0' is not a device name.*'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("gpu0")


def test_a_dataset_config_stands_alone(tmp_path):
    """Keys a dataset config omits take the schema defaults, not the demo config's values."""
    config = yaml.safe_load(_dataset(tmp_path, (200, 200), 1.0, 64).read_text())
    del config["tiling"], config["fit"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = _snakemake(tmp_path / "config.yaml", "-n")
    assert run.returncode == 0, run.stderr[-2000:]
    # schema default tile_size 128: 2 × 2 tiles in one batch (the demo's 64 would give 16 tiles)
    assert _job_counts(run.stdout).get("fit") == 1, run.stdout
    command = [*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-n", "--directory", str(tmp_path)]
    alone = subprocess.run(command, capture_output=True, text=True)
    assert alone.returncode != 0 and "no config: give --configfile" in alone.stdout + alone.stderr


FLUO = ("fluorescence", 100.0, "stabilised", "block", "features_rl10.pt")
BRIGHT = ("brightfield", 0.0, "intensity", "loss", None)


@pytest.mark.parametrize(
    "psf, restore, expected",
    [
        # fluorescence optics: the fluorescence settings (cider.FLUORESCENCE)
        ({"model": "lightsheet"}, {}, FLUO),
        ({"model": "widefield"}, {}, FLUO),
        # a keyed setting wins over the modality's
        ({"model": "widefield"}, {"data_weight": 0.0}, ("fluorescence", 0.0, *FLUO[2:])),
        ({"model": "widefield"}, {"keep_best_by": "loss"}, (*FLUO[:3], "loss", FLUO[4])),
        ({"model": "widefield"}, {"feature_weights": "features.pt"}, (*FLUO[:4], "features.pt")),
        # a measured or Gaussian PSF says nothing of the optics: the package defaults
        ({"gaussian_sigma": 1.0}, {}, BRIGHT),
        ({"gaussian_sigma": 1.0}, {"modality": "fluorescence"}, FLUO),
        ({"model": "lightsheet"}, {"modality": "brightfield"}, BRIGHT),
    ],
)
def test_the_modality_sets_the_fluorescence_settings_unless_keyed(psf, restore, expected):
    """restore.modality (auto: fluorescence for a widefield or light-sheet PSF model) fills
    data_weight, hessian_domain, keep_best_by and feature_weights; the resolved modality is
    what the config (and so the output's provenance) holds; validating twice changes
    nothing; the fit gets the settings."""
    from cider.workflow.config import restore_config

    config = {
        "name": "m",
        "input": {"path": "v.tif", "axes": "ZYX", "voxel_size": [0.5, 0.2, 0.2]},
        "psf": psf | ({"na": 0.8, "wavelength": 0.5, "size": [9, 15, 15]} if "model" in psf else {}),
        "output_dir": "out",
        "restore": restore,
    }
    if psf.get("model") == "lightsheet":
        config["psf"]["sheet_thickness"] = 2.0
    checked = validate_config(config)
    r = checked["restore"]
    resolved = (r["modality"], r["data_weight"], r["hessian_domain"], r["keep_best_by"], r["feature_weights"])
    assert resolved == expected
    assert validate_config(checked) == checked
    fitted = restore_config(checked)
    assert (
        fitted.data_weight,
        fitted.hessian_domain,
        fitted.keep_best_by,
        fitted.feature_weights,
    ) == expected[1:]


def test_the_report_warns_when_the_images_do_not_look_like_their_modality(tmp_path):
    """Beads on a dark background restored as brightfield, and a bright field restored as
    fluorescence, each get a 'Check' note naming the image and the modality to set; the
    matching modality and plain RL get none."""
    from cider.workflow import run_background, run_prepare
    from cider.workflow.report import intensity_records, modality_notes

    rng = np.random.default_rng(0)
    dark = np.full((64, 64), 5.0)
    dark[rng.integers(0, 64, 12), rng.integers(0, 64, 12)] = 400.0
    bright = 200.0 - 150.0 * blobs((64, 64), 12, seed=1)
    notes = {}
    for name, image in (("dark", dark), ("bright", bright)):
        tifffile.imwrite(tmp_path / f"{name}.tif", rng.poisson(image).astype(np.uint16))
        for modality in ("brightfield", "fluorescence"):
            for method in ("cider", "rl"):
                config = validate_config(
                    {
                        "name": "m",
                        "input": {
                            "path": str(tmp_path / f"{name}.tif"),
                            "axes": "YX",
                            "voxel_size": [0.2, 0.2],
                        },
                        "psf": {"gaussian_sigma": 1.0},
                        "output_dir": str(tmp_path / f"{name}_{modality}_{method}"),
                        "restore": {"modality": modality, "method": method},
                    }
                )
                run_prepare(config)
                run_background(config, "g0")
                notes[name, modality, method] = modality_notes(config, intensity_records(config))
    assert {key for key, found in notes.items() if found} == {
        ("dark", "brightfield", "cider"),
        ("bright", "fluorescence", "cider"),
    }
    (dark_note,) = notes["dark", "brightfield", "cider"]
    assert "1 of 1 image(s) look like fluorescence" in dark_note and "u000" in dark_note
    assert "set restore.modality: fluorescence" in dark_note
    (bright_note,) = notes["bright", "fluorescence", "cider"]
    assert "look like bright field" in bright_note and "set restore.modality: brightfield" in bright_note


def test_the_report_warns_when_a_data_term_fit_ends_far_above_the_noise_level(tmp_path):
    """A fit with a data term whose tiles end at a median χ² of 25 (flowdec bars' regime: a
    PSF that does not match the data) gets a 'Check' note naming χ² and data_weight; χ²
    near 1, no data term, or plain RL get none."""
    from cider.workflow.report import data_term_notes

    def config(**restore):
        return validate_config(
            {
                "name": "c",
                "input": {"path": str(tmp_path / "in.tif"), "axes": "YX", "voxel_size": [0.1, 0.1]},
                "psf": {"model": "widefield"},
                "output_dir": str(tmp_path),
                "restore": restore,
            }
        )

    fluorescence = config()  # auto: a widefield PSF model means fluorescence, data_weight 100
    assert fluorescence["restore"]["data_weight"] == 100.0
    (note,) = data_term_notes(fluorescence, 25.0)
    assert "median χ² of 25" in note and "restore.data_weight 100" in note
    assert "try restore.data_weight: 0" in note
    assert data_term_notes(fluorescence, 0.9) == [] and data_term_notes(fluorescence, None) == []
    assert data_term_notes(config(data_weight=0.0), 25.0) == []
    assert data_term_notes(config(method="rl"), 25.0) == []


def test_the_report_names_images_that_reach_their_cameras_full_scale(tmp_path):
    """uint16 beads clipped at 4095 (a 12-bit camera) in one of two images: a Check note
    names it with its count; the unclipped image and float data (no full scale) are not."""
    from scipy.ndimage import gaussian_filter

    from cider.workflow import run_background, run_prepare
    from cider.workflow.report import intensity_records, saturation_notes

    rng = np.random.default_rng(1)
    beads = np.zeros((48, 48))
    beads[rng.integers(4, 44, 6), rng.integers(4, 44, 6)] = 200_000.0
    blurred = rng.poisson(gaussian_filter(beads, 2.0) + 100)
    (tmp_path / "cam").mkdir()
    tifffile.imwrite(tmp_path / "cam" / "a.tif", np.minimum(blurred, 4095).astype(np.uint16))  # clipped
    tifffile.imwrite(tmp_path / "cam" / "b.tif", (blurred // 4).astype(np.uint16))  # max below any full scale
    notes = {}
    for name, path in (("cam", tmp_path / "cam"), ("float", tmp_path / "cam" / "f.tif")):
        if name == "float":
            tifffile.imwrite(path, np.minimum(blurred, 4095).astype(np.float32))
        config = validate_config(
            {
                "name": name,
                "input": {"path": str(path), "axes": "YX", "voxel_size": [0.2, 0.2]},
                "psf": {"gaussian_sigma": 1.0},
                "output_dir": str(tmp_path / f"out_{name}"),
                "restore": {"method": "rl"},
            }
        )
        run_prepare(config)
        run_background(config, "g0")
        notes[name] = saturation_notes(config, intensity_records(config))
    clipped = int((blurred >= 4095).sum())
    assert clipped >= 2
    (note,) = notes["cam"]
    assert note.startswith(
        f"1 of 2 image(s) reach the full scale of their camera (u000 {clipped} px at 4095)"
    )
    assert "the fit took them as lower bounds (input.saturation auto)" in note
    assert notes["float"] == []
    # each tile's fit gets those pixels as censored ones (input.saturation auto), or none
    from cider.workflow.steps import _prepared_tile

    cam = validate_config(
        {**config, "name": "cam", "input": config["input"] | {"path": str(tmp_path / "cam")}}
    )
    cam["output_dir"] = str(tmp_path / "out_cam")
    for tile in make_plan(cam).tiles_of("u000"):
        prepared = _prepared_tile(cam, tile)[0]
        window = np.minimum(blurred, 4095)[tile.slices()] >= 4095
        marked = prepared.saturated.numpy() if prepared.saturated is not None else np.zeros_like(window)
        np.testing.assert_array_equal(marked, window)
        off = cam | {"input": cam["input"] | {"saturation": None}}
        assert _prepared_tile(off, tile)[0].saturated is None


@pytest.mark.parametrize("background", [False, True])
def test_a_camera_offset_restores_as_the_data_without_it(tmp_path, background):
    """uint16 beads on a camera offset of 100 with input.offset 100 give the background
    job's records (scale, mean, noise model, feature range) and every tile's prepared
    observation of the same beads without the offset, bit for bit, with the wavelet
    background off and on."""
    from scipy.ndimage import gaussian_filter

    from cider.workflow import run_background, run_prepare
    from cider.workflow.report import intensity_records
    from cider.workflow.steps import _prepared_tile

    rng = np.random.default_rng(2)
    beads = np.zeros((48, 40))
    beads[rng.integers(4, 44, 6), rng.integers(4, 36, 6)] = 20_000.0
    counts = rng.poisson(gaussian_filter(beads, 2.0) + 3)
    runs = {}
    for name, data, offset in (("plain", counts, 0), ("offset", counts + 100, 100)):
        tifffile.imwrite(tmp_path / f"{name}.tif", data.astype(np.uint16))
        source = {"path": str(tmp_path / f"{name}.tif"), "axes": "YX", "voxel_size": [0.2, 0.2]}
        config = validate_config(
            {
                "name": name,
                "input": source | {"offset": offset},
                "psf": {"gaussian_sigma": 1.5},
                "output_dir": str(tmp_path / f"out_{name}"),
                "tiling": {"tile_size": [32, 32]},
                "background": {"enabled": background},
            }
        )
        run_prepare(config)
        run_background(config, "g0")
        tiles = [_prepared_tile(config, tile)[0] for tile in make_plan(config).tiles_of("u000")]
        runs[name] = intensity_records(config)["u000"], tiles
    (plain, plain_tiles), (shifted, shifted_tiles) = runs["plain"], runs["offset"]
    assert shifted == plain
    assert len(plain_tiles) == len(shifted_tiles) > 1
    for a, b in zip(plain_tiles, shifted_tiles):
        assert torch.equal(a.observation, b.observation) and a.scale == b.scale


def test_a_flat_background_is_one_level_per_image_that_every_tile_subtracts(tmp_path):
    """background.method flat on a 3D stack of faint beads on 100 counts: the background
    job writes no background array, records one level (the whole volume's, as
    :func:`cider.background.flat_background` measures it, within 0.5 of 100) and every
    tile's prepared observation is the data less that level, over the unit's scale; the
    stitched output's provenance would carry it (:func:`background_levels`), and the
    report warns when a level rests on under 5 % of an image's pixels."""
    from scipy.ndimage import gaussian_filter

    from cider.background import flat_background
    from cider.workflow import make_psf, paths, run_background, run_prepare
    from cider.workflow.report import background_notes, intensity_records
    from cider.workflow.steps import _prepared_tile
    from cider.workflow.stitch import background_levels

    rng = np.random.default_rng(5)
    beads = np.zeros((12, 48, 40))
    for _ in range(20):
        beads[rng.integers(0, 12), rng.integers(6, 42), rng.integers(6, 34)] = 900.0
    counts = rng.poisson(gaussian_filter(beads, (0.6, 2.0, 2.0)) + 100).astype(np.uint16)
    tifffile.imwrite(tmp_path / "beads.tif", counts, photometric="minisblack")
    config = validate_config(
        {
            "name": "flat",
            "input": {"path": str(tmp_path / "beads.tif"), "axes": "ZYX", "voxel_size": [0.6, 0.2, 0.2]},
            "psf": {"gaussian_sigma": [0.6, 2.0, 2.0]},
            "output_dir": str(tmp_path / "out"),
            "tiling": {"tile_size": [12, 32, 32]},
            "background": {"enabled": True, "method": "flat"},
        }
    )
    run_prepare(config)
    run_background(config, "g0")
    assert not paths(config).background("g0").exists()
    record = intensity_records(config)["u000"]
    level = record["background_level"]["value"]
    assert level == flat_background(counts, make_psf(config, 3, 0)) and abs(level - 100) < 0.5
    assert 0.2 < record["background_level"]["fraction"] < 1
    tiles = make_plan(config).tiles_of("u000")
    assert len(tiles) > 1
    for tile in tiles:
        prepared = _prepared_tile(config, tile)[0]
        expected = (counts[tile.slices()].astype(np.float64) - level) / record["scale"]
        assert torch.equal(prepared.observation, torch.as_tensor(expected, dtype=torch.float32))
        assert prepared.background_level == level
    assert background_levels(config, make_plan(config).units_of("beads")) == {
        "u000": record["background_level"]
    }
    # the report says when a level rests on few pixels (objects nearly everywhere)
    assert background_notes({"u000": record}) == []
    crowded = {"u000": record | {"background_level": {"value": 101.5, "fraction": 0.012}}}
    (note,) = background_notes(crowded)
    assert "1 of 1 image(s) have their flat background level measured on under 5 % of their pixels" in note
    assert "u000 1.2 % (level 101.5)" in note and "input.offset" in note


def test_an_input_whose_metadata_state_another_voxel_size_is_refused(tmp_path, capsys):
    """An OME-TIFF stating z 0.5 µm against input.voxel_size z 1.0: prepare stops naming the
    file, both sizes and the two ways out; matching metadata or check_voxel_size false run.
    A PSF file stating another sampling is used on the image grid, and that is said."""
    from cider.workflow import make_psf, run_prepare

    volume = (np.random.default_rng(0).poisson(50, (12, 32, 32)) + 100).astype(np.uint16)
    metadata = {"axes": "ZYX", "PhysicalSizeZ": 0.5, "PhysicalSizeY": 0.2, "PhysicalSizeX": 0.2}
    tifffile.imwrite(tmp_path / "v.ome.tif", volume, ome=True, metadata=metadata)
    config = {
        "name": "vox",
        "input": {"path": str(tmp_path / "v.ome.tif"), "axes": "ZYX", "voxel_size": [1.0, 0.2, 0.2]},
        "psf": {"gaussian_sigma": [0.6, 1.0, 1.0]},
        "output_dir": str(tmp_path / "out"),
        "tiling": {"tile_size": [12, 32, 32]},
    }
    with pytest.raises(CiderError) as refused:
        run_prepare(validate_config(config))
    message = str(refused.value)
    assert "v.ome.tif: its metadata state a voxel size of z 0.5, y 0.2, x 0.2 µm" in message
    assert "'input.voxel_size' is [1.0, 0.2, 0.2]" in message and "input.check_voxel_size: false" in message
    run_prepare(validate_config(config | {"input": config["input"] | {"check_voxel_size": False}}))
    run_prepare(validate_config(config | {"input": config["input"] | {"voxel_size": [0.5, 0.2, 0.2]}}))

    bead = gaussian_psf([1.0, 1.0, 1.0], size=[7, 7, 7]).astype(np.float32)
    tifffile.imwrite(
        tmp_path / "psf.tif", bead, imagej=True, resolution=(10, 10), metadata={"spacing": 0.1, "unit": "um"}
    )
    capsys.readouterr()
    make_psf(validate_config(config | {"psf": {"file": str(tmp_path / "psf.tif")}}), 3)
    note = capsys.readouterr().err
    assert (
        "psf.tif): the file states a voxel size of z 0.1, y 0.1, x 0.1 µm, the images' is [1.0, 0.2, 0.2]"
        in note
    )
    assert "set psf.voxel_size to it" in note


def test_each_channel_is_restored_with_its_own_psf(tmp_path):
    """psf.channels: a 2-channel file (σ 1 and σ 2 px) through prepare, background, fit
    (plain RL, fast) and stitch. No pass mixes channels, and each channel's result is the
    whole-image RL with its own PSF (not the other's). Misfitting channel lists are
    refused naming the key and the file."""
    from cider.workflow import run_background, run_fit, run_prepare, run_stitch

    rng = np.random.default_rng(3)
    truth = 20 + 400 * blobs((72, 72), 40, seed=4)
    sigmas = (1.0, 2.0)
    from scipy.ndimage import gaussian_filter

    from cider import io

    stack = np.stack([rng.poisson(gaussian_filter(truth, s, mode="reflect")) for s in sigmas]).astype(
        np.uint16
    )
    tifffile.imwrite(tmp_path / "two.tif", stack)
    config = validate_config(
        {
            "name": "channels",
            "input": {"path": str(tmp_path / "two.tif"), "axes": "CYX", "voxel_size": [0.2, 0.2]},
            "psf": {"gaussian_sigma": 1.0, "channels": [{}, {"gaussian_sigma": 2.0}]},
            "output_dir": str(tmp_path / "out"),
            "tiling": {"tile_size": 36},
            "restore": {"method": "rl", "rl_iterations": 15},
            "fit": {"batch_size": 8},
            "jobs": {"images_per_job": 64},
        }
    )
    plan = make_plan(config)
    for batch in plan.batches:
        for one_pass in batch.passes:
            assert len({plan.tile(t).unit_id for t in one_pass}) == 1, one_pass  # one channel per pass
    run_prepare(config)
    run_background(config, "g0")
    for batch in plan.batches:
        run_fit(config, batch.id)
    run_stitch(config, "p0")
    restored = io.read_image(tmp_path / "out" / "two.ome.zarr")
    for channel, sigma in enumerate(sigmas):
        own, other = (
            cider.restore(
                stack[channel], gaussian_psf(s), cider.RestoreConfig(method="rl", rl_iterations=15)
            ).restored
            for s in (sigma, sigmas[1 - channel])
        )
        inner = (slice(8, -8), slice(8, -8))
        near, far = (np.abs(restored[channel] - x)[inner].max() for x in (own, other))
        assert near < 0.02 * own.max() and near < far / 5, (channel, near, far)

    bad = {
        "no C axis": ({"axes": "YX"}, [{}, {}], "config key 'psf.channels': 2 entries, but input.axes 'YX'"),
        "three for two": ({}, [{}, {}, {}], "two.tif: 2 channel(s), but config key 'psf.channels' has 3"),
    }
    for axes, channels, message in bad.values():
        single = tmp_path / "one.tif"
        tifffile.imwrite(single, stack[0])
        changed = config | {
            "input": config["input"] | ({"path": str(single)} | axes if axes else {}),
            "psf": config["psf"] | {"channels": channels},
            "output_dir": str(tmp_path / "bad"),
        }
        with pytest.raises(CiderError, match=re.escape(message)):
            make_plan(validate_config(changed))
    with pytest.raises(CiderError, match=r"key 'psf.channels.1'.*'wavelenght' was unexpected"):
        validate_config(config | {"psf": config["psf"] | {"channels": [{}, {"wavelenght": 0.6}]}})


def test_lint_and_format_are_clean():
    lint = subprocess.run(
        [*SNAKEMAKE, "--lint", "--configfile", "config/config.yaml"], cwd=ROOT, capture_output=True, text=True
    )
    assert "Congratulations" in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    fmt = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert fmt.returncode == 0, fmt.stderr


# -------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_end_to_end_2d(tmp_path):
    config = _dataset(tmp_path, (70, 90), 1.5, 40, iterations=60)
    run = _snakemake(config)
    assert run.returncode == 0, run.stderr[-3000:]
    group, meta = _read_ome_zarr(tmp_path / "out" / "input.ome.zarr")
    assert [a["name"] for a in meta["axes"]] == ["y", "x"]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.2, 0.2]
    assert meta["datasets"][1]["coordinateTransformations"][0]["scale"] == [0.4, 0.4]
    restored = np.asarray(group[meta["datasets"][0]["path"]])
    before = tifffile.imread(tmp_path / "input.tif")
    assert restored.shape == before.shape
    gain = _psnr_gain(restored, before, tmp_path)
    assert gain > 1.0, f"PSNR gain over the input only {gain:.2f} dB"
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "input.tif"), restored)
    # every setting that made the result travels with it, defaults filled in
    made = group.attrs["cider"]
    assert made["settings"]["restore"]["iterations"] == 60 and made["input"] == "input"
    assert made["settings"]["restore"]["generator_input"] == "features"
    assert made["settings"]["restore"]["modality"] == "brightfield"  # auto, Gaussian PSF
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert (
        "modality brightfield (data_weight 0, hessian_domain intensity, keep_best_by loss), 60 iterations"
        in page
    )
    shipped = Path(cider.__file__).parent / "weights" / "features.pt"  # the default extractor, by content
    assert made["feature_weights_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    metrics = (tmp_path / "out" / "work" / "metrics").glob("*.json")  # as the fit jobs recorded it
    assert {json.loads(m.read_text())["feature_weights_sha256"] for m in metrics} == {
        made["feature_weights_sha256"]
    }
    with tifffile.TiffFile(tmp_path / "out" / "input.tif") as tif:
        assert json.loads(tif.pages[0].description)["cider"] == made
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    assert summary["tiles"] == 6 and summary["units"][0]["seam_ratio"] < 1.5
    # Against a whole-image restore of the same data and settings: as good on the truth,
    # and no more different from it along the tile boundaries than inside the tiles.
    config_data = validate_config(yaml.safe_load(config.read_text()))
    settings = {k: v for k, v in config_data["restore"].items() if k not in ("device", "modality")}
    psf = tifffile.imread(tmp_path / "psf.tif")
    whole = cider.restore(before, psf, cider.RestoreConfig(**settings, device="cpu")).restored
    assert gain > _psnr_gain(whole, before, tmp_path) - 0.5, (gain, _psnr_gain(whole, before, tmp_path))
    plan = make_plan(config_data)
    near = np.zeros(before.shape, bool)
    for tile in plan.tiles:
        for axis, (start, _) in enumerate(tile.core):
            if start > 0:
                band = [slice(None)] * 2
                band[axis] = slice(start - plan.blend[axis], start + plan.blend[axis])
                near[tuple(band)] = True
    difference = np.abs(restored.astype(np.float64) - whole)
    assert difference[near].mean() < 1.5 * difference[~near].mean(), (
        difference[near].mean(),
        difference[~near].mean(),
    )
    assert "report:" in run.stdout + run.stderr or (tmp_path / "out" / "report" / "index.html").exists()
    # a lost final output is rebuilt by the same command (rule all asks for every output)
    (tmp_path / "out" / "input.tif").unlink()
    again = _snakemake(config)
    assert again.returncode == 0, again.stderr[-3000:]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "input.tif"), restored)
    assert "fit" not in _job_counts(again.stderr)


@pytest.mark.slow
def test_outputs_name_the_weights_the_fits_used_and_refuse_a_mix(tmp_path):
    """The stitch records the digest from the fit jobs' metrics (a fit node may run another
    install than the stitch node), refuses tiles fitted with different weights, and falls
    back to its own weights' digest for metrics that predate the field."""
    config = validate_config(yaml.safe_load(_dataset(tmp_path, (70, 90), 1.5, 40, batch_size=2).read_text()))
    batches = [b.id for b in make_plan(config).batches]
    assert len(batches) >= 2
    folder = tmp_path / "out" / "work" / "metrics"
    folder.mkdir(parents=True)

    def record(**fields):
        for batch in batches:
            (folder / f"{batch}.json").write_text(json.dumps({"batch": batch, **fields}))

    shipped = hashlib.sha256(
        (Path(cider.__file__).parent / "weights" / "features.pt").read_bytes()
    ).hexdigest()
    record()  # metrics of an older version: the stitch node's own weights
    assert fitted_weights_digest(config, "input") == shipped
    record(feature_weights_sha256="a" * 64)
    assert fitted_weights_digest(config, "input") == "a" * 64
    record(feature_weights_sha256=None)  # image_rl / noise: no extractor
    assert fitted_weights_digest(config, "input") is None
    (folder / f"{batches[-1]}.json").write_text(json.dumps({"feature_weights_sha256": "b" * 64}))
    with pytest.raises(
        CiderError,
        match=rf"input: its tiles were fitted with different feature weights.*batch {batches[-1]}: bbbbbbbbbbbb.*rerun the fit jobs",
    ):
        fitted_weights_digest(config, "input")


def test_a_fit_refuses_a_feature_range_computed_from_other_weights(tmp_path):
    """The background job records what the unit's feature range was computed from (the
    generator input, the weights by content); a fit with other weights or another generator
    input stops with a message naming the record, instead of mapping its features with a
    range that is not theirs. A record that predates the field is used as it is."""
    from cider.workflow import paths, run_background, run_prepare
    from cider.workflow.config import restore_config
    from cider.workflow.steps import _feature_source, _feature_value_range

    config = validate_config(yaml.safe_load(_dataset(tmp_path, (40, 48), 1.5, 32).read_text()))
    run_prepare(config)
    run_background(config, "g0")
    record = json.loads(paths(config).intensity("g0").read_text())["units"]["u000"]
    shipped = hashlib.sha256(
        (Path(cider.__file__).parent / "weights" / "features.pt").read_bytes()
    ).hexdigest()
    assert record["feature_source"] == {"generator_input": "features", "feature_weights_sha256": shipped}
    own = _feature_value_range(config, "u000", record, _feature_source(restore_config(config)))
    assert own == (record["feature_low"], record["feature_high"]) and len(own[0]) == 16
    for key, value in (("feature_weights", "features_rl10.pt"), ("generator_input", "image_rl")):
        other = {**config, "restore": {**config["restore"], key: value}}
        with pytest.raises(
            CiderError,
            match=r"unit u000: its feature range in .*background.g0\.json was computed from generator_input features \(weights sha256 [0-9a-f]{12}….*delete",
        ):
            _feature_value_range(other, "u000", record, _feature_source(restore_config(other)))
    older = {k: v for k, v in record.items() if k != "feature_source"}
    assert _feature_value_range(config, "u000", older, _feature_source(restore_config(config))) == own
    no_range = {k: v for k, v in record.items() if not k.startswith("feature_")}  # as for method rl
    with pytest.raises(CiderError, match=r"unit u000: .*background.g0\.json has no feature range.*delete"):
        _feature_value_range(config, "u000", no_range, _feature_source(restore_config(config)))


@pytest.mark.slow
def test_the_rl_baseline_runs_through_the_same_pipeline(tmp_path):
    """``restore.method: rl``: plain RL of every tile through the same plan, background
    job, stitching and outputs, judged against the truth; no feature range is computed,
    the tiles' records and the output's provenance say which method made them, and RL's
    falling χ² is not flagged as an unconverged fit."""
    config = _dataset(tmp_path, (60, 60), 1.5, 32, method="rl", rl_iterations=30)
    run = _snakemake(config)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    record = json.loads((out / "work" / "background" / "g0.json").read_text())["units"]["u000"]
    assert not any(key.startswith("feature_") for key in record)
    tiles = [
        t
        for m in sorted((out / "work" / "metrics").glob("*.json"))
        for t in json.loads(m.read_text())["tiles"]
    ]
    assert len(tiles) == 4 and {t["method"] for t in tiles} == {"rl"}
    assert all(t["iterations"] == 30 and t["loss_history"][-1] < t["loss_history"][0] for t in tiles)
    group, _ = _read_ome_zarr(out / "input.ome.zarr")
    assert group.attrs["cider"]["settings"]["restore"]["method"] == "rl"
    gain = _psnr_gain(np.asarray(group["0"]), tifffile.imread(tmp_path / "input.tif"), tmp_path)
    assert gain > 1.0, f"RL's PSNR gain over the input only {gain:.2f} dB"
    page = (out / "report" / "index.html").read_text()
    assert "plain Richardson–Lucy" in page and "still improving</td>" not in page


def test_end_to_end_3d(tmp_path):
    # 150 iterations: at 100 the gain depends on the generator's initial weights
    # (0.3 dB with seed 0, 1.3-2.2 dB with seeds 1-3); at 150 seed 0 gives 0.7 dB.
    config = _dataset(tmp_path, (12, 36, 36), (0.8, 1.2, 1.2), [12, 24, 24], iterations=150)
    run = _snakemake(config)
    assert run.returncode == 0, run.stderr[-3000:]
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(tmp_path / "out" / "input.ome.zarr")))())
    image = nodes[0]
    assert [a["name"] for a in image.metadata["axes"]] == ["z", "y", "x"]
    assert image.metadata["coordinateTransformations"][0][0]["scale"] == [0.5, 0.2, 0.2]
    restored = np.asarray(image.data[0])
    before = tifffile.imread(tmp_path / "input.tif")
    assert restored.shape == (12, 36, 36)
    gain = _psnr_gain(restored, before, tmp_path)
    assert gain > 0.5, f"PSNR gain over the input only {gain:.2f} dB"


SMALL_RUN = {
    "shape": (60, 60),
    "sigma": 1.2,
    "tile": 32,
    "iterations": 8,
    "batch_size": 2,
}  # 4 tiles, 2 batches


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """An uninterrupted run of SMALL_RUN: the bits that interrupted runs must reproduce."""
    folder = tmp_path_factory.mktemp("clean")
    run = _snakemake(_dataset(folder, **SMALL_RUN))
    assert run.returncode == 0, run.stderr[-3000:]
    return folder / "out" / "input.tif"


@pytest.mark.slow
def test_failed_tile_is_reported_and_its_batch_rerun_alone(tmp_path, clean_run):
    """4 tiles in batches of 2: a failing tile fails its batch only; the rerun fits that batch."""
    fail_dir = tmp_path / "fail"
    fail_dir.mkdir()
    failing = _dataset(fail_dir, **SMALL_RUN)

    first = _snakemake(failing, "--keep-going", "--retries", "0", env={FAIL_ENV: "u000-t00002"})
    assert first.returncode != 0
    log = (fail_dir / "out/work/logs/fit/b1.log").read_text()
    assert "u000-t00002" in first.stderr + log and "failure injected" in log
    tiles = fail_dir / "out" / "work" / "tiles"
    assert sorted(p.name for p in tiles.glob("*.npz")) == ["b0.npz"]
    assert sorted(np.load(tiles / "b0.npz").files) == ["u000-t00000", "u000-t00001"]
    mtime = (tiles / "b0.npz").stat().st_mtime_ns

    second = _snakemake(failing, "--rerun-incomplete")
    assert second.returncode == 0, second.stderr[-3000:]
    assert _job_counts(second.stderr).get("fit") == 1, second.stderr  # exactly one fit job
    assert (tiles / "b0.npz").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(tifffile.imread(clean_run), tifffile.imread(fail_dir / "out" / "input.tif"))


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_bits(tmp_path, clean_run):
    """Snakemake and its jobs killed (-9) while tiles are being fitted; --unlock, then the
    same command with --rerun-incomplete finishes and gives the clean run's bits."""
    import signal
    import time

    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    killed = _dataset(killed_dir, **SMALL_RUN)
    command = [
        *SNAKEMAKE,
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(killed_dir),
        "--configfile",
        str(killed),
        "--cores",
        "2",
    ]
    tiles = killed_dir / "out" / "work" / "tiles"
    log = killed_dir / "snakemake.log"
    with log.open("w") as sink:
        run = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while "(Rule: fit)" not in log.read_text() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until Snakemake has registered the first fit job as finished
    assert run.poll() is None, "the run ended before it could be killed mid-fit"
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    done = len(list(tiles.glob("*.npz")))
    assert done == 1, done  # killed mid-fit: one of the 2 batches done, the other not

    locked = _snakemake(killed, "--rerun-incomplete")
    assert locked.returncode != 0 and "cannot be locked" in locked.stderr + locked.stdout
    assert _snakemake(killed, "--unlock").returncode == 0
    resumed = _snakemake(killed, "--rerun-incomplete")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _job_counts(resumed.stderr).get("fit") == 1, resumed.stderr  # the finished batch is kept
    np.testing.assert_array_equal(
        tifffile.imread(clean_run), tifffile.imread(killed_dir / "out" / "input.tif")
    )


def _job_counts(log: str) -> dict[str, int]:
    """Snakemake's "Job stats" table (rule → number of jobs) from its log."""
    counts = {}
    for line in log.splitlines():
        words = line.split()
        if len(words) == 2 and words[1].isdigit() and words[0].isidentifier() and words[0] != "total":
            counts[words[0]] = int(words[1])
    return counts


@pytest.mark.slow
def test_a_config_change_reruns_exactly_the_affected_rules(tmp_path):
    config = _dataset(tmp_path, (40, 40), 1.0, 40, iterations=3)
    assert _snakemake(config).returncode == 0
    settings = yaml.safe_load(config.read_text())
    settings["restore"]["iterations"] = 4
    config.write_text(yaml.safe_dump(settings))
    second = _snakemake(config)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _job_counts(second.stderr) == {"all": 1, "fit": 1, "report": 1, "stitch": 1}, second.stderr
    assert "Params have changed since last execution" in second.stderr
    assert "Nothing to be done" in _snakemake(config).stderr
    settings["input"]["check_voxel_size"] = False  # a check: no output depends on it
    config.write_text(yaml.safe_dump(settings))
    assert "Nothing to be done" in _snakemake(config).stderr
    settings["restore"]["generator_input"] = "image_rl"  # the feature range changes with it
    config.write_text(yaml.safe_dump(settings))
    third = _snakemake(config)
    assert third.returncode == 0, third.stderr[-3000:]
    assert _job_counts(third.stderr) == {"all": 1, "background": 1, "fit": 1, "report": 1, "stitch": 1}


def test_every_script_runs_alone_and_documents_it():
    for script in sorted((ROOT / "scripts").glob("*.py")):
        text = script.read_text()
        assert "Run alone:" in text and len(text.splitlines()) <= 30, script.name
        out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--config" in out.stdout, script.name


def test_ome_zarr_and_zarr_inputs_are_read_and_planned(tmp_path):
    """An OME-Zarr (as we write it) and a plain Zarr array are valid inputs of the plan."""
    import zarr

    from cider import io

    volume = np.random.default_rng(0).random((2, 8, 40, 30)).astype(np.float32)
    io.write_ome_zarr(tmp_path / "in.ome.zarr", volume, "CZYX", [0.5, 0.2, 0.2], levels=2)
    np.testing.assert_array_equal(io.read_image(tmp_path / "in.ome.zarr"), volume)
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(8, 40, 30), chunks=(8, 20, 15), dtype="float32")[
        ...
    ] = volume[0]
    for path, axes, units in ((tmp_path / "in.ome.zarr", "CZYX", 2), (tmp_path / "plain.zarr", "ZYX", 1)):
        config = validate_config(
            {
                "name": "z",
                "input": {"path": str(path), "axes": axes, "voxel_size": [0.5, 0.2, 0.2]},
                "psf": {"gaussian_sigma": [0.5, 1.0, 1.0]},
                "output_dir": str(tmp_path / "o"),
                "tiling": {"tile_size": [8, 20, 20]},
            }
        )
        plan = make_plan(config)
        assert len(plan.units) == units and plan.units[0].shape == (8, 40, 30)
        assert len(plan.tiles) == units * 4


SHIPPED_CONFIGS = sorted((ROOT / "config").glob("**/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=[p.name for p in SHIPPED_CONFIGS])
def test_every_shipped_config_plans(tmp_path, path):
    """Each config we ship dry-runs as written; only its output goes to a temporary folder,
    and an input path that is a placeholder (a lab's acquisition) becomes a synthetic
    volume of the declared axes, so its PSF, tiling and restore settings are checked too.
    """
    import zarr

    config = yaml.safe_load(path.read_text())
    source = config["input"]["path"]
    files = [config.get("psf", {}).get("file")]
    if any(f and f.startswith("../shared") for f in [source, *files]) and not (ROOT / "../shared").exists():
        pytest.skip("needs ../shared beside the checkout")
    if not (ROOT / source).exists():
        sizes = {"T": 2, "C": 2, "Z": 96, "Y": 300, "X": 300}
        shape = tuple(sizes[a] for a in config["input"]["axes"].upper())
        zarr.create_array(str(tmp_path / "input.zarr"), shape=shape, chunks=shape, dtype="uint16")
        config["input"]["path"] = str(tmp_path / "input.zarr")
    config["output_dir"] = str(tmp_path / "out")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [*SNAKEMAKE, "-n", "--configfile", str(tmp_path / "config.yaml"), "--cores", "1"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-1500:]
    counts = _job_counts(run.stdout)
    assert counts.get("fit", 0) >= 1 and counts.get("stitch", 0) >= 1, run.stdout[-1500:]


def test_the_plan_is_written_once_and_read_without_opening_the_inputs(tmp_path, monkeypatch):
    from cider import io
    from cider.workflow import plan as planning

    config = validate_config(yaml.safe_load(_dataset(tmp_path, (60, 60), 1.2, 32).read_text()))
    made = make_plan(config)
    stored = json.loads((tmp_path / "out" / "work" / "plan.json").read_text())
    assert [t["id"] for t in stored["plan"]["tiles"]] == [t.id for t in made.tiles]

    def no_reading(*args, **kwargs):
        raise AssertionError("an input was opened although the stored plan is valid")

    planning._stored_plan.cache_clear(), planning._cached_plan.cache_clear()  # a new process
    monkeypatch.setattr(io, "image_shape", no_reading)
    monkeypatch.setattr(io, "check_complete", no_reading)
    assert make_plan(config) == made
    check = config["input"]["check_voxel_size"]
    flipped = {**config, "input": {**config["input"], "check_voxel_size": not check}}
    planning._stored_plan.cache_clear(), planning._cached_plan.cache_clear()
    assert make_plan(flipped) == made  # a check's flip keeps the stored plan
    monkeypatch.undo()

    image = tifffile.imread(tmp_path / "input.tif")
    tifffile.imwrite(tmp_path / "input.tif", image[:, :50])  # the input changes after planning
    with pytest.raises(
        CiderError, match=r"input.tif: changed after the tile plan was made .*run snakemake again"
    ):
        made.check_input(str(tmp_path / "input.tif"))
    planning._stored_plan.cache_clear(), planning._cached_plan.cache_clear()
    replanned = make_plan(config)  # the next run replans
    assert replanned.units[0].shape == (60, 50)
    replanned.check_input(str(tmp_path / "input.tif"))


def test_a_folder_of_1200_images_plans_with_scaling_ids_and_few_jobs(tmp_path):
    """Unit ids grow past u999 (u1000, u1199), Snakemake's DAG accepts them, and the folder
    is ≈ 3 × 1200 / jobs.images_per_job jobs (64 images per background, fit and stitch job)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for number in range(1200):
        tifffile.imwrite(folder / f"img{number:04d}.tif", rng.random((16, 16), dtype=np.float32))
    config = _minimal() | {"input": {"path": str(folder), "axes": "YX", "voxel_size": [1, 1]}}
    config |= {"output_dir": str(tmp_path / "out"), "psf": {"gaussian_sigma": 0.7}}
    plan = make_plan(validate_config(config))
    assert len(plan.units) == 1200 and plan.units[-1].id == "u1199" and plan.units[1000].id == "u1000"
    assert len(plan.batches) == 19  # 64 images per job, in passes of fit.batch_size (8)
    assert [len(p) for p in plan.batches[0].passes] == [8] * 8 and len(plan.batches[-1].tiles) == 48
    assert len(plan.groups) == len(plan.parts) == 19 and plan.parts[0].members[-1] == "img0063"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = _snakemake(tmp_path / "config.yaml", "-n")
    assert run.returncode == 0, run.stderr[-2000:]
    counts = _job_counts(run.stdout)
    assert (counts["background"], counts["fit"], counts["stitch"]) == (19, 19, 19), counts


def test_with_compile_a_fit_job_holds_few_tile_shapes(tmp_path, capsys):
    """``restore.compile`` compiles the generator anew for each padded tile shape (minutes)
    and a process for at most ``cider.fitting.COMPILE_SHAPES`` of them: a folder of
    differently sized images is planned in fit jobs of at most ``COMPILE_SHAPES_PER_JOB``
    shapes, every image still in one, and the plan says so naming the setting; without
    compile, in fewer jobs and silently."""
    from cider.workflow import plan as plan_module

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for number in range(12):
        tifffile.imwrite(folder / f"img{number:02d}.tif", rng.random((16 + number, 20), dtype=np.float32))
    config = _minimal() | {"input": {"path": str(folder), "axes": "YX", "voxel_size": [1, 1]}}
    config |= {"output_dir": str(tmp_path / "out"), "psf": {"gaussian_sigma": 0.7}}
    config["jobs"] = {"images_per_job": 64}
    plain = make_plan(validate_config(config))
    assert "restore.compile" not in capsys.readouterr().err
    config["restore"] = {**config.get("restore", {}), "compile": True}
    compiled = make_plan(validate_config(config))
    note = capsys.readouterr().err
    assert "12 padded shapes" in note and "3 job(s)" in note and "restore.compile: false" in note
    shapes = {t.id: t.padded_shape for t in compiled.tiles}
    assert len(set(shapes.values())) == 12 and len(plain.batches) == 1
    most = plan_module.COMPILE_SHAPES_PER_JOB
    assert [len({shapes[t] for t in b.tiles}) for b in compiled.batches] == [most] * (12 // most)
    assert sorted(t for b in compiled.batches for t in b.tiles) == sorted(shapes)


@pytest.mark.slow
def test_a_time_and_channel_file_runs_end_to_end_into_one_ome_zarr(tmp_path):
    """TCZYX in (2 time points × 2 channels), one TCZYX OME-Zarr out, each unit in its place."""
    rng = np.random.default_rng(5)
    units = [[blobs((12, 24, 24), 12, seed=10 * t + c) * 500 + 50 for c in range(2)] for t in range(2)]
    data = np.asarray(units, dtype=np.float32) + rng.normal(0, 1, (2, 2, 12, 24, 24)).astype(np.float32)
    tifffile.imwrite(tmp_path / "movie.tif", data)
    config = {
        "name": "tczyx",
        "input": {"path": str(tmp_path / "movie.tif"), "axes": "TCZYX", "voxel_size": [0.5, 0.2, 0.2]},
        "psf": {"gaussian_sigma": [0.6, 1.0, 1.0]},
        "output_dir": str(tmp_path / "out"),
        "tiling": {"tile_size": [12, 24, 24]},
        "restore": {"iterations": 3, "rl_iterations": 2},
        "stitch": {"pyramid_levels": 2, "tiff": True},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = _snakemake(tmp_path / "config.yaml")
    assert run.returncode == 0, run.stderr[-3000:]
    group, meta = _read_ome_zarr(tmp_path / "out" / "movie.ome.zarr")
    assert [a["name"] for a in meta["axes"]] == ["t", "c", "z", "y", "x"]
    restored = np.asarray(group["0"])
    assert restored.shape == data.shape and np.all(np.isfinite(restored))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "movie.tif"), restored)
    flat = data.reshape(4, -1)
    for number, unit in enumerate(restored.reshape(4, -1)):  # each unit closest to its own input
        correlations = [np.corrcoef(unit, other)[0, 1] for other in flat]
        assert int(np.argmax(correlations)) == number, correlations
