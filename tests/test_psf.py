"""PSF generation and validation."""

import numpy as np
import pytest
import torch

from cider import PsfError, gaussian_psf, lightsheet_psf, validate_psf, widefield_psf
from cider.psf import normalize_psf


def test_gaussian_psf():
    psf = gaussian_psf(1.5)
    assert psf.shape == (13, 13) and psf.sum() == pytest.approx(1.0)
    assert np.unravel_index(psf.argmax(), psf.shape) == (6, 6)
    aniso = gaussian_psf((2.0, 1.0, 1.0))
    assert aniso.shape == (17, 9, 9)
    # measured standard deviation along Z matches the requested sigma
    z = np.arange(17) - 8
    assert np.sqrt((aniso.sum(axis=(1, 2)) * z**2).sum()) == pytest.approx(2.0, rel=0.01)


def _fwhm(profile: np.ndarray, step: float) -> float:
    """Full width at half maximum with linear interpolation between pixels."""
    p = profile / profile.max()
    peak = int(p.argmax())

    def crossing(direction: int) -> float:
        j = peak
        while p[j + direction] >= 0.5:
            j += direction
        return j + direction * (p[j] - 0.5) / (p[j] - p[j + direction])

    return (crossing(1) - crossing(-1)) * step


def test_widefield_psf_matches_psfgenerator_reference(shared_data):
    """Our Gibson–Lanni PSF has the lateral width of an independent PSFGenerator PSF."""
    import tifffile

    reference = tifffile.imread(shared_data / "flowdec" / "psfs" / "psfgen1.tif")
    ours = widefield_psf((9, 33, 33), (0.25, 0.1, 0.1), wavelength=0.61, na=1.4)
    assert ours.sum() == pytest.approx(1.0)
    ref_plane = reference[np.unravel_index(reference.argmax(), reference.shape)[0]]
    peak = np.unravel_index(ref_plane.argmax(), ref_plane.shape)
    ref_fwhm = _fwhm(ref_plane[peak[0]], 0.1)  # 0.257 µm
    our_fwhm = _fwhm(ours[4, 16], 0.1)  # 0.240 µm
    assert our_fwhm == pytest.approx(ref_fwhm, rel=0.1)
    # Abbe/Rayleigh scale: lateral FWHM ≈ 0.51 λ / NA = 0.22 µm
    assert 0.15 <= our_fwhm <= 0.35


def test_lightsheet_psf_is_thinner_in_z_than_widefield():
    args = ((31, 15, 15), (0.4, 0.2, 0.2), 0.52, 0.8)
    wide = widefield_psf(*args, immersion_index=1.333, sample_index=1.333)
    sheet = lightsheet_psf(*args, sheet_thickness=1.5)
    assert _fwhm(sheet[:, 7, 7], 0.4) < _fwhm(wide[:, 7, 7], 0.4)
    assert sheet.sum() == pytest.approx(1.0)


def test_even_psf_is_padded_to_odd():
    psf = validate_psf(np.ones((4, 6)))
    assert psf.shape == (5, 7) and psf.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "psf,shape,message",
    [
        (np.array([[0.0, -1.0, 0.0], [0, 3, 0], [0, 0, 0]]), (10, 10), "negative values"),
        (np.zeros((3, 3)), (10, 10), "sums to zero"),
        (np.ones((15, 15)), (10, 10), "larger than the image"),
        (np.full((3, 3), np.nan), (10, 10), "NaN"),
        (np.ones((3, 3, 3)), (10, 10), "the PSF is 3D"),
        (np.ones((0, 3)), (10, 10), "empty"),
    ],
)
def test_bad_psf_errors(psf, shape, message):
    with pytest.raises(PsfError, match=message):
        validate_psf(psf, shape, name="my_psf.tif")
    with pytest.raises(PsfError, match="my_psf.tif"):
        validate_psf(psf, shape, name="my_psf.tif")


# ---------------------------------------------------------------- PSF hygiene (clean_psf)
def _shifted(psf, shift):
    from cider.psf import _fourier_shift

    return np.clip(_fourier_shift(psf, shift), 0, None)


def _even_gaussian(sigma, n):
    """Gaussian sampled on an even grid: its centre lies between two pixels."""
    grid = np.arange(n) - (n - 1) / 2
    g = np.exp(-0.5 * (grid[:, None] ** 2 + grid[None, :] ** 2) / sigma**2)
    return g / g.sum()


def _restored_centroid(psf_used, psf_true):
    """Centroid of RL-restored beads: a shifted PSF shifts it."""
    from cider.psf import psf_centroid
    from cider.rl import BlurOperator, richardson_lucy

    obj = np.zeros((48, 48))
    obj[12, 15] = obj[30, 33] = obj[20, 26] = 100.0
    shape = tuple(n - k + 1 for n, k in zip(obj.shape, psf_true.shape))
    y = BlurOperator(torch.tensor(psf_true), shape, "valid")(torch.tensor(obj)).clamp_min(0)
    return psf_centroid(richardson_lucy(y, psf_used, 30).numpy())


PSF_CASES = {
    "off-centre by 1.5 px": lambda g: _shifted(g, (1.5, -1.5)),
    "pedestal": lambda g: 1000 * g + 3.0,
}


@pytest.mark.parametrize("case", sorted(PSF_CASES))
def test_clean_psf_undoes_shift_and_pedestal(case):
    from cider.psf import clean_psf

    clean = gaussian_psf(1.6, size=17)
    cleaned, notes = clean_psf(PSF_CASES[case](clean), energy=1.0)
    assert notes, "every change must be reported"
    assert cleaned.shape == clean.shape
    np.testing.assert_allclose(cleaned, clean, atol=2e-3 * clean.max())
    shift = _restored_centroid(cleaned, clean) - _restored_centroid(clean, clean)
    assert np.abs(shift).max() < 0.25, shift


def test_even_sized_psf_is_recentred_not_shifted_by_half_a_pixel():
    from cider.psf import clean_psf

    cleaned, notes = clean_psf(_even_gaussian(1.6, 16), energy=1.0)
    assert cleaned.shape == (17, 17) and any("even" in n for n in notes)
    reference = gaussian_psf(1.6, size=17)
    np.testing.assert_allclose(cleaned, reference, atol=3e-3 * reference.max())
    plain = normalize_psf(_even_gaussian(1.6, 16))  # the old half-pixel pad
    shift_old = _restored_centroid(plain, reference) - _restored_centroid(reference, reference)
    shift_new = _restored_centroid(cleaned, reference) - _restored_centroid(reference, reference)
    assert np.abs(shift_new).max() < 0.25
    assert np.abs(shift_old).max() > 0.15  # what padding by half a pixel did (0.18, 0.30 px)


def test_psf_sampled_at_half_the_z_step_is_resampled():
    from cider.psf import clean_psf

    fine = gaussian_psf((4.0, 1.2, 1.2), size=(31, 15, 15))  # z step 0.1 µm
    cleaned, notes = clean_psf(
        fine, psf_voxel_size=(0.1, 0.1, 0.1), image_voxel_size=(0.2, 0.1, 0.1), energy=1.0
    )
    reference = gaussian_psf((2.0, 1.2, 1.2), size=cleaned.shape)
    assert any("resampled" in n for n in notes)
    np.testing.assert_allclose(cleaned, reference, atol=1e-3 * reference.max())


def test_off_centre_psf_refused_when_recentring_is_off():
    from cider.psf import clean_psf

    with pytest.raises(PsfError, match=r"centroid .* px from its centre.*psf.recentre"):
        clean_psf(_shifted(gaussian_psf(1.6, size=17), (1.5, 0)), name="beads.tif", recentre=False)


def test_clean_psf_crops_to_its_support():
    from cider.psf import clean_psf

    cleaned, notes = clean_psf(gaussian_psf(1.0, size=31), energy=0.9999)
    assert cleaned.shape[0] < 15 and any("cropped" in n for n in notes)
