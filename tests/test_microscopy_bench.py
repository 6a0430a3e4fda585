"""The microscopy benchmark's scorer and cases: values, not only "it ran"."""

import sys

import numpy as np
import pytest
import torch

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
microscopy = pytest.importorskip("microscopy")
from microscopy_data import load_case  # noqa: E402


@pytest.fixture(scope="module")
def case():
    return load_case("fluo2d_low")


def test_truth_scores_perfectly_and_blur_does_not(case):
    perfect = microscopy.score(case.truth, case)
    assert perfect["flux_err"] == 0 and perfect["spot_err"] == 0
    assert perfect["flat_std"] < 0.01  # "flat" allows 0.5 % of the range of spread
    assert perfect["ssim"] == pytest.approx(1.0)
    blurred = microscopy.score(case.observation, case)
    assert blurred["psnr"] < 25 and blurred["spot_err"] > 10


def test_background_removed_rows_are_scored_against_the_signal(case):
    """A result that leaves the known flat background out has exact photometry against
    the signal, and is not charged for the background's light (it was, before)."""
    assert case.background == pytest.approx(0.02 * 60)  # fluo2d_low: 60 photons at value 1
    signal = case.truth - case.background
    removed = microscopy.score(signal, case, background_removed=True)
    assert removed["flux_err"] == 0 and removed["spot_err"] == removed["spot_bias"] == 0
    assert removed["photometry_vs"] == "signal"
    as_before = microscopy.score(signal, case)
    assert as_before["flux_err"] < -5 and as_before["photometry_vs"] == "truth"
    assert as_before["spot_bias"] == -as_before["spot_err"] < 0  # the beads' pedestal is missing
    assert removed["psnr"] == as_before["psnr"]  # the fit's offset absorbs the level


@pytest.mark.parametrize("field", ["background", "spot_oracle"])
def test_case_cache_keeps_every_field_and_rebuilds_an_older_file(case, tmp_path, field):
    import json

    cached = load_case("fluo2d_low", cache=tmp_path)
    again = load_case("fluo2d_low", cache=tmp_path)
    assert again.background == cached.background == case.background
    assert again.spot_oracle == cached.spot_oracle == case.spot_oracle and len(case.spot_oracle) == len(
        case.spots
    )
    path = tmp_path / "fluo2d_low.npz"
    with np.load(path) as f:  # as written before the field existed
        arrays = {k: f[k] for k in ("observation", "psf", "truth")}
        meta = {k: v for k, v in json.loads(str(f["meta"])).items() if k != field}
    np.savez_compressed(path, **arrays, meta=json.dumps(meta))
    rebuilt = load_case("fluo2d_low", cache=tmp_path)
    assert rebuilt.background == case.background and rebuilt.spot_oracle == case.spot_oracle


def test_spot_oracle_measures_the_spots_own_excess_light():
    """Data with one spot 10 % brighter than the truth (and no noise) gives that spot an
    oracle error of +0.1 and its neighbour 0, whatever the PSF's asymmetry: the template
    sits where the blur puts the spot's light."""
    from microscopy_data import oracle_spot_errors

    from cider.rl import BlurOperator

    rng = np.random.default_rng(0)
    psf = rng.random((5, 7)) + 0.1
    psf /= psf.sum()
    signal = np.zeros((40, 40))
    spots = [(15, 12), (22, 27)]
    for spot in spots:
        signal[spot[0] - 1 : spot[0] + 2, spot[1] - 1 : spot[1] + 2] = rng.uniform(5, 10, (3, 3))
    brighter = signal.copy()
    brighter[13:18, 10:15] *= 1.1  # the first spot's box (radius 2)
    shape = tuple(n - k + 1 for n, k in zip(signal.shape, psf.shape))
    blur = BlurOperator(torch.tensor(psf), shape, "valid")
    expected, observation = (blur(torch.tensor(a + 1.0)).numpy() for a in (signal, brighter))
    errors = oracle_spot_errors(signal, psf, expected, observation, spots, read_noise=1.0)
    assert errors == pytest.approx((0.1, 0.0), abs=1e-9)


def test_spot_floor_reports_the_oracle_on_the_blurred_row(case):
    floor = microscopy.spot_floor(case)
    assert set(floor) == {"spot_floor", "spot_floor_bias"} and 0 < floor["spot_floor"] < 50
    assert microscopy.spot_floor(microscopy.Case("none", case.observation, case.psf, case.truth)) == {}


def test_tiled_row_with_one_tile_is_the_whole_image_restore(case, monkeypatch):
    """The tiled row hands every tile the whole image's background, scale, noise, mean
    signal and feature range: with one tile it must give the whole-image result."""
    settings = {
        **microscopy.MODALITY_SETTINGS["case"](case.name),
        "background": {"enabled": True, "method": "flat"},
    }
    _, whole = microscopy.cider_scores(case, "cider", 5, "cpu", settings)
    monkeypatch.setattr(microscopy, "TILED_PARTS", 1)
    config = microscopy.cider_config("cider", 5, "cpu", settings)
    tiled, tiles, blend = microscopy.tiled_restore(case, config)
    assert len(tiles) == 1
    np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-4 * float(np.ptp(whole)))
    assert microscopy.tiled_difference(tiled, whole, tiles, blend)["seam_voxels_pct"] == 0


def test_tiled_difference_finds_a_seam():
    from cider.tiling import tile_grid

    shape = (40, 40)
    tiles = tile_grid(shape, (20, 20), (6, 6), uniform=True)
    whole = np.random.default_rng(0).random(shape)
    assert microscopy.tiled_difference(whole, whole, tiles, (3, 3))["rms_diff_pct"] == 0
    seam = whole.copy()
    seam[:, 17:23] += 0.1  # a step where the two columns of tiles blend
    d = microscopy.tiled_difference(seam, whole, tiles, (3, 3))
    assert d["core_rms_diff_pct"] == 0 and d["seam_rms_diff_pct"] > 5 and d["tiles"] == 4


def test_case_is_deterministic_and_flux_consistent(case):
    again = load_case("fluo2d_low")
    np.testing.assert_array_equal(case.observation, again.observation)
    # The blur keeps flux: the observation's sum is close to the truth's on the same field.
    assert abs(case.observation.sum() / case.truth.sum() - 1) < 0.05


def test_rl_baseline_beats_the_blurred_input(case):
    rl = microscopy.rl_scores(case, "cpu")
    assert rl["psnr"] > microscopy.score(case.observation, case)["psnr"] + 2
    assert rl["iterations"] in microscopy.RL_CHECKPOINTS


def test_scorer_ignores_gain_for_psnr_but_not_for_flux(case):
    x = torch.tensor(case.truth).numpy() * 2
    s = microscopy.score(x, case)
    assert s["psnr"] > 100 and s["flux_err"] == pytest.approx(100.0)


def test_schedules_table_names_the_fewest_iterations_within_a_tenth_of_a_db():
    import schedules

    from cider.workflow import load_config

    def row(seed, schedule, psnr, iterations=None):
        it = iterations or schedule
        return {
            "case": "c",
            "seed": seed,
            "schedule": schedule,
            "psnr": psnr,
            "ssim": 0.5,
            "flat_std": 1.0,
            "iterations": it,
        }

    rows = [row(None, 100, 25.80), row(None, 250, 25.95), row(None, 1000, 26.0)]
    rows += [row(7, 100, 27.0), row(7, 250, 26.5), row(7, 1000, 26.0), row(7, "config: 3000 it.", 26.1, 1480)]
    lines = schedules.table(rows, (100, 250, 1000)).splitlines()
    assert lines[-3].startswith("| c | case |") and lines[-3].endswith("| – | 250 |")
    assert lines[-2].endswith("| 26.10 / 0.500 / 1.00 [1480] | 100 |")
    assert "**26.40 / 0.500 / 1.00**" in lines[-1]  # mean of 25.80 and 27.0
    shipped = load_config(schedules.PLANKTON_CONFIG)["restore"]  # as the pipeline reads it
    assert schedules.settings("plankton2d").iterations == shipped["iterations"]


def test_set_overrides_are_typed_like_the_config_and_name_a_bad_item():
    """One ``--set`` parser for every bench: values typed by the RestoreConfig default,
    plain strings kept, unknown or refused keys and unreadable values stop with the item."""
    from overrides import parse_overrides

    parsed = parse_overrides(
        [
            "data_weight=100",
            "keep_best=false",
            "generator_input=noise",
            "feature_weights=features_rl10.pt",
            "lr_milestones=0.5,0.9",
            "seed=3",
        ]
    )
    assert parsed == {
        "data_weight": 100.0,
        "keep_best": False,
        "generator_input": "noise",
        "feature_weights": "features_rl10.pt",
        "lr_milestones": (0.5, 0.9),
        "seed": 3,
    }
    assert isinstance(parsed["data_weight"], float) and isinstance(parsed["seed"], int)
    assert parse_overrides(["feature_weights=none", "lr_milestones=[0.6]"]) == {
        "feature_weights": None,
        "lr_milestones": (0.6,),
    }
    with pytest.raises(SystemExit, match="--set hesian_weight=1: give KEY=VALUE with KEY one of"):
        parse_overrides(["hesian_weight=1"])
    with pytest.raises(SystemExit, match="--set iterations=5: give KEY=VALUE"):
        parse_overrides(["iterations=5"], refused=("iterations",))
    with pytest.raises(SystemExit, match="--set keep_best=maybe: 'maybe' is not true/false"):
        parse_overrides(["keep_best=maybe"])
    with pytest.raises(SystemExit, match="--set seed=1.5"):
        parse_overrides(["seed=1.5"])
    with pytest.raises(SystemExit, match="--set data_weight: give KEY=VALUE"):
        parse_overrides(["data_weight"])
    # the background's keys, dotted, go into one dict that RestoreConfig.with_ merges
    background = parse_overrides(["background.enabled=true", "background.method=flat", "data_weight=1"])
    assert background == {"background": {"enabled": True, "method": "flat"}, "data_weight": 1.0}
    with pytest.raises(SystemExit, match="--set background.flat_threshold=high"):
        parse_overrides(["background.flat_threshold=high"])


def test_seed_summary_states_spread_and_ensemble_gain():
    import seeds

    rows = [
        {
            "seed": s,
            "psnr": p,
            "ssim": 0.5,
            "flat_std": 1.0,
            "ensemble": {"psnr": e, "ssim": 0.6, "flat_std": 1.0},
        }
        for s, p, e in ((0, 26.0, 26.0), (1, 26.4, 26.5), (2, 26.2, 26.6))
    ]
    s = seeds.summary({"case": "c", "iterations": 10, "rows": rows})
    assert s["psnr_mean"] == pytest.approx(26.2) and s["psnr_std"] == pytest.approx(0.2)
    assert s["ensemble_psnr"] == 26.6 and s["ensemble_gain_db"] == pytest.approx(0.4)
    line = seeds.table([{"case": "c", "iterations": 10, "rows": rows}], "cpu").splitlines()[8]
    assert line == "| c | 10 | 3 | 26.20 ± 0.20 (26.00–26.40) | 0.500 | 26.60 / 0.600 | +0.40 |"


@pytest.mark.parametrize("spec", sorted((ROOT / "bench" / "sweeps").glob("*.json")), ids=lambda p: p.stem)
def test_every_sweep_spec_names_known_cases_methods_and_settings(spec):
    """A sweep spec is what a 15-minute GPU lease runs: a misspelt case, method or setting
    must fail here, not on the device. Each config's settings build a RestoreConfig."""
    import json

    from microscopy_data import CASES
    from overrides import parse_overrides

    from cider import RestoreConfig
    from cider.features import weights_source

    sweep = json.loads(spec.read_text())
    assert set(sweep["cases"]) <= set(CASES) and set(sweep["methods"]) <= set(microscopy.METHODS)
    assert sweep["iterations"] > 0 and sweep["configs"]
    for name, setting in sweep["configs"].items():
        setting = {"set": setting} if isinstance(setting, list) else setting
        assert set(setting) <= {"set", "methods", "cases", "args", "iterations"}, name
        assert set(setting.get("cases", [])) <= set(sweep["cases"]), name
        assert set(setting.get("methods", [])) <= set(microscopy.METHODS), name
        assert all(
            a.startswith(("--least-offset", "--modality")) or not a.startswith("--")
            for a in setting.get("args", [])
        ), name
        microscopy.main_parser().parse_args(setting.get("args", []))  # arguments microscopy.py takes
        overrides = parse_overrides(setting.get("set", []), refused=("iterations", "device", "progress"))
        config = RestoreConfig().with_(**overrides)
        if config.feature_weights is not None:
            weights_source(config.feature_weights)  # a shipped name or an existing file


def test_keep_best_bench_picks_what_each_rule_judges_best():
    """bench/keep_best.py's rules on a made-up log (blocks of 3): the own loss picks the
    one-iteration dip, the block mean the start of a spike, ``block`` (the larger of the
    two, as the library judges it) the steady block between them."""
    import keep_best

    losses = [5, 5, 5, 4, 4, 1, 2.5, 2.5, 2.5, 1, 1, 4]  # a dip, a steady block, a spike's start
    picked = keep_best.picks(losses, logged=[2, 5, 8, 11], log_every=3)
    assert picked == {"loss": 1, "mean": 3, "block": 2, "last": 3}


def test_bead_oracle_recovers_noise_free_amplitudes_and_sets_the_noise_floor():
    """bench/beads.py's oracle (bead positions, PSF and background known, Poisson ML
    amplitudes) finds the amplitudes of a noise-free field exactly, with and without a
    background, and on a noisy one is off by what the noise sets: 4.31 % on the 400-photon
    seed-0 field, whose beads hold 240–400 photons, and 5.93 % on issue #12's own field
    (25 beads of 660–1,100 photons on 100 photons per pixel of background)."""
    import beads

    from cider.rl import BlurOperator

    for name, floor in [("field_400_s0", 4.31), ("issue_25_bg100", 5.93)]:
        observation, psf, signal, spots, background = beads.load_field(name)
        fitted = beads.oracle(observation, psf, spots, background)
        assert beads.spot_error(fitted, signal, spots) == pytest.approx(floor, abs=0.05)
        # the same beads without noise: the object (background outside the field) blurred
        blur = BlurOperator(torch.tensor(psf), observation.shape, "valid")
        noise_free = blur(torch.tensor(np.pad(signal, psf.shape[0] // 2) + background)).numpy()
        assert beads.spot_error(beads.oracle(noise_free, psf, spots, background), signal, spots) < 0.01


def test_a_seed_draws_the_same_noise_whatever_the_fft_round_off():
    """numpy's Poisson sampler draws no random number for a mean of 0 and at least one for
    any positive mean, so FFT round-off of either sign in a bead field's dark region (which
    CPU decides it) once shifted the stream for every later pixel: one seed, two bead
    fields (oracle spot error 4.53 % on an Intel Xeon against 5.14 % on an AMD EPYC).
    ``noise_free`` sets that round-off to 0, so the draw does not depend on it."""
    from microscopy_data import bead_field, noise_free

    from cider.rl import BlurOperator

    observation, psf, truth, _ = bead_field(seed=0, photons=400.0, gap=10)
    blurred = BlurOperator(torch.tensor(psf), observation.shape, "valid")(
        torch.tensor(np.pad(truth, psf.shape[0] // 2))
    ).numpy()
    dark = np.abs(blurred) < 1e-12 * blurred.max()
    assert dark.sum() > 100  # the field has a dark region, where round-off decides
    rounded = [np.where(dark, sign * 1e-15 * blurred.max(), blurred) for sign in (1.0, -1.0)]
    draws = [np.random.default_rng(0).poisson(noise_free(mean)) for mean in rounded]
    assert np.array_equal(*draws)
    # without the clean-up the two round-offs give two different draws
    plain = [np.random.default_rng(0).poisson(np.clip(mean, 0, None)) for mean in rounded]
    assert not np.array_equal(*plain)
    # and the field drawn here is the one every CPU draws (sum of its photons)
    assert observation.sum() == 4066.0


def test_background_light_rows_say_how_much_light_each_estimate_takes():
    """bench/background_light.py on fluo2d_low and #12's field: the wavelet background
    takes most of the signal's light (96.7 / 88.7 % measured), the flat level little
    (−0.9 / −12.4 %: on the bead field it is 0.30 photons low, which is 12 % of the
    beads' light)."""
    background_light = pytest.importorskip("background_light")
    rows = {
        case[0]: background_light.measure(*case)
        for case in background_light.cases()
        if case[0]
        in (
            "fluo2d_low",
            "issue_25_bg100",
        )
    }
    assert rows["fluo2d_low"]["wavelet_takes_pct"] > 90 and abs(rows["fluo2d_low"]["flat_takes_pct"]) < 5
    assert (
        rows["issue_25_bg100"]["wavelet_takes_pct"] > 80
        and abs(rows["issue_25_bg100"]["flat_takes_pct"]) < 15
    )
    assert "| fluo2d_low | 1.2 |" in background_light.table(list(rows.values()))


def test_objective_bench_scores_the_loss_at_the_truth_and_its_minimum(tmp_path):
    """bench/objective.py: the loss at the truth and at its minimum over the voxels, on
    fluo2d_low; the minimiser improves on the blurred input and lowers the loss."""
    objective = pytest.importorskip("objective")
    results = objective.main(
        ["--cases", "fluo2d_low", "--voxels-only", "--voxel-iterations", "500", "--out", str(tmp_path)]
    )
    rows = results["cases"]["fluo2d_low"]["rows"]
    assert set(rows) == {"truth", "voxels"}
    # the truth fits the data at the noise level
    assert rows["truth"]["loss"]["chi2"] == pytest.approx(1.0, abs=0.15)
    blurred = microscopy.score(load_case("fluo2d_low").observation, load_case("fluo2d_low"))
    assert rows["voxels"]["psnr"] > blurred["psnr"] + 1
    # the minimiser reaches a lower loss than the truth's: the loss prefers another estimate
    assert rows["voxels"]["loss"]["total"] < rows["truth"]["loss"]["total"]
    assert "| voxels |" in (tmp_path / "objective.md").read_text()
    start = torch.full((12, 12), 0.5)
    prepared = objective.prepare(
        np.full((8, 8), 0.5), np.ones((5, 5)) / 25, objective.RestoreConfig(device="cpu")
    )
    assert (
        objective.minimise_voxels(start, prepared, objective.RestoreConfig(device="cpu"), 3, 0.01).min() >= 0
    )


def test_projected_sure_is_unbiased_for_a_linear_estimator():
    """bench/sure_weight.py: for x̂ = c Aᵀy under Gaussian noise, the mean over noise draws
    of the projected SURE (plus the truth's xᵀPx) equals the mean projected error
    ``|P(x̂ − x)|²`` within three standard errors; without its divergence term it is far off."""
    sure_weight = pytest.importorskip("sure_weight")
    from cider.psf import gaussian_psf
    from cider.rl import BlurOperator

    rng = np.random.default_rng(0)
    psf = torch.tensor(gaussian_psf(1.0, size=5), dtype=torch.float64)
    blur = BlurOperator(psf, (12, 12), boundary="valid")
    truth = torch.tensor(rng.random((16, 16)) * 10, dtype=torch.float64)
    sigma2 = 0.5

    def estimate(y):
        return 0.8 * blur.adjoint(y)

    def variance(blurred):
        return torch.full_like(blurred, sigma2)

    constant = sure_weight.projected_error(truth, blur)
    differences, without = [], []
    for draw in range(300):
        y = blur(truth) + torch.tensor(rng.normal(0, sigma2**0.5, (12, 12)))
        error = sure_weight.projected_error(estimate(y) - truth, blur)
        sure = sure_weight.projected_sure(y, blur, estimate, variance, probes=1, seed=draw)
        differences.append(sure + constant - error)
        without.append(sure_weight.projected_sure(y, blur, estimate, variance, probes=0) + constant - error)
    standard_error = np.std(differences) / np.sqrt(len(differences))
    assert abs(np.mean(differences)) < 3 * standard_error
    assert abs(np.mean(without)) > 10 * standard_error
