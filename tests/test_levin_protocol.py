"""The Levin scorer reproduces the reference numbers of shared/data/levin/README.md."""

import sys

import numpy as np
import pytest

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from levin_protocol import CROP, SIZE, _sse, _sse_integer, load_case, score, wiener  # noqa: E402

# (image, kernel): blurred PSNR/SSIM and Wiener PSNR/SSIM from the shared reference table
REFERENCE = {
    (1, 1): (24.13, 0.7367, 32.70, 0.9069),
    (2, 3): (24.69, 0.7176, 33.74, 0.9305),
    (3, 5): (27.03, 0.8558, 36.92, 0.9595),
    (4, 7): (21.87, 0.7098, 34.05, 0.9291),
    (1, 4): (19.53, 0.5894, 23.50, 0.6458),
    (3, 8): (20.12, 0.5732, 24.96, 0.7485),
}


@pytest.fixture
def levin(shared_data):
    return shared_data / "levin"


@pytest.mark.parametrize("pair", list(REFERENCE))
def test_per_image_reference(levin, pair):
    case = load_case(levin, *pair)
    blurred, wien = score(case.blurred, case.sharp), score(wiener(case), case.sharp)
    ref = REFERENCE[pair]
    assert blurred["psnr"] == pytest.approx(ref[0], abs=0.006) and blurred["ssim"] == pytest.approx(
        ref[1], abs=6e-5
    )
    assert wien["psnr"] == pytest.approx(ref[2], abs=0.006) and wien["ssim"] == pytest.approx(
        ref[3], abs=6e-5
    )


@pytest.mark.slow
def test_all_32_images_blurred_and_wiener_means(levin):
    cases = [load_case(levin, i, k) for i in range(1, 5) for k in range(1, 9)]
    blurred = [score(c.blurred, c.sharp) for c in cases]
    wien = [score(wiener(c), c.sharp) for c in cases]
    assert np.mean([s["psnr"] for s in blurred]) == pytest.approx(23.25, abs=0.01)
    assert np.mean([s["ssim"] for s in blurred]) == pytest.approx(0.699, abs=0.001)
    assert np.mean([s["psnr"] for s in wien]) == pytest.approx(31.13, abs=0.01)
    assert np.mean([s["ssim"] for s in wien]) == pytest.approx(0.8693, abs=2e-4)


@pytest.mark.parametrize("shift", [(0, 0), (-10, 10), (10, -3), (4, 7), (-10, -10)])
def test_integer_shift_search_equals_the_interpolating_one(shift):
    """The coarse alignment slices instead of interpolating: the same error, to the bit."""
    rng = np.random.default_rng(1)
    estimate, sharp = rng.random((255, 255)), rng.random((255, 255))
    target = sharp[CROP : CROP + SIZE, CROP : CROP + SIZE]
    assert _sse_integer(estimate, target, shift) == _sse(estimate, target, shift)[0]


def test_kernel_orientation_matters(levin):
    """Using the kernel as a convolution (not correlation) filter must score far worse."""
    case = load_case(levin, 1, 8)
    flipped = type(case)(
        case.image, case.kernel_index, case.sharp, case.blurred, case.kernel[::-1, ::-1].copy()
    )
    assert score(wiener(case), case.sharp)["psnr"] > score(wiener(flipped), case.sharp)["psnr"] + 3


def test_stored_results_are_reused_only_with_the_same_settings():
    """The bench recomputes a stored result made with other settings, and reads a result
    made before a setting existed as made with the bench's own value of it."""
    import levin

    baseline = levin.restore_config("cider", 500, "cpu", {})
    stored = levin.settings(baseline)
    assert levin.same_settings(stored, baseline, baseline)
    older = {key: value for key, value in stored.items() if key != "early_stop_tol"}
    assert levin.same_settings(older, baseline, baseline)
    swept = levin.restore_config("cider", 500, "cpu", {"hessian_weight": 0.06})
    assert not levin.same_settings(stored, swept, baseline)
    assert not levin.same_settings(levin.settings(baseline.with_(learning_rate=0.02)), baseline, baseline)
    assert not levin.same_settings(None, baseline, baseline)
    # A setting added later reads as its legacy value (the behaviour before it existed):
    # a result without "output" was made with the paper's sigmoid, not today's softplus.
    before = {key: value for key, value in stored.items() if key != "output"}
    assert not levin.same_settings(before, baseline, baseline)
    assert levin.same_settings(before, baseline.with_(output="sigmoid"), baseline)
    # The weights are compared by content: new weights under the old name (the default's
    # None, or a file name) do not reuse the old weights' results.
    replaced = {**stored, "feature_weights_sha256": "0" * 64}
    assert not levin.same_settings(replaced, baseline, baseline)
    undigested = {key: value for key, value in stored.items() if key != "feature_weights_sha256"}
    assert not levin.same_settings(undigested, baseline, baseline)
    image_rl = levin.restore_config("image_rl", 500, "cpu", {})  # no extractor: no digest
    assert levin.same_settings(
        {key: value for key, value in levin.settings(image_rl).items() if key != "feature_weights_sha256"},
        image_rl,
        image_rl,
    )
