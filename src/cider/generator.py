"""Zero-shot generator: an asymmetric encoder–decoder with skip connections.

The architecture follows the "skip" network of Deep Image Prior as used by CiDeR:
four levels with 32, 32, 64, 64 channels on the way down and up, 16-channel 1×1 skip
branches, stride-2 downsampling, (bi/tri)linear upsampling, batch normalisation after
every convolution, LeakyReLU(0.2), dot-product non-local blocks at levels 2 and 3, and an
output activation (softplus by default, the paper's sigmoid as an option). In 2D it has
322,913 parameters, the figure given in the CiDeR paper.

The same code builds the 3D variant by swapping the convolution, normalisation and
interpolation modules, so both variants have the same structure.

Output: the paper's sigmoid bounds the estimate to (0, 1), i.e. to the brightest
*blurred* value when the data are scaled by their maximum, while a deconvolved spot is
brighter than its blur (a 3D blur lowers a bead's peak 5–50×). The default output is
therefore ``softplus`` (positive, unbounded; its bias starts at the data's mean level, see
:meth:`Generator.start_at`); ``sigmoid`` remains available as the paper's variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GeneratorConfig", "Generator", "Strides", "count_parameters", "softplus_inverse", "voxel_strides"]

# Each level's downsampling stride per axis (GeneratorConfig.strides); empty: 2 everywhere.
Strides = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class GeneratorConfig:
    """Shape of the generator.

    Attributes
    ----------
    in_channels : int
        Number of input feature maps (16 deconvolved features).
    out_channels : int
        Number of output channels (1: one greyscale image or volume).
    channels_down, channels_up, channels_skip : tuple of int
        Channels per level on the encoder path, decoder path and skip branch.
    nonlocal_levels : tuple of int
        Levels (0-based) whose encoder gets a dot-product non-local block.
    output : {"softplus", "sigmoid"}
        Output activation: ``softplus`` (positive, unbounded) or ``sigmoid`` (paper, (0, 1)).
    strides : tuple of tuple of int
        Each level's downsampling stride per axis (1 or 2), e.g. from
        :func:`voxel_strides`; empty (default): 2 on every axis at every level.
    """

    in_channels: int = 16
    out_channels: int = 1
    channels_down: tuple[int, ...] = (32, 32, 64, 64)
    channels_up: tuple[int, ...] = (32, 32, 64, 64)
    channels_skip: tuple[int, ...] = (16, 16, 16, 16)
    nonlocal_levels: tuple[int, ...] = (2, 3)
    output: str = "softplus"
    strides: Strides = ()

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"generator output must be one of {OUTPUTS}, got {self.output!r}")
        if self.strides and (
            len(self.strides) != len(self.channels_down)
            or len({len(s) for s in self.strides}) != 1
            or any(n not in (1, 2) for s in self.strides for n in s)
        ):
            raise ValueError(
                f"generator strides must give 1 or 2 per axis for each of the {len(self.channels_down)} "
                f"levels, got {self.strides!r}"
            )

    def multiples(self, ndim: int) -> tuple[int, ...]:
        """Inputs are padded to a multiple of these per axis: the product of the strides
        (``2**levels`` on every axis without ``strides``)."""
        if not self.strides:
            return (2 ** len(self.channels_down),) * ndim
        return tuple(math.prod(s[axis] for s in self.strides) for axis in range(ndim))


def voxel_strides(voxel_size: Sequence[float], levels: int = 4) -> Strides:
    """Per-level strides that make the generator's levels closer to isotropic voxels.

    At each level an axis is halved only while its spacing is less than twice the finest
    spacing of that level (the rule of nnU-Net for anisotropic data): a z step 3× the xy
    pixel keeps every plane at the first level (spacing 3 : 2 : 2 after it) and is halved
    with xy from then on, so the coarsest level has 8× fewer planes instead of 16×.

    Parameters
    ----------
    voxel_size : sequence of float
        Physical size per axis (any unit), Z Y X order.
    levels : int
        Number of levels (downsamplings).
    """
    spacing = [float(v) for v in voxel_size]
    strides = []
    for _ in range(levels):
        finest = min(spacing)
        stride = tuple(2 if v / finest < 2 else 1 for v in spacing)
        spacing = [v * s for v, s in zip(spacing, stride)]
        strides.append(stride)
    return tuple(strides)


OUTPUTS = ("softplus", "sigmoid")


class _InWeightDtype:
    """A convolution in its weights' dtype: a bf16 fit casts the weights, and inputs follow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class _Conv2d(_InWeightDtype, nn.Conv2d):
    pass


class _Conv3d(_InWeightDtype, nn.Conv3d):
    pass


def _layers(ndim: int) -> tuple[type[nn.Module], type[nn.Module], str]:
    if ndim == 2:
        return _Conv2d, nn.BatchNorm2d, "bilinear"
    if ndim == 3:
        return _Conv3d, nn.BatchNorm3d, "trilinear"
    raise ValueError(f"generator supports 2D or 3D data, got ndim={ndim}")


class _ConvBlock(nn.Sequential):
    """Reflection-padded convolution, batch norm and LeakyReLU."""

    def __init__(self, ndim: int, c_in: int, c_out: int, kernel: int, stride: int | tuple[int, ...] = 1):
        conv, norm, _ = _layers(ndim)
        pad = (kernel - 1) // 2
        padding = nn.ReflectionPad2d(pad) if ndim == 2 else nn.ReplicationPad3d(pad)
        layers: list[nn.Module] = [padding] if pad else []
        layers += [conv(c_in, c_out, kernel, stride=stride), norm(c_out), nn.LeakyReLU(0.2)]
        super().__init__(*layers)


class _NonLocal(nn.Module):
    """Dot-product non-local block (Wang et al. 2018) with a residual connection."""

    def __init__(self, ndim: int, channels: int):
        super().__init__()
        conv, norm, _ = _layers(ndim)
        inner = max(channels // 2, 1)
        self.g = conv(channels, inner, 1)
        self.theta = conv(channels, inner, 1)
        self.phi = conv(channels, inner, 1)
        self.out = nn.Sequential(conv(inner, channels, 1), norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)  # (b, n, inner)
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (b, n, inner)
        phi = self.phi(x).flatten(2)  # (b, inner, n)
        # No softmax, so (θφᵀ/n)g = θ(φᵀg)/n exactly: memory linear in n, not quadratic.
        y = (theta @ (phi @ g) / phi.shape[-1]).transpose(1, 2).reshape(b, -1, *spatial)
        return x + self.out(y)

    def forward_quadratic(self, x: torch.Tensor) -> torch.Tensor:
        """The textbook form with the n × n attention matrix (reference for tests)."""
        b, _, *spatial = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)
        theta = self.theta(x).flatten(2).transpose(1, 2)
        phi = self.phi(x).flatten(2)
        attention = (theta @ phi) / phi.shape[-1]
        y = (attention @ g).transpose(1, 2).reshape(b, -1, *spatial)
        return x + self.out(y)


class _Level(nn.Module):
    """One level: skip branch + (downsample → deeper levels → upsample), then merge."""

    def __init__(self, ndim: int, cfg: GeneratorConfig, level: int, c_in: int):
        super().__init__()
        _, norm, self.mode = _layers(ndim)
        down, up, skip = cfg.channels_down, cfg.channels_up, cfg.channels_skip
        last = level == len(down) - 1
        self.skip = _ConvBlock(ndim, c_in, skip[level], 1) if skip[level] else None
        stride = cfg.strides[level] if cfg.strides else 2
        encoder: list[nn.Module] = [
            _ConvBlock(ndim, c_in, down[level], 3, stride=stride),
        ]
        if level in cfg.nonlocal_levels:
            encoder.append(_NonLocal(ndim, down[level]))
        encoder.append(_ConvBlock(ndim, down[level], down[level], 3))
        self.encoder = nn.Sequential(*encoder)
        self.deeper = None if last else _Level(ndim, cfg, level + 1, down[level])
        c_deep = down[level] if last else up[level + 1]
        self.merge = nn.Sequential(
            norm(skip[level] + c_deep),
            _ConvBlock(ndim, skip[level] + c_deep, up[level], 3),
            _ConvBlock(ndim, up[level], up[level], 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deep = self.encoder(x)
        if self.deeper is not None:
            deep = self.deeper(deep)
        deep = F.interpolate(deep, size=x.shape[2:], mode=self.mode, align_corners=False)
        if self.skip is not None:
            deep = torch.cat([self.skip(x), deep], dim=1)
        return self.merge(deep)


class Generator(nn.Module):
    """Encoder–decoder generator for 2D (N,C,Y,X) or 3D (N,C,Z,Y,X) inputs.

    Inputs of any size are accepted: they are reflect-padded to a multiple of
    ``2**levels`` per axis (of the product of the strides, with ``config.strides``) and the
    output is cropped back to the input size.

    Parameters
    ----------
    ndim : int
        Number of spatial dimensions, 2 or 3.
    config : GeneratorConfig, optional
        Channel layout; the default is the CiDeR layout.
    """

    def __init__(self, ndim: int = 2, config: GeneratorConfig | None = None):
        super().__init__()
        self.ndim = ndim
        self.config = config or GeneratorConfig()
        conv, _, _ = _layers(ndim)
        self.body = _Level(ndim, self.config, 0, self.config.in_channels)
        self.head = conv(self.config.channels_up[0], self.config.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pad: list[int] = []
        for n, multiple in zip(reversed(size), reversed(self.config.multiples(len(size)))):
            extra = -n % multiple
            pad += [extra // 2, extra - extra // 2]
        mode = "reflect" if all(p < n for p, n in zip(pad[::2], reversed(size))) else "replicate"
        x = F.pad(x, pad, mode=mode) if any(pad) else x
        z = self.head(self.body(x))
        y = F.softplus(z) if self.config.output == "softplus" else torch.sigmoid(z)
        crop = tuple(slice(pad[2 * i], pad[2 * i] + n) for i, n in enumerate(reversed(size)))
        return y[(..., *reversed(crop))]

    @torch.no_grad()
    def start_at(self, level: float) -> None:
        """Set the output bias so that a zero pre-activation gives ``level`` (softplus only).

        The fit starts near the data's mean brightness instead of softplus(0) ≈ 0.69 of the
        data's maximum.
        """
        if self.config.output == "softplus":
            self.head.bias.fill_(softplus_inverse(level))


def softplus_inverse(level: float) -> float:
    """Pre-activation whose softplus is ``level`` (floored at 1e-4)."""
    level = max(float(level), 1e-4)
    return level + math.log(-math.expm1(-level))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
