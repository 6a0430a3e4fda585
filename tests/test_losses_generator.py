"""Loss terms and the generator architecture."""

import pytest
import torch

from cider.generator import Generator, GeneratorConfig, count_parameters, voxel_strides
from cider.losses import hessian_penalty, sparsity_penalty, ssim_loss, ssim_windows, variance_stabilised


def _ramp(shape):
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    return (0.3 + sum((0.01 * (i + 1)) * g for i, g in enumerate(grids)))[None, None]


@pytest.mark.parametrize("shape", [(20, 30), (8, 12, 10)])
def test_hessian_of_linear_ramp_is_zero(shape):
    assert float(hessian_penalty(_ramp(shape))) == pytest.approx(0.0, abs=1e-12)


def test_hessian_values_2d_and_3d():
    y, x = torch.meshgrid(torch.arange(10.0), torch.arange(12.0), indexing="ij")
    # f = x²/2 + 3xy: f_xx = 1, f_yy = 0, f_xy = 3 → 1 + 0 + 2·3 = 7
    assert float(hessian_penalty((x**2 / 2 + 3 * x * y)[None, None])) == pytest.approx(7.0)
    z, y, x = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), torch.arange(8.0), indexing="ij")
    # f = z² + yz + 2xy: zz = 2, yz = 1, xy = 2 → 2 + 2·1 + 2·2 = 8
    assert float(hessian_penalty((z**2 + y * z + 2 * x * y)[None, None])) == pytest.approx(8.0)


def test_frobenius_hessian_values_and_rotation_invariance():
    """The Frobenius norm of a quadratic's (constant) Hessian; a rotated structure costs the same."""
    y, x = torch.meshgrid(
        torch.arange(10.0, dtype=torch.float64), torch.arange(12.0, dtype=torch.float64), indexing="ij"
    )
    # f = x² + xy − 1.5 y²: Hessian [[2, 1], [1, −3]] → √(4 + 1 + 1 + 9) = √15 (entries: 7)
    f = (x**2 + x * y - 1.5 * y**2)[None, None]
    assert float(hessian_penalty(f, norm="frobenius")) == pytest.approx(15**0.5)
    assert float(hessian_penalty(f)) == pytest.approx(7.0)
    # x² and ((x + y)/√2)², the same ridge at 0° and 45°: Frobenius 2 for both, entries 2 and 4
    along, diagonal = (x**2)[None, None], ((x + y) ** 2 / 2)[None, None]
    assert float(hessian_penalty(along, norm="frobenius")) == pytest.approx(2.0)
    assert float(hessian_penalty(diagonal, norm="frobenius")) == pytest.approx(2.0)
    assert float(hessian_penalty(diagonal)) == pytest.approx(2 * float(hessian_penalty(along)))
    # 3D, z step 3: f = z² in physical units has ∂²f/∂z² = 2 on every voxel
    z = torch.arange(8, dtype=torch.float64) * 3
    volume = (z**2)[:, None, None].expand(8, 6, 6)[None, None]
    assert float(hessian_penalty(volume, spacing=(3.0, 1.0, 1.0), norm="frobenius")) == pytest.approx(2.0)
    # per sample, and a flat estimate keeps a finite gradient
    flat = torch.zeros(2, 1, 5, 6, requires_grad=True)
    value = hessian_penalty(flat, norm="frobenius", per_sample=True)
    value.sum().backward()
    assert value.shape == (2,) and torch.isfinite(flat.grad).all()
    with pytest.raises(ValueError, match="norm must be 'entries' or 'frobenius'"):
        hessian_penalty(f, norm="nuclear")


def test_ssim_loss_zero_for_identical_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 32, 32, generator=g)
    assert float(ssim_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(ssim_loss(a, torch.rand(1, 1, 32, 32, generator=g))) > 0.5
    v = torch.rand(1, 1, 16, 24, 24, generator=g)
    assert float(ssim_loss(v, v)) == pytest.approx(0.0, abs=1e-6)


def test_ssim_loss_equals_the_reference_implementation():
    """Values of pytorch-msssim 1.0.0 (11-px window, σ 1.5), which the fit used before."""
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 1, 24, 28, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.rand(2, 1, 24, 28, generator=g, dtype=torch.float64)) / 1.2
    k2 = torch.tensor([0.03, 0.3], dtype=torch.float64)
    reference = torch.tensor([0.030747451545116267, 0.02208794157611338], dtype=torch.float64)
    torch.testing.assert_close(ssim_loss(a, b, k2=k2, per_sample=True), reference, rtol=0, atol=1e-12)
    v = torch.rand(1, 1, 13, 20, 22, generator=g, dtype=torch.float64)
    w = (v + 0.2 * torch.rand(1, 1, 13, 20, 22, generator=g, dtype=torch.float64)) / 1.2
    assert float(ssim_loss(v, w)) == pytest.approx(0.030461824291907025, abs=1e-12)


@pytest.mark.parametrize("spacing", [(3.0, 1.0, 1.0), (0.6, 0.2, 0.2), (2.0, 1.0)])
def test_ssim_window_has_one_physical_width(spacing):
    """Each axis's window has a physical standard deviation of 1.5 finest-axis pixels.

    Within 10 %: a Gaussian of σ 0.5 sampled at whole planes has a standard deviation of
    0.46 planes. An isotropic window on these axes would be 2–3× too wide.
    """
    finest = min(spacing)
    for window, step in zip(ssim_windows(len(spacing), spacing), spacing):
        radius = window.numel() // 2
        offsets = (torch.arange(-radius, radius + 1, dtype=torch.float64) * step / finest) ** 2
        assert float((window.double() * offsets).sum()) ** 0.5 == pytest.approx(1.5, rel=0.1)
        assert float(window.sum()) == pytest.approx(1.0)
    assert [w.numel() for w in ssim_windows(3, (3.0, 1.0, 1.0))] == [5, 11, 11]
    assert [w.numel() for w in ssim_windows(2)] == [11, 11]


def _column(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64).reshape(1, 1, 1, 1)


def test_variance_stabilised_noise_is_uniform_and_slope_is_one_at_the_mean():
    """Poisson-Gaussian noise (gain 2, floor 9) at signals 20–20,000: one noise std after
    the transform (measured within 2 %, against a 28× spread of the raw std), and the
    slope is 1 at the mean signal, where the transform and the intensity agree to first
    order."""
    gain, floor, level = _column(2.0), _column(9.0), _column(10.0)
    rng = torch.Generator().manual_seed(0)
    stds, raw = [], []
    for signal in (20.0, 200.0, 2000.0, 20000.0):
        counts = torch.poisson(torch.full((1, 1, 200, 200), signal / 2, dtype=torch.float64), generator=rng)
        noisy = (2 * counts + 3 * torch.randn(counts.shape, generator=rng, dtype=torch.float64)).clamp_min(0)
        stds.append(float(variance_stabilised(noisy, gain, floor, level).std()))
        raw.append(float(noisy.std()))
    assert max(raw) / min(raw) > 20
    assert max(stds) / min(stds) < 1.06, stds
    x = level.clone().requires_grad_()
    variance_stabilised(x, gain, floor, level).backward()
    assert float(x.grad) == pytest.approx(1.0, rel=1e-9)


def test_variance_stabilised_without_shot_noise_is_the_intensity():
    x = torch.linspace(0, 2, 50, dtype=torch.float64).reshape(1, 1, 5, 10)
    y = variance_stabilised(x, _column(0.0), _column(1e-4), _column(0.5))
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-9)


def test_variance_stabilised_slope_at_zero_is_bounded():
    """Pure shot noise (floor ≈ 0) would make the slope at 0 infinite (√x): the least
    offset (half the mean) keeps it at √3 × the slope at the mean."""
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    variance_stabilised(x, _column(1.0), _column(1e-9), _column(0.2)).backward()
    assert float(x.grad) == pytest.approx(3**0.5, rel=1e-9)


def test_sparsity():
    assert float(sparsity_penalty(torch.tensor([[-1.0, 3.0]]))) == 2.0


def test_generator_parameter_count_matches_paper():
    assert count_parameters(Generator(2)) == 322_913


@pytest.mark.parametrize("shape", [(45, 67), (13, 30, 21)])
def test_generator_output_shape_and_range(shape):
    """Any input size; softplus output positive, the paper's sigmoid within (0, 1)."""
    torch.manual_seed(0)
    with torch.no_grad():
        out = Generator(len(shape))(torch.rand(1, 16, *shape))
        paper = Generator(len(shape), GeneratorConfig(output="sigmoid"))(torch.rand(1, 16, *shape))
    assert out.shape == paper.shape == (1, 1, *shape)
    assert float(out.min()) > 0
    assert 0 <= float(paper.min()) and float(paper.max()) <= 1


def test_voxel_strides_keep_z_until_the_levels_are_near_isotropic():
    """nnU-Net's rule: an axis is halved only while its spacing is under twice the finest."""
    iso, keep_z = (2, 2, 2), (1, 2, 2)
    assert voxel_strides((3.0, 1.0, 1.0)) == (keep_z, iso, iso, iso)  # spacing 3:2:2 after level 0
    assert voxel_strides((2.0, 0.5, 0.5)) == (keep_z, keep_z, iso, iso)  # 4× keeps z twice
    assert voxel_strides((1.9, 1.0, 1.0)) == (iso,) * 4
    assert voxel_strides((0.3, 0.3)) == ((2, 2),) * 4


def test_generator_with_z_strides_pads_z_less_and_keeps_any_size():
    """Strides (1, 2, 2) at the first level: z is padded to a multiple of 8, not 16; the
    output has the input's shape; the isotropic strides spelled out are the default net."""
    config = GeneratorConfig(strides=voxel_strides((3.0, 1.0, 1.0)))
    assert config.multiples(3) == (8, 16, 16) and GeneratorConfig().multiples(3) == (16, 16, 16)
    torch.manual_seed(0)
    x = torch.rand(1, 16, 13, 30, 21)
    with torch.no_grad():
        out = Generator(3, config)(x)
        torch.manual_seed(1)
        default = Generator(3)(x)
        torch.manual_seed(1)
        spelled = Generator(3, GeneratorConfig(strides=voxel_strides((1.0, 1.0, 1.0))))(x)
    assert out.shape == (1, 1, 13, 30, 21) and bool(torch.isfinite(out).all())
    assert torch.equal(default, spelled)
    with pytest.raises(ValueError, match="1 or 2 per axis for each of the 4 levels"):
        GeneratorConfig(strides=((1, 2, 2),))


def test_hessian_with_voxel_size_measures_physical_curvature():
    """f = z² in physical units: sampled at a z step of 3 or of 1, the penalty is the same."""
    from cider.losses import hessian_penalty

    def sampled(step, n):
        z = torch.arange(n, dtype=torch.float64) * step
        return (z**2)[:, None, None].expand(n, 6, 6)[None, None]

    coarse = hessian_penalty(sampled(3.0, 8), spacing=(3.0, 1.0, 1.0))
    fine = hessian_penalty(sampled(1.0, 24), spacing=(1.0, 1.0, 1.0))
    torch.testing.assert_close(coarse, fine)
    # Without the voxel size, the coarse axis is penalised 9× too much.
    torch.testing.assert_close(hessian_penalty(sampled(3.0, 8)), 9 * fine)
