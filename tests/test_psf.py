"""PSF generation and validation."""

import numpy as np
import pytest

from cider import PsfError, gaussian_psf, lightsheet_psf, validate_psf, widefield_psf


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
