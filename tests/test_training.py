"""Feature-extractor training: kernels, broadened degradations, reproducibility."""

import hashlib

import numpy as np
import pytest
import torch

from cider.training import (
    TrainConfig,
    _poisson,
    _rl_features,
    defocus_kernel,
    gaussian_kernel,
    motion_kernel,
    random_kernel,
    train_feature_extractor,
)


def _images(count: int = 3, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.random((size, size)).astype(np.float32) for _ in range(count)]


SMALL = {"steps": 4, "batch_size": 2, "patch_size": 32, "kernel_size": 11}


@pytest.mark.parametrize("make", [motion_kernel, gaussian_kernel, defocus_kernel])
def test_kernels_are_non_negative_sum_one_and_fill_their_grid(make):
    rng = np.random.default_rng(0)
    for _ in range(5):
        kernel = make(rng, 31)
        assert kernel.shape == (31, 31)
        assert kernel.min() >= 0
        assert kernel.sum() == pytest.approx(1.0, abs=1e-9)


def test_defocus_kernel_is_a_centred_disc():
    kernel = defocus_kernel(np.random.default_rng(1), 31)
    grid = np.arange(31) - 15
    assert (kernel * grid[:, None]).sum() == pytest.approx(0, abs=1e-6)  # centred
    assert (kernel * grid[None, :]).sum() == pytest.approx(0, abs=1e-6)
    assert kernel[15, 15] == pytest.approx(kernel.max(), rel=0.05)  # flat top, not a ring
    assert np.allclose(kernel, kernel.T, atol=1e-9)  # round


def test_kernel_mix_picks_only_the_kernels_it_names():
    rng = np.random.default_rng(2)
    discs = [random_kernel(rng, 21, (0.0, 0.0, 1.0)) for _ in range(4)]
    assert all(np.allclose(k, k.T, atol=1e-9) and np.allclose(k, k[::-1], atol=1e-9) for k in discs)
    with pytest.raises(ValueError, match="kernel_mix"):
        TrainConfig(kernel_mix=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="deconvolution"):
        TrainConfig(deconvolution="tikhonov")


def test_poisson_noise_has_the_drawn_photon_statistics():
    flat = torch.full((4, 1, 64, 64), 0.5)
    config = TrainConfig(poisson_fraction=1.0, photons=(400.0, 400.0))
    noisy = _poisson(flat, config, np.random.default_rng(0))
    assert float(noisy.mean()) == pytest.approx(0.5, rel=0.01)
    assert float(noisy.var()) == pytest.approx(0.5 / 400, rel=0.05)  # var = signal / photons
    untouched = _poisson(flat, TrainConfig(), np.random.default_rng(0))
    assert untouched is flat


def test_rl_in_training_is_the_restoration_rl_and_passes_gradients():
    from cider.rl import BlurOperator, from_positive, richardson_lucy, to_positive
    from cider.training import FEATURE_OFFSET

    rng = np.random.default_rng(3)
    kernels = torch.from_numpy(np.stack([gaussian_kernel(rng, 9), motion_kernel(rng, 9)]).astype(np.float32))
    truth = torch.full((2, 3, 32, 32), 0.2)
    truth[..., 8::8, 8::8] = 3.0  # sparse spots, which RL sharpens
    blurred = torch.stack([BlurOperator(k, (32, 32), "periodic").forward(t) for k, t in zip(kernels, truth)])
    features = blurred.clone().requires_grad_(True)
    deconvolved = _rl_features(features, kernels, 30)
    for b, kernel in enumerate(kernels):  # the batched RL is the package's RL, patch by patch
        positive, low, scale = to_positive(blurred[b], FEATURE_OFFSET, 2)
        alone = from_positive(
            richardson_lucy(positive, kernel, 30, boundary="periodic"), low, scale, FEATURE_OFFSET
        )
        assert torch.allclose(deconvolved[b].detach(), alone, atol=1e-4)
    error = float((deconvolved.detach() - truth).abs().mean())
    assert error < 0.7 * float((blurred - truth).abs().mean())
    deconvolved.sum().backward()
    assert features.grad is not None and float(features.grad.abs().sum()) > 0


def test_training_is_reproducible_with_every_degradation_on():
    config = TrainConfig(
        **SMALL, kernel_mix=(0.4, 0.3, 0.3), poisson_fraction=0.5, deconvolution="rl", rl_iterations=3
    )
    first, record = train_feature_extractor(_images(), config, log=lambda line: None)
    second, _ = train_feature_extractor(_images(), config, log=lambda line: None)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert record["config"]["deconvolution"] == "rl"
    assert record["config"]["poisson_fraction"] == 0.5


def test_shipped_weights_load_by_name_and_an_unknown_name_lists_them(tmp_path, monkeypatch):
    from cider.features import load_feature_extractor

    monkeypatch.chdir(tmp_path)  # no local file of that name: the package's is used
    by_name = load_feature_extractor("features_rl10.pt")
    default = load_feature_extractor()
    assert any(
        not torch.equal(value, default.state_dict()[key]) for key, value in by_name.state_dict().items()
    )
    torch.save(default.state_dict(), tmp_path / "features_rl10.pt")  # a local file comes first
    local = load_feature_extractor("features_rl10.pt")
    assert all(torch.equal(value, default.state_dict()[key]) for key, value in local.state_dict().items())
    with pytest.raises(
        FileNotFoundError, match=r"features_rl11.pt.*shipped: \['features.pt', 'features_rl10.pt'\]"
    ):
        load_feature_extractor("features_rl11.pt")


def test_weights_digest_tells_files_apart_by_content(tmp_path, monkeypatch):
    from cider import RestoreConfig
    from cider.features import weights_digest
    from cider.restore import feature_weights_digest

    monkeypatch.chdir(tmp_path)
    default, retrained = weights_digest(), weights_digest("features_rl10.pt")
    assert len(default) == 64 and default != retrained
    (tmp_path / "copy.pt").write_bytes(bytes.fromhex("00"))  # another content under any name
    assert weights_digest("copy.pt") == hashlib.sha256(b"\x00").hexdigest()
    assert feature_weights_digest(RestoreConfig()) == default
    assert feature_weights_digest(RestoreConfig(generator_input="features_image")) == default
    assert feature_weights_digest(RestoreConfig(feature_weights="features_rl10.pt")) == retrained
    assert feature_weights_digest(RestoreConfig(generator_input="image_rl")) is None
    assert feature_weights_digest(RestoreConfig(generator_input="noise")) is None
