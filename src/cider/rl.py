"""FFT-based blur operators and Richardson–Lucy deconvolution in torch (2D and 3D).

The blur is ``y = A x`` with ``A`` a convolution by the PSF. Three boundary models:

``"valid"`` (default)
    The image is the *valid* part of the blur of a larger object: the object has shape
    ``image + psf - 1`` and ``A`` needs no padding assumption at all. RL then uses the
    boundary-aware update of Bertero & Boccacci (2005),
    ``x ← x / Aᵀ1 · Aᵀ(y / Ax)``, which keeps ``sum(Ax) == sum(y)`` at every step.
``"same"``
    Object and image have the same shape; the object is zero outside (the convention of
    ``scipy.signal.convolve(mode="same")``), and RL is the classic update
    ``x ← x · Aᵀ(y / Ax)`` without border normalisation, exactly as
    ``skimage.restoration.richardson_lucy``.
``"periodic"``
    Object and image have the same shape and the blur wraps around.

Every operator works on a batch of channels ``(..., *spatial)`` at once; the OTF is
computed once per operator. The PSF may itself carry leading batch axes (``ndim`` names
its spatial axes): then each batch member is blurred by its own PSF, broadcast against
the data's leading axes (training blurs every patch with its own kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["BlurOperator", "richardson_lucy", "censored", "next_fast_len", "to_positive", "from_positive"]

BOUNDARIES = ("valid", "same", "periodic")


def next_fast_len(n: int) -> int:
    """Smallest integer ``>= n`` whose only prime factors are 2, 3 and 5."""
    best = 2 ** int(np.ceil(np.log2(max(n, 1))))
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


class BlurOperator:
    """Convolution by a fixed PSF on a fixed grid, with its exact adjoint.

    Parameters
    ----------
    psf : torch.Tensor or np.ndarray
        PSF with odd size on every spatial axis (see :func:`cider.psf.validate_psf`);
        leading axes beyond the last ``ndim`` are a batch of PSFs.
    image_shape : sequence of int
        Spatial shape of the observation ``y``.
    boundary : {"valid", "same", "periodic"}
        Boundary model, see the module docstring.
    device, dtype
        Where and in which precision the OTF lives; default: the PSF's.
    ndim : int, optional
        Number of spatial axes; default ``len(image_shape)``.
    """

    def __init__(
        self,
        psf: torch.Tensor | np.ndarray,
        image_shape: Sequence[int],
        boundary: str = "valid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        ndim: int | None = None,
    ):
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
        psf = torch.as_tensor(psf, device=device, dtype=dtype)
        self.boundary = boundary
        self.ndim = ndim or len(image_shape)
        if psf.ndim < self.ndim:
            raise ValueError(f"PSF of shape {tuple(psf.shape)} has fewer than {self.ndim} spatial axes")
        self.image_shape = tuple(int(n) for n in image_shape)
        self.kernel_shape = tuple(psf.shape[-self.ndim :])
        if boundary == "valid":
            self.object_shape = tuple(n + k - 1 for n, k in zip(self.image_shape, self.kernel_shape))
            self.offset = tuple(k - 1 for k in self.kernel_shape)
        else:
            self.object_shape = self.image_shape
            self.offset = tuple(k // 2 for k in self.kernel_shape)
        if boundary == "periodic":
            self.fft_shape = self.image_shape
            psf = _place_centred(psf, self.fft_shape, self.ndim)
            self.offset = (0,) * self.ndim
        else:
            self.fft_shape = tuple(
                next_fast_len(n + k - 1) for n, k in zip(self.object_shape, self.kernel_shape)
            )
        self.dims = tuple(range(-self.ndim, 0))
        self.otf = torch.fft.rfftn(psf, s=self.fft_shape, dim=self.dims)

    def _crop(self, x: torch.Tensor, start: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        index = tuple(slice(s, s + n) for s, n in zip(start, shape))
        return x[(..., *index)]

    def _embed(self, x: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
        pad: list[int] = []
        for s, n, total in zip(reversed(start), reversed(x.shape[-self.ndim :]), reversed(self.fft_shape)):
            pad += [s, total - s - n]
        return torch.nn.functional.pad(x, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blur an object of shape ``(..., *object_shape)`` to ``(..., *image_shape)``."""
        spectrum = torch.fft.rfftn(x, s=self.fft_shape, dim=self.dims) * self.otf
        full = torch.fft.irfftn(spectrum, s=self.fft_shape, dim=self.dims)
        return self._crop(full, self.offset, self.image_shape)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Apply ``Aᵀ``: correlate ``(..., *image_shape)`` back to ``(..., *object_shape)``."""
        embedded = self._embed(y, self.offset)
        spectrum = torch.fft.rfftn(embedded, dim=self.dims) * self.otf.conj()
        full = torch.fft.irfftn(spectrum, s=self.fft_shape, dim=self.dims)
        return self._crop(full, (0,) * self.ndim, self.object_shape)

    __call__ = forward


def _place_centred(psf: torch.Tensor, shape: Sequence[int], ndim: int) -> torch.Tensor:
    """Zero-pad the last ``ndim`` axes of ``psf`` to ``shape`` and roll its centre pixel to
    index 0."""
    kernel = psf.shape[-ndim:]
    pad: list[int] = []
    for k, n in zip(reversed(kernel), reversed(shape)):
        if k > n:
            raise ValueError(f"PSF size {tuple(kernel)} exceeds the grid {tuple(shape)}")
        pad += [0, n - k]
    padded = torch.nn.functional.pad(psf, pad)
    shifts = tuple(-(k // 2) for k in kernel)
    return torch.roll(padded, shifts, dims=tuple(range(-ndim, 0)))


def censored(
    observation: torch.Tensor, blurred: torch.Tensor, saturated: torch.Tensor | None
) -> torch.Tensor:
    """``observation`` with its saturated pixels raised to the model ``blurred`` where that
    is higher (no gradient through it): a saturated pixel says the truth is at least the
    data, so a model above it is not an error and one below it is pulled up. ``saturated``
    None: the observation as it is."""
    if saturated is None:
        return observation
    return torch.where(saturated, torch.maximum(observation, blurred.detach()), observation)


def richardson_lucy(
    image: torch.Tensor,
    psf: torch.Tensor | np.ndarray,
    iterations: int,
    boundary: str = "valid",
    init: torch.Tensor | float | None = None,
    eps: float = 1e-12,
    ndim: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    saturated: torch.Tensor | None = None,
    background: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Richardson–Lucy deconvolution of one or many channels at once.

    Parameters
    ----------
    image : torch.Tensor
        Non-negative data, shape ``(*spatial)`` or ``(C, *spatial)`` (any leading batch
        axes); all channels share the PSF and go through in one FFT call.
    psf : tensor or array
        PSF with ``len(spatial)`` axes, odd sizes, summing to 1; or a batch of PSFs
        ``(..., *kernel)`` with ``ndim`` given, broadcast against the image's leading axes.
    iterations : int
        Number of RL iterations.
    boundary : {"valid", "same", "periodic"}
        Boundary model (see :class:`BlurOperator`). With ``"valid"`` the result is larger
        than the image by ``psf.shape - 1``.
    init : tensor or float, optional
        Starting estimate; default: the mean of each channel (less the background), flat.
    eps : float
        Floor of the denominator ``Ax``.
    ndim : int, optional
        Number of spatial axes; default ``psf.ndim`` (one PSF for every channel).
    callback : callable, optional
        Called as ``callback(iteration, model)`` at every iteration with the model of the
        data that the iteration's update divides by, ``Ax + background`` (computed
        anyway): e.g. a data misfit per iteration at no extra cost.
    saturated : torch.Tensor, optional
        Bool mask (image shape) of saturated pixels: their data are lower bounds, so each
        iteration uses ``max(data, Ax)`` there (:func:`censored`): a model above a
        saturated pixel is not pulled down to it.
    background : tensor or float
        A known additive background of the data (image units; a level, or an array that
        broadcasts against the image): the EM update of ``y ~ Poisson(Ax + background)``
        on data that still hold it. Estimating the object of ``y − background`` instead
        (clipped at 0) biases faint objects: the noise's negative excursions are lost.

    Returns
    -------
    torch.Tensor
        The estimate, shape ``(..., *object_shape)``.
    """
    psf = torch.as_tensor(psf, device=image.device, dtype=image.dtype)
    ndim = ndim or psf.ndim
    op = BlurOperator(psf, image.shape[-ndim:], boundary, ndim=ndim)
    if init is None:
        mean = (image - background).mean(dim=op.dims, keepdim=True).clamp_min(eps)
        estimate = mean.expand(*image.shape[:-ndim], *op.object_shape).clone()
    else:
        estimate = torch.as_tensor(init, dtype=image.dtype, device=image.device)
        estimate = estimate.expand(*image.shape[:-ndim], *op.object_shape).clone()
    if boundary == "valid":
        weight = op.adjoint(torch.ones(op.image_shape, dtype=image.dtype, device=image.device))
        # Object pixels that barely touch the image (Aᵀ1 at FFT round-off level) keep
        # their value instead of being divided by noise.
        observed = weight > 1e-4 * weight.amax(dim=op.dims, keepdim=True)
        weight = torch.where(observed, weight, torch.ones_like(weight))
    for iteration in range(iterations):
        blurred = op.forward(estimate) + background
        if callback is not None:
            callback(iteration, blurred)
        update = op.adjoint(censored(image, blurred, saturated) / blurred.clamp_min(eps))
        if boundary == "valid":
            update = torch.where(observed, update / weight, torch.ones_like(weight))
        estimate = (estimate * update).clamp_min(0)
    return estimate


def to_positive(
    features: torch.Tensor,
    offset: float,
    ndim: int,
    value_range: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map each channel affinely to ``[offset, 1 + offset]`` so that RL can run on it.

    Parameters
    ----------
    features : torch.Tensor
        Shape ``(C, *spatial)`` with ``ndim`` spatial axes; values of any sign.
    offset : float
        Pedestal added after min–max scaling; keeps RL away from exact zeros, where its
        multiplicative update would freeze.
    ndim : int
        Number of spatial axes.
    value_range : (low, high), optional
        Per-channel minimum and maximum to map from (shape ``(C,)``), e.g. those of the
        whole image when ``features`` is one tile of it: RL is not shift-equivariant
        under different maps, so all tiles of an image must share one. Default: the
        minimum and maximum of ``features``.

    Returns
    -------
    positive, low, scale : torch.Tensor
        ``positive = (features - low) / scale + offset``; ``low`` and ``scale`` have
        shape ``(C, 1, ..., 1)`` and undo the map in :func:`from_positive`.
    """
    dims = tuple(range(-ndim, 0))
    if value_range is None:
        low = features.amin(dim=dims, keepdim=True)
        high = features.amax(dim=dims, keepdim=True)
    else:
        shape = (-1,) + (1,) * ndim
        low, high = (
            torch.as_tensor(v, dtype=features.dtype, device=features.device).reshape(shape)
            for v in value_range
        )
    scale = (high - low).clamp_min(1e-12)
    return ((features - low) / scale + offset).clamp_min(offset), low, scale


def from_positive(
    positive: torch.Tensor, low: torch.Tensor, scale: torch.Tensor, offset: float
) -> torch.Tensor:
    """Undo :func:`to_positive` (also on RL output, which has another spatial shape)."""
    return (positive - offset) * scale + low
