"""cider: zero-shot deconvolution of microscopy images and volumes (CiDeR method).

The public API works on numpy arrays::

    import cider
    psf = cider.gaussian_psf(1.5)
    result = cider.restore(image, psf, cider.RestoreConfig(iterations=1000))
    result.restored, result.loss_history, result.timings, result.device
"""

from .background import BackgroundConfig, wavelet_background
from .errors import CiderError, ImageError, PsfError
from .psf import gaussian_psf, lightsheet_psf, validate_psf, widefield_psf
from .restore import FLUORESCENCE, RestoreConfig, Result, restore
from .rl import richardson_lucy

__all__ = [
    "FLUORESCENCE",
    "BackgroundConfig",
    "CiderError",
    "ImageError",
    "PsfError",
    "Result",
    "RestoreConfig",
    "gaussian_psf",
    "lightsheet_psf",
    "restore",
    "richardson_lucy",
    "validate_psf",
    "wavelet_background",
    "widefield_psf",
]

__version__ = "0.1.0"
