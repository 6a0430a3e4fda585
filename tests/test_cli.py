"""The ``cider`` command line."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

from cider import cli, gaussian_psf, io

from .conftest import blobs


def test_help_explains_usage():
    out = subprocess.run([sys.executable, "-m", "cider.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for text in ("restore", "psf", "train-features", "examples:", "cider restore blurred.tif --psf psf.tif"):
        assert text in out.stdout


def test_train_features_options_default_to_the_train_config_and_reach_it():
    """No option given: exactly ``TrainConfig()`` (the settings that made the shipped
    weights); every option reaches its field."""
    from cider.training import TrainConfig

    parser = cli.build_parser()
    assert (
        cli.train_config(parser.parse_args(["train-features", "--data", "d", "-o", "w.pt"])) == TrainConfig()
    )
    options = (
        "--steps 7 --seed 3 --threads 2 --noise-max 0.02 --kernel-mix 0.5 0.3 0.2 --poisson-fraction 0.5"
    )
    options += " --photons 50 500 --deconvolution rl --rl-iterations 10"
    args = parser.parse_args(["train-features", "--data", "d", "-o", "w.pt", *options.split()])
    assert cli.train_config(args) == TrainConfig(
        steps=7,
        seed=3,
        threads=2,
        noise_max=0.02,
        kernel_mix=(0.5, 0.3, 0.2),
        poisson_fraction=0.5,
        photons=(50.0, 500.0),
        deconvolution="rl",
        rl_iterations=10,
    )


def test_restore_tiff_round_trip(tmp_path, capsys):
    from scipy.ndimage import convolve

    psf = gaussian_psf(1.2)
    image = convolve(blobs((48, 48), 15), psf)
    tifffile.imwrite(tmp_path / "in.tif", image.astype(np.float32))
    tifffile.imwrite(tmp_path / "psf.tif", psf.astype(np.float32))
    code = cli.main(
        [
            "restore",
            str(tmp_path / "in.tif"),
            "--psf",
            str(tmp_path / "psf.tif"),
            "-o",
            str(tmp_path / "out.tif"),
            "--iterations",
            "10",
            "--quiet",
        ]
    )
    assert code == 0
    out = tifffile.imread(tmp_path / "out.tif")
    assert out.shape == (48, 48) and out.dtype == np.float32
    assert '"iterations": 10' in capsys.readouterr().out


def test_fluorescence_flag_sets_the_fluorescence_settings_and_says_so(tmp_path, capsys):
    image = blobs((40, 40), 6)
    tifffile.imwrite(tmp_path / "in.tif", image.astype(np.float32))
    args = ["restore", str(tmp_path / "in.tif"), "--gaussian-sigma", "1.2", "-o", str(tmp_path / "out.tif")]
    assert cli.main([*args, "--iterations", "3", "--quiet", "--fluorescence"]) == 0
    said = capsys.readouterr()
    settings = json.loads(said.out)["settings"]
    # 3 iterations leave the noiseless blobs far from their data: the data term's fit is said to be off
    chi2 = json.loads(said.out)["chi2"]
    assert chi2 > 4 and f"the fit ended at chi2 {chi2:.3g}" in said.err
    assert settings["data_weight"] == 100.0 and settings["hessian_domain"] == "stabilised"
    assert settings["keep_best_by"] == "block" and settings["feature_weights"] == "features_rl10.pt"
    assert settings["background"]["enabled"] is True and settings["background"]["method"] == "flat"
    assert settings["iterations"] == 3
    assert "looks like" not in said.err
    # --weights names another extractor: it wins over the fluorescence settings' one
    assert (
        cli.main([*args, "--iterations", "1", "--quiet", "--fluorescence", "--weights", "features.pt"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["settings"]["feature_weights"] == "features.pt"
    # the same dark-background image without the flag, and a bright field with it: a hint
    assert cli.main([*args, "--iterations", "3", "--quiet"]) == 0
    said = capsys.readouterr()
    assert "the image looks like fluorescence (mean" in said.err
    assert json.loads(said.out)["chi2"] > 4 and "the fit ended at chi2" not in said.err  # no data term
    tifffile.imwrite(tmp_path / "in.tif", (1.2 - image).astype(np.float32))
    assert cli.main([*args, "--iterations", "3", "--quiet", "--fluorescence"]) == 0
    assert "the image looks like bright field (mean" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [[], ["--fluorescence"]])
def test_offset_flag_restores_as_the_data_without_the_offset(tmp_path, capsys, flags):
    """Counts on a camera offset of 100 with --offset 100 restore to the counts' own result,
    bit for bit, with and without background removal (--fluorescence turns it on); the
    offset is recorded in the output and the summary."""
    counts = np.random.default_rng(3).poisson(blobs((40, 40), 6) * 200 + 3).astype(np.float32)
    tifffile.imwrite(tmp_path / "plain.tif", counts)
    tifffile.imwrite(tmp_path / "camera.tif", counts + 100)
    common = ["--gaussian-sigma", "1.2", "--iterations", "2", "--quiet", *flags]
    plain = ["restore", str(tmp_path / "plain.tif"), "-o", str(tmp_path / "a.tif"), *common]
    camera = [
        "restore",
        str(tmp_path / "camera.tif"),
        "-o",
        str(tmp_path / "b.tif"),
        "--offset",
        "100",
        *common,
    ]
    assert cli.main(plain) == 0 and cli.main(camera) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif"))
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["offset"] == 100.0
    with tifffile.TiffFile(tmp_path / "b.tif") as tif:
        assert json.loads(tif.pages[0].description)["cider"]["offset"] == 100.0


def test_background_flat_subtracts_one_level_and_records_it(tmp_path, capsys):
    """--fluorescence (whose background is the flat level) on faint beads over 100 counts:
    its level is the library's (within 0.6 of 100) and the summary and the output's
    provenance carry it; --background alone is the wavelet one, and --fluorescence
    --background wavelet too (no level)."""
    from cider.background import flat_background

    from .test_background import _faint_beads

    counts = _faint_beads(0, shape=(64, 64), count=10).astype(np.float32)
    tifffile.imwrite(tmp_path / "beads.tif", counts)
    args = ["restore", str(tmp_path / "beads.tif"), "--gaussian-sigma", "2", "--iterations", "1", "--quiet"]
    assert cli.main([*args, "--fluorescence", "-o", str(tmp_path / "out.tif")]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["settings"]["background"]["method"] == "flat"
    level = summary["background_level"]
    assert level == pytest.approx(flat_background(counts, gaussian_psf(2.0))) and abs(level - 100) < 0.6
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert json.loads(tif.pages[0].description)["cider"]["background_level"] == level
    for flags in (["--background"], ["--fluorescence", "--background", "wavelet"]):
        assert cli.main([*args, *flags, "-o", str(tmp_path / "wavelet.tif")]) == 0
        summary = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert summary["settings"]["background"]["enabled"] is True and summary["background_level"] is None


def test_voxel_sizes_reach_the_fit_and_the_psf_and_the_output_records_them(tmp_path, capsys):
    """A z step 2.5× xy (--voxel) and a bead PSF sampled at half the image's z step
    (--psf-voxel): the PSF is resampled (said), the fit gets the voxel size (equal to the
    library's restore with it), and the TIFF's ImageDescription holds every setting."""
    from cider import RestoreConfig, restore
    from cider.psf import clean_psf

    volume = blobs((10, 24, 24), 8).astype(np.float32) + 0.05
    bead = gaussian_psf([2.4, 1.0, 1.0], size=[13, 7, 7])  # z sampled at 0.25 µm
    tifffile.imwrite(tmp_path / "in.tif", volume)
    tifffile.imwrite(tmp_path / "psf.tif", bead.astype(np.float32))
    voxel, psf_voxel = ["0.5", "0.2", "0.2"], ["0.25", "0.2", "0.2"]
    args = ["restore", str(tmp_path / "in.tif"), "--psf", str(tmp_path / "psf.tif"), "--iterations", "3"]
    code = cli.main(
        [*args, "--voxel", *voxel, "--psf-voxel", *psf_voxel, "-o", str(tmp_path / "out.tif"), "--quiet"]
    )
    assert code == 0
    assert (
        "resampled from voxel size (0.25, 0.2, 0.2) to the image's (0.5, 0.2, 0.2)" in capsys.readouterr().err
    )
    psf, _ = clean_psf(
        bead.astype(np.float32), psf_voxel_size=[0.25, 0.2, 0.2], image_voxel_size=[0.5, 0.2, 0.2]
    )
    expected = restore(volume, psf, RestoreConfig(iterations=3), voxel_size=[0.5, 0.2, 0.2]).restored
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        np.testing.assert_array_equal(tif.asarray(), expected.astype(np.float32))
        made = json.loads(tif.pages[0].description)["cider"]
    assert made["voxel_size"] == [0.5, 0.2, 0.2] and made["psf_voxel_size"] == [0.25, 0.2, 0.2]
    assert made["settings"]["iterations"] == 3 and made["settings"]["hessian_domain"] == "intensity"
    assert made["psf"] == str(tmp_path / "psf.tif") and any("resampled" in n for n in made["psf_notes"])
    # --generator-strides voxel reaches the fit (z kept at the first level: another result)
    strided = [*args, "--voxel", *voxel, "--generator-strides", "voxel", "--quiet"]
    assert cli.main([*strided, "--psf-voxel", *psf_voxel, "-o", str(tmp_path / "strided.tif")]) == 0
    config = RestoreConfig(iterations=3, generator_strides="voxel")
    expected_strided = restore(volume, psf, config, voxel_size=[0.5, 0.2, 0.2]).restored
    with tifffile.TiffFile(tmp_path / "strided.tif") as tif:
        np.testing.assert_array_equal(tif.asarray(), expected_strided.astype(np.float32))
        assert json.loads(tif.pages[0].description)["cider"]["settings"]["generator_strides"] == "voxel"
    assert not np.allclose(expected_strided, expected)
    # a PNG keeps the same record in its 'cider' text chunk
    image = (blobs((32, 32), 6) * 200 + 10).astype(np.uint8)
    io.write_image(tmp_path / "in.png", image)
    png = ["restore", str(tmp_path / "in.png"), "--gaussian-sigma", "1", "--iterations", "2", "--quiet"]
    assert cli.main([*png, "-o", str(tmp_path / "out.png")]) == 0
    from PIL import Image

    made = json.loads(Image.open(tmp_path / "out.png").text["cider"])["cider"]
    assert made["psf"] == "gaussian sigma 1.0 px" and made["voxel_size"] is None
    # an 8-bit image reaching 255 has its saturated pixels censored, said and recorded
    image[5:8, 5:8] = 255
    io.write_image(tmp_path / "sat.png", image)
    sat = ["restore", str(tmp_path / "sat.png"), "--gaussian-sigma", "1", "--iterations", "2", "--quiet"]
    assert cli.main([*sat, "-o", str(tmp_path / "sat_out.png")]) == 0
    assert "9 pixel(s) at or above 255 (saturated) are taken as lower bounds" in capsys.readouterr().err
    assert json.loads(Image.open(tmp_path / "sat_out.png").text["cider"])["cider"]["saturation"] == 255
    assert cli.main([*sat, "--saturation", "lots", "-o", str(tmp_path / "x.png")]) == 2
    assert "--saturation lots: give auto, none or a level" in capsys.readouterr().err
    # a 3D voxel size for a 2D image is refused before any work
    assert cli.main([*png, "--voxel", *voxel, "-o", str(tmp_path / "again.png")]) == 2
    assert "--voxel has 3 sizes for a 2D image" in capsys.readouterr().err


def test_hessian_norm_flag_reaches_the_fit_and_offers_every_norm(tmp_path, capsys):
    """--hessian-norm frobenius restores as the library does with that norm (another
    result than the default's) and is recorded; the flag offers exactly the norms the
    config accepts."""
    from cider import RestoreConfig, restore
    from cider.restore_config import HESSIAN_NORMS

    image = blobs((32, 32), 6).astype(np.float32) + 0.1
    tifffile.imwrite(tmp_path / "in.tif", image)
    args = ["restore", str(tmp_path / "in.tif"), "--gaussian-sigma", "1.2", "--iterations", "3", "--quiet"]
    assert cli.main([*args, "--hessian-norm", "frobenius", "-o", str(tmp_path / "out.tif")]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["hessian_norm"] == "frobenius"
    psf = gaussian_psf(1.2)
    expected = restore(image, psf, RestoreConfig(iterations=3, hessian_norm="frobenius")).restored
    default = restore(image, psf, RestoreConfig(iterations=3)).restored
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), expected.astype(np.float32))
    assert not np.allclose(expected, default)
    flag = next(a for a in cli.build_parser()._actions if a.dest == "command")
    norm = next(a for a in flag.choices["restore"]._actions if a.dest == "hessian_norm")
    assert tuple(norm.choices) == HESSIAN_NORMS and norm.default == RestoreConfig.hessian_norm


def test_polish_and_ssim_weight_flags_restore_as_the_library_does(tmp_path, capsys):
    """``--ssim-weight 0 --polish N``: the library's result with those settings, the
    polish's steps in the JSON; refused with --rl (which has no generator fit to polish)."""
    from cider import FLUORESCENCE, RestoreConfig, restore

    image = blobs((32, 32), 6).astype(np.float32) * 50 + 2
    tifffile.imwrite(tmp_path / "in.tif", image)
    args = ["restore", str(tmp_path / "in.tif"), "--gaussian-sigma", "1.2", "--quiet"]
    flags = ["--iterations", "3", "--ssim-weight", "0", "--polish", "5"]
    assert cli.main([*args, *flags, "--fluorescence", "-o", str(tmp_path / "out.tif")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["polish_steps"] == 5
    assert summary["settings"]["polish_iterations"] == 5 and summary["settings"]["ssim_weight"] == 0.0
    config = RestoreConfig(iterations=3, ssim_weight=0.0, polish_iterations=5).with_(
        **FLUORESCENCE, background={"enabled": True, "method": "flat"}
    )
    expected = restore(image, gaussian_psf(1.2), config).restored
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), expected.astype(np.float32))
    assert cli.main([*args, "--rl", "5", "--polish", "5", "-o", str(tmp_path / "rl.tif")]) == 2
    assert "--polish continues the generator fit, which --rl replaces" in capsys.readouterr().err


def test_rl_flag_restores_with_plain_rl_and_says_so(tmp_path, capsys):
    from cider import richardson_lucy

    image = blobs((40, 40), 6) + 0.1
    tifffile.imwrite(tmp_path / "in.tif", image.astype(np.float32))
    args = ["restore", str(tmp_path / "in.tif"), "--gaussian-sigma", "1.2", "-o", str(tmp_path / "out.tif")]
    assert cli.main([*args, "--rl", "15", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["method"] == "rl" and report["settings"]["rl_iterations"] == 15
    assert report["iterations"] == 15
    psf = gaussian_psf(1.2)
    r = psf.shape[0] // 2
    plain = richardson_lucy(torch.tensor(image), torch.tensor(psf), 15).numpy()[r:-r, r:-r]
    out = tifffile.imread(tmp_path / "out.tif")
    np.testing.assert_allclose(out.sum(), image.sum(), rtol=0.01)  # flux kept
    assert np.abs(out - plain).max() < 0.02 * plain.max()
    assert cli.main([*args, "--rl", "0"]) == 2 and "--rl must be ≥ 1" in capsys.readouterr().err
    assert cli.main([*args, "--rl", "5", "--iterations", "100"]) == 2
    assert "--iterations sets the generator fit, which --rl replaces" in capsys.readouterr().err


def test_restore_png_with_gaussian_psf(tmp_path):
    image = (blobs((40, 40), 10) * 200).astype(np.uint8)
    io.write_image(tmp_path / "in.png", image)
    code = cli.main(
        [
            "restore",
            str(tmp_path / "in.png"),
            "--gaussian-sigma",
            "1.0",
            "-o",
            str(tmp_path / "out.png"),
            "--iterations",
            "5",
            "--quiet",
        ]
    )
    assert code == 0
    restored = io.read_image(tmp_path / "out.png")
    # integer units kept: 8-bit while the restored values fit in 8 bits, else 16-bit (said)
    assert restored.dtype == (np.uint8 if restored.max() <= 255 else np.uint16)
    assert restored.shape == (40, 40) and restored.max() > 0


@pytest.mark.parametrize(
    "content,suffix,message",
    [
        (b"not an image", ".tif", "cannot read"),
        (None, ".tif", "no such file"),
        (b"x", ".jpg2", "unsupported format"),
    ],
)
def test_unreadable_input_says_what_is_wrong(tmp_path, capsys, content, suffix, message):
    path = tmp_path / f"in{suffix}"
    if content is not None:
        path.write_bytes(content)
    code = cli.main(["restore", str(path), "--gaussian-sigma", "1", "-o", str(tmp_path / "o.tif")])
    assert code == 1
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_psf_command_writes_normalised_psf(tmp_path):
    assert cli.main(["psf", "--gaussian", "2", "1", "1", "-o", str(tmp_path / "p.tif")]) == 0
    psf = tifffile.imread(tmp_path / "p.tif")
    assert psf.shape == (17, 9, 9) and psf.sum() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--iterations", "0"], "--iterations must be ≥ 1"),
        (["-o", "SAME"], "is the input file"),
        (["-o", "out.jpg"], "unsupported output format '.jpg'; use .tif, .png or .npy"),
        (["--gaussian-sigma", "0"], "--gaussian-sigma must be > 0"),
        (["--psf", "PSF"], "give --psf FILE or --gaussian-sigma S, not both"),
        (["--device", "gpu0"], "'gpu0' is not a device name"),
        (["-o", "UNDER_A_FILE"], "cannot be created"),
        (
            ["--psf-voxel", "0.1"],
            "--psf-voxel is the sampling of a --psf file: give --psf and the image's --voxel",
        ),
        (["--voxel", "0.1"], "--voxel 0.1: give 2 or 3 positive sizes"),
        (["--generator-strides", "voxel"], "--generator-strides voxel follows the voxel size: give"),
    ],
)
def test_restore_refuses_bad_requests_before_any_work(tmp_path, capsys, extra, message):
    image = tmp_path / "in.tif"
    tifffile.imwrite(image, blobs((32, 32), 5).astype(np.float32))
    tifffile.imwrite(tmp_path / "psf.tif", np.ones((3, 3), np.float32))
    before = image.read_bytes()
    options = {"--gaussian-sigma": "1", "-o": str(tmp_path / "out.tif")}
    value = {
        "SAME": str(image),
        "PSF": str(tmp_path / "psf.tif"),
        "out.jpg": str(tmp_path / "out.jpg"),
        "UNDER_A_FILE": str(tmp_path / "psf.tif" / "out.tif"),
    }
    options[extra[0]] = value.get(extra[1], extra[1])
    args = ["restore", str(image), *[x for pair in options.items() for x in pair], "--quiet"]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert image.read_bytes() == before and not list(tmp_path.glob("out.*"))


def test_metrics_json_is_strict(tmp_path):
    with pytest.raises(ValueError, match=r"m.json: refusing to write non-finite"):
        io.atomic_write_json(tmp_path / "m.json", {"loss": float("nan")})
    assert not (tmp_path / "m.json").exists()
