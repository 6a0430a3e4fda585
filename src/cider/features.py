"""Deep feature extractor: one convolution and three residual blocks, 16 features.

Same shape as the feature block of Deep Wiener Deconvolution (Dong et al., NeurIPS 2020)
and CiDeR, but with one (greyscale) input channel and our own weights, trained by
``cider train-features`` on natural images (see ``weights/README.md``). Volumes are
processed plane by plane (the extractor is 2D; the following RL step is 3D).
"""

from __future__ import annotations

import hashlib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "FeatureExtractor",
    "load_feature_extractor",
    "extract_features",
    "weights_source",
    "weights_digest",
    "DEFAULT_WEIGHTS",
]

DEFAULT_WEIGHTS = "features.pt"


class _Residual(nn.Module):
    def __init__(self, channels: int, kernel: int):
        super().__init__()
        pad = kernel // 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, kernel, padding=pad, padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel, padding=pad, padding_mode="reflect"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FeatureExtractor(nn.Module):
    """Greyscale image (N, 1, Y, X) → feature maps (N, features, Y, X)."""

    def __init__(self, features: int = 16, kernel: int = 5, blocks: int = 3):
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(1, features, kernel, padding=kernel // 2, padding_mode="reflect"), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[_Residual(features, kernel) for _ in range(blocks)])
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.head(x))


def weights_source(path: str | Path | None = None) -> tuple[Traversable | Path, str]:
    """The weights file that ``path`` names, and how to name it in messages.

    ``None`` is the package's ``features.pt``; a bare name that is not a local file
    (``features_rl10.pt``) is looked up among the package's weights; anything else is a
    path.

    Raises
    ------
    FileNotFoundError
        If no such file exists (the message lists the weights shipped in the package).
    """
    shipped = resources.files("cider") / "weights"
    if path is None or (not Path(path).is_file() and Path(path).name == str(path)):
        filename = DEFAULT_WEIGHTS if path is None else str(path)
        if not (shipped / filename).is_file():
            names = sorted(f.name for f in shipped.iterdir() if f.name.endswith(".pt"))
            raise FileNotFoundError(
                f"feature weights: no file {filename!r} here nor in the package (shipped: {names})"
            )
        return shipped / filename, f"package weights {filename}"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature weights: no file at {path}; give a state_dict .pt file")
    return path, str(path)


def weights_digest(path: str | Path | None = None) -> str:
    """SHA-256 (hex) of the weights file that ``path`` names (see :func:`weights_source`):
    what tells two results apart when a file of the same name changed."""
    source, _ = weights_source(path)
    return hashlib.sha256(source.read_bytes()).hexdigest()


def load_feature_extractor(
    path: str | Path | None = None, device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """Load the feature extractor, by default with the weights shipped in the package.

    Parameters
    ----------
    path : str or Path, optional
        A ``state_dict`` saved with ``torch.save``, or the name of a weights file shipped
        in the package (``cider/weights/``, e.g. ``features_rl10.pt``) when no such file
        exists; default: ``cider/weights/features.pt``.
    device : torch.device or str
        Where to put the model.

    Returns
    -------
    FeatureExtractor
        In eval mode, with gradients disabled.
    """
    source, name = weights_source(path)
    with resources.as_file(source) as file:
        state = torch.load(file, map_location="cpu", weights_only=True)
    model = FeatureExtractor()
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"feature weights {name} do not fit the extractor: {err}") from err
    model.eval().requires_grad_(False)
    return model.to(device)


@torch.no_grad()
def extract_features(
    image: torch.Tensor, model: FeatureExtractor, planes_per_batch: int = 16
) -> torch.Tensor:
    """Feature maps of a 2D image or, plane by plane, of a 3D volume.

    Parameters
    ----------
    image : torch.Tensor
        Shape (Y, X) or (Z, Y, X), values scaled to about [0, 1].
    model : FeatureExtractor
        The extractor, on the image's device.
    planes_per_batch : int
        Z planes processed together (bounds memory for big volumes).

    Returns
    -------
    torch.Tensor
        Shape (features, Y, X) or (features, Z, Y, X).
    """
    # On the CPU, oneDNN's convolutions run ~1.4× faster on channels-last data (same
    # results within float32 rounding). ``Module.to`` converts the weights in place, once.
    channels_last = image.device.type == "cpu"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if image.ndim == 2:
        return _apply(model, image[None, None], channels_last)[0]
    planes = [
        _apply(model, image[z : z + planes_per_batch, None], channels_last)
        for z in range(0, image.shape[0], planes_per_batch)
    ]
    return torch.cat(planes).transpose(0, 1)


def _apply(model: FeatureExtractor, batch: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The model on ``(N, 1, Y, X)``, channels-last if asked, returned contiguous."""
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return model(batch).contiguous()
