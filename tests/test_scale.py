"""Bounded memory: rules that must not hold a whole unit (image) in memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import tifffile

from cider import io
from cider.workflow import (
    make_plan,
    paths,
    report,
    run_prepare,
    run_report,
    run_stitch,
    steps,
    validate_config,
)
from cider.workflow.steps import unit_array


def _identity_tiles(config: dict, change: dict | None = None) -> None:
    """Write every batch's 'restored' tiles as the input's padded windows (a fit that
    changes nothing), so stitching must give the input back bit for bit, and their fit
    records (``change``: tile id → value added to that tile, to make a seam)."""
    plan, p = make_plan(config), paths(config)
    losses = list(np.linspace(1.0, 0.5, 50))
    for batch in plan.batches:
        tiles, records = {}, []
        for tile_id in batch.tiles:
            tile = plan.tile(tile_id)
            tiles[tile_id] = np.asarray(unit_array(config, tile.unit_id)[tile.slices()])
            tiles[tile_id] = tiles[tile_id] + (change or {}).get(tile_id, 0)
            records.append(
                {
                    "tile": tile_id,
                    "unit": tile.unit_id,
                    "batch": batch.id,
                    "iterations": 50,
                    "final_loss": 0.5,
                    "chi2": 1.0,
                    "stopped": "iterations",
                    "flux_factor": 1.0,
                    "loss_history": losses if tile_id in (change or {}) else losses[:25] + [0.75] * 25,
                    "seconds": 1.0,
                    "device": "cpu",
                }
            )
        io.atomic_write_npz(p.tiles(batch.id), tiles)
        io.atomic_write_json(p.metrics(batch.id), {"batch": batch.id, "tiles": records})


def _warm_up(tmp_path) -> None:
    """Import and first-use everything the writers need, so that only data is traced."""
    io.write_ome_zarr(tmp_path / "warm.ome.zarr", np.zeros((4, 4, 4), np.float32), "ZYX", [1, 1, 1], levels=2)
    io.write_tiff_pages(tmp_path / "warm.tif", np.zeros((2, 4, 4), np.float32))


def _image_config(folder, axes: str, tile_size: int, levels: int) -> dict:
    """Config of ``folder/in.tif`` (2D planes of 0.2 µm pixels, Gaussian PSF), no TIFF output."""
    return validate_config(
        {
            "name": "scale",
            "input": {"path": str(folder / "in.tif"), "axes": axes, "voxel_size": [0.2, 0.2]},
            "psf": {"gaussian_sigma": 1.0},
            "output_dir": str(folder / "out"),
            "tiling": {"tile_size": tile_size},
            "stitch": {"pyramid_levels": levels, "tiff": False},
        }
    )


def _traced_peak(function, *args) -> int:
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_stitch_and_report_hold_blocks_not_the_unit(tmp_path, monkeypatch):
    """2 channels of 3072 × 2048 (24 MiB each as float32): the traced peaks of stitch and
    report stay under a quarter of one channel, and the OME-Zarr equals the input bit for bit."""
    rng = np.random.default_rng(0)
    image = rng.random((2, 3072, 2048), dtype=np.float32) * 1000
    tifffile.imwrite(tmp_path / "in.tif", image)
    config = _image_config(tmp_path, "CYX", tile_size=256, levels=4)
    run_prepare(config)
    _identity_tiles(config)
    unit_bytes = image[0].nbytes
    _warm_up(tmp_path)
    peak = _traced_peak(run_stitch, config, "p0")  # part p0: the one input file
    assert peak < unit_bytes / 4, (
        f"stitch peak {peak / 2**20:.2f} MiB for a {unit_bytes / 2**20:.1f} MiB unit"
    )
    np.testing.assert_array_equal(io.read_image(tmp_path / "out" / "in.ome.zarr"), image)

    # the report reads a low pyramid level and slabs across tile boundaries, not the unit:
    # its memory is the previews' (PREVIEW_SIDE, here 256 → 384 × 256 from level 3)
    monkeypatch.setattr(report, "PREVIEW_SIDE", 256)
    peak = _traced_peak(run_report, config)
    assert peak < unit_bytes / 4, f"report peak {peak / 2**20:.2f} MiB"
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    assert summary["flagged"] == {} and max(u["seam_worst"] for u in summary["units"]) < 1.2
    after = io.read_image(tmp_path / "out" / "report" / "u001_after.png")
    assert after.shape == (384, 256)  # level 3 of 3072 × 2048: the coarsest with 256 px


def test_report_flags_a_seam_and_a_fit_still_improving(tmp_path):
    """A tile whose result is offset from its neighbours' makes a step over the blending
    ramp: the report flags it as a seam; its loss curve still falling: 'still improving'."""
    y, x = np.mgrid[:160, :200]
    image = (500 + 100 * np.sin(x / 7) * np.cos(y / 9)).astype(np.float32)
    tifffile.imwrite(tmp_path / "in.tif", image)
    config = _image_config(tmp_path, "YX", tile_size=40, levels=2)
    run_prepare(config)
    plan = make_plan(config)
    offset = next(t.id for t in plan.tiles if t.grid_index == (1, 2))
    _identity_tiles(config, change={offset: 200.0})
    run_stitch(config, "p0")
    summary = run_report(config)
    after = {t.id for t in plan.tiles if t.grid_index in ((2, 2), (1, 3))}  # across its upper boundaries
    assert summary["flagged"] == {offset: ["still improving", "seam"]} | dict.fromkeys(after, ["seam"])
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert offset in page and "tiles.csv" in page
    rows = (tmp_path / "out" / "report" / "tiles.csv").read_text().splitlines()
    assert (
        len(rows) == 1 + len(plan.tiles)
        and "still improving;seam" in rows[1 + plan.tiles.index(plan.tile(offset))]
    )


def test_tiff_export_holds_pages_not_the_volume(tmp_path):
    """A Zarr volume of 64 planes goes to TIFF a page at a time (peak < a quarter of it)."""
    import zarr

    volume = np.random.default_rng(1).random((64, 256, 256), dtype=np.float32)
    stored = zarr.create_array(
        str(tmp_path / "v.zarr"), shape=volume.shape, chunks=(1, 256, 256), dtype="float32"
    )
    stored[...] = volume
    _warm_up(tmp_path)
    peak = _traced_peak(io.write_tiff_pages, tmp_path / "v.tif", stored)
    assert peak < volume.nbytes / 4, f"TIFF export peak {peak / 2**20:.2f} MiB for a 16 MiB volume"
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "v.tif"), volume)


def test_ome_zarr_levels_are_registered_and_read_back_by_ome_zarr(tmp_path):
    """Every level has its scale and the translation of its first voxel's centre."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    volume = np.arange(2 * 3 * 8 * 40 * 30, dtype=np.float32).reshape(2, 3, 8, 40, 30)
    io.write_ome_zarr(
        tmp_path / "v.ome.zarr", volume, "TCZYX", [0.2, 0.1, 0.1], levels=3, chunks=(1, 1, 8, 16, 16)
    )
    node = list(Reader(parse_url(str(tmp_path / "v.ome.zarr")))())[0]
    assert [a["name"] for a in node.metadata["axes"]] == ["t", "c", "z", "y", "x"]
    levels = node.metadata["coordinateTransformations"]
    # Z (0.2 µm) is halved only once X has reached its sampling: at level 2
    assert [t[0]["scale"] for t in levels] == [
        [1.0, 1.0, 0.2, 0.1, 0.1],
        [1.0, 1.0, 0.2, 0.2, 0.2],
        [1.0, 1.0, 0.4, 0.4, 0.4],
    ]
    assert [t[1]["translation"] for t in levels[1:]] == [[0, 0, 0, 0.05, 0.05], [0, 0, 0.1, 0.15, 0.15]]
    data = [np.asarray(level) for level in node.data]
    assert [d.shape for d in data] == [(2, 3, 8, 40, 30), (2, 3, 8, 20, 15), (2, 3, 4, 10, 7)]
    expected = volume.reshape(2, 3, 8, 20, 2, 15, 2).mean(axis=(4, 6))
    np.testing.assert_allclose(data[1], expected, rtol=1e-6)


def _volume_config(
    folder, planes: int, side: int = 128, seed: int = 4, **sections
) -> tuple[dict, np.ndarray]:
    """A seeded uint16 volume of ``planes`` × ``side``² in ``folder/v.tif`` and its config
    (background removal on, 16 × 64² tiles; ``sections`` replace config sections)."""
    rng = np.random.default_rng(seed)
    volume = (rng.poisson(200, (planes, side, side)) + 100).astype(np.uint16)
    folder.mkdir()
    tifffile.imwrite(folder / "v.tif", volume)
    config = {
        "name": "bg",
        "input": {"path": str(folder / "v.tif"), "axes": "ZYX", "voxel_size": [0.5, 0.2, 0.2]},
        "psf": {"gaussian_sigma": [1.0, 1.0, 1.0]},
        "output_dir": str(folder / "out"),
        "tiling": {"tile_size": [16, 64, 64]},
        "background": {"enabled": True},
    }
    return validate_config(config | sections), volume


def test_background_goes_plane_by_plane_and_equals_the_whole_volume_computation(tmp_path, monkeypatch):
    """Prepare and the streamed background rule: 4× the planes → the same traced (numpy)
    peaks within 20 % or 8 planes (run-to-run noise); the whole-volume background bit for
    bit and its noise model from a few planes; uint16 input stays uint16."""
    import json

    import zarr

    from cider.background import BackgroundConfig, wavelet_background
    from cider.noise import estimate_noise
    from cider.workflow import run_background

    monkeypatch.setattr(steps, "NOISE_SAMPLES", 20_000)  # 5 planes (default: 4 M samples, 64 MB)
    _warm_up(tmp_path)
    peaks = {}
    for planes in (16, 64):
        config, volume = _volume_config(tmp_path / str(planes), planes)
        peaks["prepare", planes] = _traced_peak(run_prepare, config)
        assert unit_array(config, "u000").dtype == np.uint16
        run_background(config, "g0") if planes == 16 else None  # first use of the extractor
        peaks["background", planes] = _traced_peak(run_background, config, "g0")
    # Python-level garbage moves these small peaks by ~0.05 MiB from run to run (prepare:
    # 0.16 → 0.21 MiB once in CI); holding the unit would add its 48 extra planes, 1.5 MiB
    # as uint16. Allowed: 20 % or 8 planes, whichever is larger.
    plane_mib = volume[0].nbytes / 2**20
    for rule in ("prepare", "background"):
        small, large = peaks[rule, 16] / 2**20, peaks[rule, 64] / 2**20
        allowed = small + max(0.2 * small, 8 * plane_mib)
        assert large < allowed, f"{rule}: peak {small:.2f} MiB for 16 planes, {large:.2f} MiB for 64"

    p = paths(config)
    expected = wavelet_background(volume.astype(np.float64), BackgroundConfig(**config["background"]))
    stored = zarr.open_array(str(p.background("g0") / "u000"), mode="r")[...]
    np.testing.assert_array_equal(stored, expected.astype(np.float32))
    record = json.loads(p.intensity("g0").read_text())["units"]["u000"]
    noise = estimate_noise(volume - expected)
    assert record["noise"]["gain"] == pytest.approx(noise.gain, rel=0.15)  # 20,000 samples only
    assert record["scale"] == float((volume - expected).max())
    assert record["mean"] == pytest.approx(float((volume - expected).mean()), rel=1e-12)


def test_feature_range_by_windows_equals_the_whole_plane():
    """Windows with a halo covering the extractor's receptive field give the whole
    plane's feature range exactly (2D and 3D), with memory of one window."""
    import torch

    from cider.restore import RestoreConfig, feature_range

    rng = np.random.default_rng(0)
    for shape in [(300, 520), (5, 300, 290)]:
        data = rng.random(shape).astype(np.float32) * 100
        config = RestoreConfig()
        whole = feature_range(torch.as_tensor(data / 100.0, dtype=torch.float32), config)
        windows = steps._feature_range(data, None, 100.0, config, planes=2, window=128)
        np.testing.assert_array_equal(np.array(windows), np.array(whole))


def test_zarr_inputs_are_read_in_place_and_give_the_copy_results(tmp_path, monkeypatch):
    """A chunked Zarr input is not copied by prepare (only checked), and background reads it
    where it lies with the same results as from a TIFF copy; a Zarr stored as one huge
    chunk is copied (rechunked by tile); NaN in a Zarr input is refused by name."""
    import zarr

    from cider.errors import CiderError
    from cider.workflow import run_background

    rng = np.random.default_rng(3)
    volume = (rng.poisson(50, (2, 12, 64, 48)) + 100).astype(np.uint16)
    source = zarr.create_array(
        str(tmp_path / "in.zarr"), shape=volume.shape, chunks=(1, 4, 32, 32), dtype="uint16"
    )
    source[...] = volume
    tifffile.imwrite(tmp_path / "in.tif", volume)
    records = {}
    for name in ("in.zarr", "in.tif"):
        config = validate_config(
            {
                "name": "inplace",
                "input": {"path": str(tmp_path / name), "axes": "CZYX", "voxel_size": [0.5, 0.2, 0.2]},
                "psf": {"gaussian_sigma": [0.6, 1.0, 1.0]},
                "output_dir": str(tmp_path / name.replace(".", "_")),
                "tiling": {"tile_size": [12, 32, 32]},
                "background": {"enabled": True},
            }
        )
        run_prepare(config)
        p = paths(config)
        stored = zarr.open_group(str(p.input_zarr()), mode="r")
        prepared = json.loads(p.prepared().read_text())
        if name == "in.zarr":
            assert list(stored.array_keys()) == [] and prepared["in_place"] == ["u000", "u001"]
            assert isinstance(unit_array(config, "u001"), steps.UnitView)
        else:
            assert sorted(stored.array_keys()) == ["u000", "u001"] and prepared["in_place"] == []
        np.testing.assert_array_equal(np.asarray(unit_array(config, "u001")[...]), volume[1])
        run_background(config, "g0")
        records[name] = json.loads(p.intensity("g0").read_text())
        background = zarr.open_array(str(p.background("g0") / "u001"), mode="r")
        assert background.chunks == (1, 32, 32)  # written plane by plane whatever the input's chunks
        if name == "in.zarr":  # stitch and report read the Zarr where it lies too
            _identity_tiles(config)
            run_stitch(config, "p0")
            np.testing.assert_array_equal(io.read_image(p.image("in")), volume)
            assert run_report(config)["flagged"] == {}
    assert records["in.zarr"] == records["in.tif"]

    monkeypatch.setattr(steps, "IN_PLACE_CHUNK_BYTES", 1024)  # now every chunk is "too large"
    config["input"]["path"] = str(tmp_path / "in.zarr")
    run_prepare(config)
    assert json.loads(paths(config).prepared().read_text())["in_place"] == []
    np.testing.assert_array_equal(np.asarray(unit_array(config, "u000")[...]), volume[0])

    monkeypatch.undo()
    broken = zarr.create_array(
        str(tmp_path / "nan.zarr"), shape=(12, 64, 48), chunks=(4, 32, 32), dtype="float32"
    )
    values = volume[0].astype(np.float32)
    values[5, 10, 10] = np.nan
    broken[...] = values
    config = validate_config(
        {**config, "input": {**config["input"], "path": str(tmp_path / "nan.zarr"), "axes": "ZYX"}}
    )
    with pytest.raises(CiderError, match=r"nan.zarr \(unit u000.*contains NaN/inf values"):
        run_prepare(config)


def test_png_and_npy_inputs_are_copied_by_prepare(tmp_path):
    """Inputs read into memory (PNG) or memory-mapped (NPY) have no chunks: prepare copies
    them (the demo's PNG folder went through this path)."""
    from PIL import Image

    rng = np.random.default_rng(4)
    image = (rng.random((40, 56)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", image.astype(np.float32))
    for pattern in ("*.png", "*.npy"):
        config = _image_config(tmp_path, "YX", tile_size=32, levels=2)
        config["input"]["path"] = str(tmp_path / pattern)
        config["output_dir"] = str(tmp_path / pattern[2:])
        run_prepare(config)
        np.testing.assert_array_equal(np.asarray(unit_array(config, "u000")[...]), image)


def test_the_large_run_bench_reads_every_rules_peak_from_the_benchmark_files(tmp_path):
    """``bench/large_run.py`` takes each rule's largest max RSS over its jobs (Snakemake
    ``benchmark:`` TSVs, rule folders or one file) and marks a rule over the limit."""
    import sys

    from .conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from large_run import markdown, peak_per_rule

    header = "s\th:m:s\tmax_rss\tmax_vms\n"
    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "b0.tsv").write_text(header + "10.5\t0:00:10\t900.0\t1000\n")
    (tmp_path / "fit" / "b1.tsv").write_text(header + "12.0\t0:00:12\t1100.5\t1200\n")
    (tmp_path / "prepare.tsv").write_text(header + "3.0\t0:00:03\t250.0\t300\n")
    rules = peak_per_rule(tmp_path)
    assert rules == {
        "fit": {"jobs": 2, "max_rss_mb": 1100.5, "seconds": 22.5},
        "prepare": {"jobs": 1, "max_rss_mb": 250.0, "seconds": 3.0},
    }
    result = {
        "machine": "m",
        "shape": [4, 8, 8],
        "float32_mb": 4096.0,
        "tile_size": [2, 4, 4],
        "fit": "rl",
        "rss_limit_mb": 1024.0,
        "rules": rules,
        "wall_seconds": 1.0,
        "input_seconds": 0.5,
        "output": {"shape": [4, 8, 8], "finite": True},
    }
    table = markdown(result)
    assert "| prepare | 1 | 250 | yes | 3.0 |" in table
    assert table.index("| prepare") < table.index("| fit | 2 | 1100 | **no** | 22.5 |")


@pytest.mark.slow
def test_the_fit_job_holds_its_tiles_not_the_unit(tmp_path):
    """The CiDeR fit job of one batch reads its tiles' windows (and the unit's records),
    never the unit: 4× the planes with the same tiles → the same traced (numpy) peak
    within 1.5 MiB (run-to-run noise; the unit grows by 6 MiB as uint16), below a quarter
    of the larger unit as float32 (1.7 MiB against 16 MiB when written). Torch's own
    allocations are not traced: they are the tiles' fit, sized by :mod:`cider.memory`."""
    from cider.workflow import run_background, run_fit

    _warm_up(tmp_path)
    peaks, results = {}, {}
    for planes in (16, 64):
        config, volume = _volume_config(
            tmp_path / str(planes),
            planes,
            side=256,
            seed=5,
            psf={"gaussian_sigma": [0.6, 0.8, 0.8]},
            tiling={"tile_size": [12, 32, 32]},
            background={"enabled": False},
            restore={"iterations": 2, "rl_iterations": 2},
            fit={"batch_size": 2},
            jobs={"images_per_job": 2},
        )
        run_prepare(config)
        run_background(config, "g0")
        batch = make_plan(config).batches[0]
        run_fit(config, batch.id)  # first use of the extractor, the generator and this run's files
        peaks[planes] = _traced_peak(run_fit, config, batch.id)
        results[planes] = dict(np.load(paths(config).tiles(batch.id)))
        unit_bytes = volume.size * 4
    small, large = peaks[16] / 2**20, peaks[64] / 2**20
    # Python-level garbage (autograd graphs freed by the cycle collector) moves the peak by
    # up to ~0.4 MiB from run to run (1.4-2.1 MiB measured); reading the 64-plane unit
    # would add at least its 8 MiB as uint16.
    assert large < small + 1.5, f"fit: peak {small:.2f} MiB for 16 planes, {large:.2f} MiB for 64"
    assert peaks[64] < unit_bytes / 4, f"fit: peak {large:.2f} MiB for a {unit_bytes / 2**20:.0f} MiB unit"
    assert results[16].keys() == results[64].keys() and len(results[16]) == 2
