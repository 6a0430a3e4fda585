"""Reading and writing files: PNG colour modes, lossless-or-said PNG output, incomplete
inputs and unwritable outputs refused before any work."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from cider import io


def _rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, as documented for colour PNGs (Pillow rounds it)."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_pngs_are_read_as_grey_luminance_by_one_reader(tmp_path, mode):
    rgb = _rgb()
    if mode == "LA":
        grey = rgb[..., 0]
        Image.fromarray(np.stack([grey, 255 - grey], -1), "LA").save(tmp_path / "x.png")
        expected = grey.astype(np.float64)
    else:
        image = Image.fromarray(rgb, "RGB")
        image = image.convert(mode) if mode == "RGBA" else image
        if mode == "P":
            image = image.quantize(64)
            rgb = np.asarray(image.convert("RGB"))  # the palette colours are the truth
        image.save(tmp_path / "x.png")
        expected = _luminance(rgb)
    grey = io.read_image(tmp_path / "x.png")
    assert grey.shape == (12, 16) and grey.dtype == np.uint8
    assert io.image_shape(tmp_path / "x.png") == (12, 16)  # what planning sees
    assert np.abs(grey - expected).max() <= 1.0  # rounding to 8 bits


def test_grey_16_bit_png_is_kept_exactly(tmp_path):
    data = np.random.default_rng(1).integers(0, 65535, (10, 11), dtype=np.uint16)
    io.write_image(tmp_path / "g.png", data)
    back = io.read_image(tmp_path / "g.png")
    assert back.dtype == np.uint16 and np.array_equal(back, data)


def test_png_values_keep_integer_units_or_say_what_changed():
    values, text, notes = io.png_values(np.array([[0.4, 12.6], [254.6, 3.0]]), np.dtype(np.uint8))
    assert values.dtype == np.uint8 and values.tolist() == [[0, 13], [255, 3]] and not text and not notes
    values, _, notes = io.png_values(np.array([[-3.0, 300.2]]), np.dtype(np.uint8))
    assert values.dtype == np.uint16 and values.tolist() == [[0, 300]]
    assert any("1 negative values clipped" in n for n in notes) and any("16-bit" in n for n in notes)


def test_float_data_to_png_is_scaled_with_the_factor_recorded(tmp_path):
    data = np.linspace(0.25, 1.75, 60).reshape(6, 10)
    values, text, notes = io.png_values(data, np.dtype(np.float32))
    assert values.dtype == np.uint16 and values.max() == 65535
    assert float(text["cider:offset"]) == 0.0  # a pure scale: zero stays zero, ratios kept
    assert "value = stored ×" in notes[0]
    io.write_image(tmp_path / "f.png", values, text=text)
    with Image.open(tmp_path / "f.png") as im:
        scale, offset = float(im.text["cider:scale"]), float(im.text["cider:offset"])
    recovered = io.read_image(tmp_path / "f.png") * scale + offset
    assert np.abs(recovered - data).max() <= scale  # within one 16-bit step
    with pytest.raises(ValueError, match=r"PNG stores 8/16-bit integers, not float64"):
        io.write_image(tmp_path / "g.png", data)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_tiff_is_refused_naming_the_file(tmp_path, compression):
    stack = np.random.default_rng(2).random((8, 40, 50)).astype(np.float32)
    tifffile.imwrite(tmp_path / "whole.tif", stack, compression=compression)
    assert io.check_complete(tmp_path / "whole.tif") == (8, 40, 50) == io.image_shape(tmp_path / "whole.tif")
    data = (tmp_path / "whole.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(ValueError, match=r"cut.tif is incomplete \(truncated or still being copied\)"):
        io.check_complete(tmp_path / "cut.tif")


def test_truncated_png_is_refused(tmp_path):
    io.write_image(tmp_path / "p.png", _rgb()[..., 0])
    assert io.check_complete(tmp_path / "p.png") == io.image_shape(tmp_path / "p.png")  # shape from the check
    np.save(tmp_path / "a.npy", np.zeros((3, 5, 7), np.uint16))
    assert io.check_complete(tmp_path / "a.npy") == (3, 5, 7)
    data = (tmp_path / "p.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:-30])
    with pytest.raises(ValueError, match=r"cut.png is incomplete"):
        io.check_complete(tmp_path / "cut.png")


def test_unwritable_output_locations_are_refused_without_creating_them(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"output_dir.*cannot be created, .*a_file is a file"):
        io.check_writable(tmp_path / "a_file" / "out", "output_dir")
    io.check_writable(tmp_path / "new" / "deeper", "output_dir")
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == ["a_file"]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ValueError, match=r"cannot write in .*locked"):
            io.check_writable(locked / "out", "output_dir")


def test_files_state_their_voxel_size_in_micrometres(tmp_path):
    """OME-TIFF (nm converted), calibrated ImageJ TIFF, OME-Zarr: the voxel size they state;
    a plain TIFF, an uncalibrated ImageJ TIFF and a PNG state nothing."""
    volume = np.zeros((4, 8, 8), np.uint16)
    tifffile.imwrite(
        tmp_path / "ome.ome.tif",
        volume,
        ome=True,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeZ": 500,
            "PhysicalSizeZUnit": "nm",
            "PhysicalSizeY": 0.2,
            "PhysicalSizeX": 0.2,
        },
    )
    tifffile.imwrite(
        tmp_path / "ij.tif",
        volume,
        imagej=True,
        resolution=(1 / 0.25, 1 / 0.25),
        metadata={"spacing": 1.5, "unit": "um"},
    )
    tifffile.imwrite(tmp_path / "ij_pixels.tif", volume, imagej=True)
    tifffile.imwrite(tmp_path / "plain.tif", volume)
    io.write_ome_zarr(tmp_path / "v.ome.zarr", volume.astype(np.float32), "ZYX", [0.4, 0.1, 0.1], levels=2)
    io.write_image(tmp_path / "a.png", volume[0])
    assert io.voxel_size_of(tmp_path / "ome.ome.tif") == pytest.approx({"z": 0.5, "y": 0.2, "x": 0.2})
    assert io.voxel_size_of(tmp_path / "ij.tif") == pytest.approx({"z": 1.5, "y": 0.25, "x": 0.25})
    assert io.voxel_size_of(tmp_path / "v.ome.zarr") == pytest.approx({"z": 0.4, "y": 0.1, "x": 0.1})
    for name in ("ij_pixels.tif", "plain.tif", "a.png"):
        assert io.voxel_size_of(tmp_path / name) == {}, name
