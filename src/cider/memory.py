"""Device memory of a generator fit, estimated before it runs (no device needed).

:func:`activation_bytes` traces one training step on PyTorch's ``meta`` device: what
autograd keeps for the backward pass, the bulk of a fit's memory. :func:`fit_memory_bytes`
turns it into the peak device memory of one pass of B members, calibrated on the
measured peaks of ``bench/results/throughput_gpu.json`` (NVIDIA H200, float32):

=========================  ===========  =============  ==========
pass                       traced, B=1  measured peak  estimate
=========================  ===========  =============  ==========
64 × 76² (2D)              17 MiB       2.71 GiB       2.83 GiB
32 × 140²                  53 MiB       2.67 GiB       3.68 GiB
16 × 268²                  186 MiB      4.83 GiB       5.77 GiB
16 × 28×56² (3D)           263 MiB      7.21 GiB       8.02 GiB
2 × 80×202²                6.6 GiB      21.84 GiB      23.60 GiB
=========================  ===========  =============  ==========

The estimate is never below the measurement (4–38 % above). bfloat16
(``restore.precision``) measured 10–38 % less than float32: the float32 estimate is a
safe bound for it. The workflow's plan uses it (``fit.gpu_memory_gb``) to size passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch.func import functional_call, replace_all_batch_norm_modules_, vmap

from .generator import Generator, GeneratorConfig, Strides

__all__ = ["activation_bytes", "fit_memory_bytes", "fit_memory_bound", "largest_batch", "largest_tile"]

# Calibration (module docstring): a batched forward keeps 1.33 B × one member's saved
# tensors (vmap's grouped convolutions copy their inputs), and the allocator's peak is
# 1.3 × what autograd keeps (workspaces, the blur's FFTs, the loss maps).
PEAK_PER_SAVED_BYTE = 1.75
# float32 weights, gradients and Adam's two moments
STATE_COPIES = 4
# features, observation, cuDNN handles and the allocator's slack, once per process
OVERHEAD_BYTES = 640 * 2**20
# A bound on the traced bytes that needs no trace: 4 KiB per voxel of the object padded
# to the generator's multiples (GeneratorConfig.multiples, 16; 2.1–3.9 KiB measured
# from 20×20 to 132×354² and from 20³ to 80×202²) plus 8 MiB per member.
BOUND_BYTES_PER_VOXEL = 4 * 2**10
BOUND_BYTES_PER_MEMBER = 8 * 2**20


def activation_bytes(
    object_shape: Sequence[int], batch: int = 1, in_channels: int = 16, strides: Strides = ()
) -> int:
    """Bytes of activations autograd keeps for one training step of ``batch`` generators.

    Traced on the ``meta`` device (no memory is allocated, nothing is computed, ≈ 0.2 s):
    every tensor saved for the backward pass of one batched forward, counted once. A
    124×346² light-sheet tile (object 132×354²) keeps 36.8 GiB.

    Parameters
    ----------
    object_shape : sequence of int
        The estimate's shape: the tile's padded shape + PSF shape − 1, per axis.
    batch : int
        Members fitted in one forward pass.
    in_channels : int
        Feature channels the generator reads.
    strides : tuple of tuple of int
        The generator's per-level strides (``GeneratorConfig.strides``; empty: 2).
    """
    return _traced_bytes(tuple(int(n) for n in object_shape), batch, in_channels, tuple(strides))


@lru_cache(maxsize=64)
def _traced_bytes(object_shape: tuple[int, ...], batch: int, in_channels: int, strides: Strides) -> int:
    module = Generator(len(object_shape), GeneratorConfig(in_channels=in_channels, strides=strides))
    replace_all_batch_norm_modules_(module)
    module = module.to("meta")
    params = {
        k: v.detach()[None].expand(batch, *v.shape).requires_grad_() for k, v in module.named_parameters()
    }
    inputs = torch.zeros(batch, in_channels, *object_shape, device="meta")
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if batch == 1:
            functional_call(module, ({k: v[0] for k, v in params.items()}, {}), (inputs,))
        else:
            vmap(lambda p, x: functional_call(module, (p, {}), (x[None],))[0])(params, inputs)
    return int(sum(saved.values()))


@lru_cache(maxsize=4)
def _state_bytes(ndim: int, in_channels: int) -> int:
    module = Generator(ndim, GeneratorConfig(in_channels=in_channels)).to("meta")
    return STATE_COPIES * 4 * sum(p.numel() for p in module.parameters())


def fit_memory_bytes(
    object_shape: Sequence[int], batch: int = 1, in_channels: int = 16, strides: Strides = ()
) -> int:
    """Peak device memory of one pass of ``batch`` members (estimate, float32).

    ``1.75 × batch × activation_bytes(object_shape) + batch × weights and optimiser state
    + 640 MiB``; see the module docstring for how it compares with measured peaks.
    ``strides``: the generator's (``RestoreConfig.strides``).
    """
    per_member = PEAK_PER_SAVED_BYTE * activation_bytes(object_shape, 1, in_channels, strides)
    return int(batch * (per_member + _state_bytes(len(object_shape), in_channels)) + OVERHEAD_BYTES)


def fit_memory_bound(
    object_shape: Sequence[int], batch: int = 1, in_channels: int = 16, strides: Strides = ()
) -> int:
    """An upper bound of :func:`fit_memory_bytes` without a trace (instant; 1–2.1× above it).

    With ``strides`` (z kept at the first level) the object is padded to their per-axis
    multiples; the traced bytes are then 2.3–2.5 KiB per padded voxel, still under the
    bound's 4 KiB.
    """
    multiples = GeneratorConfig(strides=tuple(strides)).multiples(len(object_shape))
    padded = math.prod(-(-n // m) * m for n, m in zip(object_shape, multiples))
    saved = BOUND_BYTES_PER_VOXEL * padded + BOUND_BYTES_PER_MEMBER
    per_member = PEAK_PER_SAVED_BYTE * saved
    return int(batch * (per_member + _state_bytes(len(object_shape), in_channels)) + OVERHEAD_BYTES)


def largest_batch(object_shape: Sequence[int], budget_bytes: float, most: int, strides: Strides = ()) -> int:
    """Most members (≤ ``most``) of one pass whose estimated peak stays within the budget.

    0 when a single member does not fit. Traces only when the trace-free bound exceeds
    the budget, so small tiles and images cost nothing to check.
    """
    if fit_memory_bound(object_shape, most, strides=strides) <= budget_bytes:
        return most
    one = fit_memory_bytes(object_shape, 1, strides=strides) - OVERHEAD_BYTES
    return max(0, min(most, int((budget_bytes - OVERHEAD_BYTES) // one)))


def largest_tile(
    tile_size: Sequence[int],
    margin: Sequence[int],
    psf_shape: Sequence[int],
    budget_bytes: float,
    least: Sequence[int] | None = None,
    strides: Strides = (),
) -> tuple[int, ...] | None:
    """The largest tile core (``tile_size`` scaled down, multiples of 8) one member of which fits.

    The fitted object of a core ``c`` is ``c + 2 · margin + psf − 1`` per axis. No axis
    goes below ``least`` (default 8 pixels). ``None`` when not even ``least`` fits.
    """
    least = tuple(least) if least is not None else (8,) * len(tile_size)

    def core(scale: float) -> tuple[int, ...]:
        return tuple(max(low, int(t * scale) // 8 * 8) for t, low in zip(tile_size, least))

    def fits(c: tuple[int, ...]) -> bool:
        shape = tuple(n + 2 * m + k - 1 for n, m, k in zip(c, margin, psf_shape))
        # the bound first: no trace for small shapes (nor for tiny ones, which cannot be traced)
        bound = fit_memory_bound(shape, 1, strides=strides)
        return bound <= budget_bytes or fit_memory_bytes(shape, 1, strides=strides) <= budget_bytes

    if not fits(core(0.0)):
        return None
    low, high = 0.0, 1.0  # fits(core(low)) holds
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(core(middle)) else (low, middle)
    return core(low)
