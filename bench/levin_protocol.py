"""Levin et al. 2009 benchmark: data loading and the SelfDeblur scoring protocol.

Protocol (see ``shared/data/levin/README.md``): the result is rounded to 8 bits; the gt
is cropped to ``[15:240, 15:240]``; the estimate is aligned to it by a sub-pixel
translation (bilinear interpolation, shifts up to ±10 px in 0.25-px steps) minimising
the squared error; PSNR on 0–255 and SSIM with an 11×11 Gaussian window (σ = 1.5,
``use_sample_covariance=False``) are computed on the aligned crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import map_coordinates
from skimage.metrics import structural_similarity

CROP = 15
SIZE = 225


@dataclass(frozen=True)
class Case:
    """One blurred image of the benchmark."""

    image: int
    kernel_index: int
    sharp: np.ndarray  # 255 × 255 in [0, 1]
    blurred: np.ndarray  # 255 × 255 in [0, 1]
    kernel: np.ndarray  # float kernel, a cross-correlation filter, sum 1

    @property
    def name(self) -> str:
        return f"im{self.image}_k{self.kernel_index}"

    @property
    def psf(self) -> np.ndarray:
        """The kernel as a convolution PSF (cider's convention)."""
        return self.kernel[::-1, ::-1].copy()


def load_case(root: Path, image: int, kernel: int) -> Case:
    def png(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path), dtype=np.float64) / 255.0

    return Case(
        image,
        kernel,
        png(root / "gt" / f"im{image}.png"),
        png(root / "blurred" / f"im{image}_kernel{kernel}_img.png"),
        np.load(root / "kernels" / f"kernel{kernel}.npy"),
    )


def _sse(estimate: np.ndarray, target: np.ndarray, shift: tuple[float, float]) -> tuple[float, np.ndarray]:
    r, c = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    aligned = map_coordinates(estimate, [CROP + r + shift[0], CROP + c + shift[1]], order=1, mode="nearest")
    return float(((aligned - target) ** 2).sum()), aligned


def _sse_integer(estimate: np.ndarray, target: np.ndarray, shift: tuple[int, int]) -> float:
    """:func:`_sse` of an integer shift inside the image, by slicing: the same value
    (bilinear interpolation at whole pixels returns the pixels), ~50× faster."""
    r, c = CROP + shift[0], CROP + shift[1]
    return float(((estimate[r : r + SIZE, c : c + SIZE] - target) ** 2).sum())


def align(
    estimate: np.ndarray, sharp: np.ndarray, max_shift: int = 10, step: float = 0.25
) -> tuple[np.ndarray, tuple]:
    """Best sub-pixel translation: integer grid ±max_shift, then ``step`` within ±1 px."""
    if not 0 <= max_shift <= CROP or estimate.shape[0] < CROP + SIZE + max_shift:
        raise ValueError(f"align: shifts up to ±{max_shift} px leave the {estimate.shape} image")
    target = sharp[CROP : CROP + SIZE, CROP : CROP + SIZE]
    integer = range(-max_shift, max_shift + 1)
    best = min(((a, b) for a in integer for b in integer), key=lambda s: _sse_integer(estimate, target, s))
    fine = np.arange(-1, 1 + step / 2, step)
    candidates = [
        (best[0] + a, best[1] + b)
        for a in fine
        for b in fine
        if max(abs(best[0] + a), abs(best[1] + b)) <= max_shift
    ]
    shift = min(candidates, key=lambda s: _sse(estimate, target, s)[0])
    return _sse(estimate, target, shift)[1], shift


def score(estimate: np.ndarray, sharp: np.ndarray) -> dict:
    """PSNR (dB) and SSIM of an estimate (values in [0, 1]) under the Levin protocol."""
    estimate = np.clip(np.rint(np.asarray(estimate, dtype=np.float64) * 255), 0, 255) / 255
    aligned, shift = align(estimate, sharp)
    target = sharp[CROP : CROP + SIZE, CROP : CROP + SIZE]
    psnr = 10 * np.log10(255**2 / np.mean((255 * aligned - 255 * target) ** 2))
    ssim = structural_similarity(
        aligned * 255,
        target * 255,
        data_range=255,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        win_size=11,
    )
    return {"psnr": float(psnr), "ssim": float(ssim), "shift": [float(shift[0]), float(shift[1])]}


def wiener(case: Case, nsr: float = 2e-3, pad: int = 40) -> np.ndarray:
    """Wiener deconvolution with symmetric padding (the README's reference baseline)."""
    y = np.pad(case.blurred, pad, mode="symmetric")
    k = case.psf
    otf_shape = y.shape
    padded = np.zeros(otf_shape)
    padded[: k.shape[0], : k.shape[1]] = k
    padded = np.roll(padded, (-(k.shape[0] // 2), -(k.shape[1] // 2)), axis=(0, 1))
    otf = np.fft.rfft2(padded)
    x = np.fft.irfft2(np.fft.rfft2(y) * otf.conj() / (np.abs(otf) ** 2 + nsr), s=otf_shape)
    return x[pad:-pad, pad:-pad]
