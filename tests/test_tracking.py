"""Tracking metrics (calft.tracking) against hand computations, scipy and brute force, and the
test_within_range split (unseen parameters strictly inside the training box)."""
import math

import numpy as np
import pytest
from scipy import stats

from calft.families import get_family
from calft.splits import GRIDS
from calft.splits import get_split, spread_indices
from calft.support import build_support
from calft.tracking import exact_tracking, sample_tracking, summarize_tracking


def _brute_ks(sample_values, values, probs, num_answers=None) -> float:
    """max over every point x of |#{samples <= x}/n - sum_{v <= x} p(v)|, in pure Python
    (n = num_answers, default len(sample_values))."""
    points = sorted(set(sample_values) | set(values))
    best = 0.0
    for x in points:
        f_s = sum(1 for s in sample_values if s <= x) / (num_answers or len(sample_values))
        f_p = sum(p for v, p in zip(values, probs) if v <= x)
        best = max(best, abs(f_s - f_p))
    return best


def test_exact_tracking_moments_match_numpy_and_ks_vs_brute_force():
    sup = build_support("gaussian", {"mu": 1.0, "sigma": 0.7}, num_decimals=1, max_bins=1001)
    x = np.array([float(v) for v in sup.values])
    rng = np.random.default_rng(0)
    m = rng.dirichlet(np.ones(x.size))
    row = exact_tracking(sup, np.log(m))
    assert row["target_mean"] == pytest.approx(np.average(x, weights=sup.probs), abs=1e-12)
    assert row["target_sd"] == pytest.approx(math.sqrt(np.cov(x, aweights=sup.probs, ddof=0)), rel=1e-9)
    assert row["target_mean"] == pytest.approx(1.0, abs=0.01) and row["target_sd"] == pytest.approx(0.7, rel=0.03)
    assert row["model_mean"] == pytest.approx(np.average(x, weights=m), abs=1e-12)
    assert row["model_sd"] == pytest.approx(math.sqrt(np.cov(x, aweights=m, ddof=0)), rel=1e-9)
    assert row["mean_error_sd"] == pytest.approx(abs(row["model_mean"] - row["target_mean"]) / row["target_sd"])
    cdf_gap = max(abs(sum(m[: i + 1]) - sum(sup.probs[: i + 1])) for i in range(x.size))  # values ascend
    assert row["ks_exact"] == pytest.approx(cdf_gap, abs=1e-12)
    same = exact_tracking(sup, np.log(sup.probs))  # the model is the target
    assert same["ks_exact"] == pytest.approx(0.0, abs=1e-12) and same["mean_error_sd"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("family, params", [("binomial", {"n": 12, "p": 0.3}), ("exponential", {"lambda": 2.0})])
def test_sample_tracking_ks_matches_brute_force_and_scipy_moments(family, params):
    sup = build_support(family, params, num_decimals=1, max_bins=1001)
    x = np.array([float(v) for v in sup.values])
    rng = np.random.default_rng(1)
    draws = list(rng.choice(x, size=150, p=sup.probs)) + [x[-1] + 3.0]  # one value beyond the support
    row = sample_tracking(sup, draws)
    assert row["num_valid_samples"] == len(draws)
    assert row["sample_ks"] == pytest.approx(_brute_ks(draws, list(x), list(sup.probs)), abs=1e-12)
    assert row["sample_mean"] == pytest.approx(np.mean(draws)) and row["sample_sd"] == pytest.approx(np.std(draws))
    # draws from the target itself: KS small, like scipy's two-sample KS against a large draw
    big = rng.choice(x, size=200_000, p=sup.probs)
    assert abs(row["sample_ks"] - stats.ks_2samp(draws, big).statistic) < 0.02
    assert math.isnan(sample_tracking(sup, [])["sample_ks"])
    # every answer counted: 40 more answers that were not valid never arrive on the support
    every = sample_tracking(sup, draws, num_answers=len(draws) + 40)
    assert every["sample_ks_all"] == pytest.approx(_brute_ks(draws, list(x), list(sup.probs), len(draws) + 40),
                                                   abs=1e-12)
    assert every["sample_ks_all"] >= 40 / (len(draws) + 40) - 1e-12  # the CDF ends that far below 1
    assert sample_tracking(sup, draws, num_answers=len(draws))["sample_ks_all"] == pytest.approx(row["sample_ks"])
    assert sample_tracking(sup, [], num_answers=100)["sample_ks_all"] == pytest.approx(1.0)  # nothing valid
    assert "sample_ks_all" not in row
    with pytest.raises(ValueError, match="fewer than"):
        sample_tracking(sup, draws, num_answers=3)


def test_sample_ks_all_by_hand():
    """Binomial(2, 1/2): p = 1/4, 1/2, 1/4 on 0, 1, 2. Answers "1", "2", "2" and one that is not a
    number: F_all = 0, 1/4, 3/4 at 0, 1, 2 against 1/4, 3/4, 1; the largest gap is 1/2 at x = 1."""
    sup = build_support("binomial", {"n": 2, "p": 0.5}, num_decimals=0, max_bins=1001)
    assert [float(v) for v in sup.values] == [0.0, 1.0, 2.0]
    row = sample_tracking(sup, [1.0, 2.0, 2.0], num_answers=4)
    assert row["sample_ks_all"] == pytest.approx(0.5)
    assert row["sample_ks"] == pytest.approx(max(1 / 4, abs(1 / 3 - 3 / 4), 0.0))  # valid ones only: 5/12


def test_beyond_range_and_clipped_mean_by_hand():
    """Cauchy(1, 0.71) at 1 decimal: the target's values span the 0.1-multiples inside
    [ppf(0.001), ppf(0.999)] = 1 -/+ 0.71 tan(0.499 pi) (scipy). 99 answers "1.0" and one "139000":
    one answer beyond the range, the raw mean 1390.99, the clipped mean (99 + x_max) / 100."""
    sup = build_support("cauchy", {"x0": 1.0, "gamma": 0.71}, num_decimals=1, max_bins=100_000)
    x = [float(v) for v in sup.values]
    lo, hi = stats.cauchy(1.0, 0.71).ppf([0.001, 0.999])
    assert min(x) == pytest.approx(math.ceil(lo * 10) / 10) and max(x) == pytest.approx(math.floor(hi * 10) / 10)
    row = sample_tracking(sup, [1.0] * 99 + [139000.0])
    assert row["num_beyond_range"] == 1 and row["sample_mean"] == pytest.approx(1390.99)
    assert row["sample_clipped_mean"] == pytest.approx((99 + max(x)) / 100)
    # inside the range, clipping changes nothing; both edges count as inside
    edge = sample_tracking(sup, [min(x), 1.0, max(x)])
    assert edge["num_beyond_range"] == 0 and edge["sample_clipped_mean"] == pytest.approx(edge["sample_mean"])
    below = sample_tracking(sup, [min(x) - 0.1, 1.0])
    assert below["num_beyond_range"] == 1 and below["sample_clipped_mean"] == pytest.approx((min(x) + 1.0) / 2)
    assert sample_tracking(sup, [])["num_beyond_range"] == 0


def test_clipped_location_r2_and_beyond_range_rate_by_hand():
    """One family, target means 0, 1, 2, 3 (sd 1, SS_tot = 5), 10 valid samples each. The model's
    sample means are right but one wild answer moves the last to 103: raw R^2 = 1 - 100^2 / 5;
    clipped to the range its mean is 3.5: clipped R^2 = 1 - 0.25 / 5; 1 of 40 samples beyond."""
    rows = [{"family_id": "a", "target_mean": float(k), "target_sd": 1.0, "sample_mean": float(k),
             "sample_sd": 1.0, "sample_clipped_mean": float(k), "sample_mean_error_sd": 0.0, "sample_ks": 0.1,
             "num_valid_samples": 10, "num_beyond_range": 0} for k in range(4)]
    rows[3].update(sample_mean=103.0, sample_clipped_mean=3.5, num_beyond_range=1)
    s = summarize_tracking(rows)
    assert s["sample_location_r2"] == pytest.approx(1 - 100.0 ** 2 / 5)
    assert s["sample_clipped_location_r2"] == pytest.approx(1 - 0.25 / 5)
    assert s["beyond_range_rate"] == pytest.approx(1 / 40)
    assert s["per_family"]["a"]["beyond_range_rate"] == pytest.approx(1 / 40)


def _rows(model_mean, model_sd):
    """3 families x 4 prompts with target moments of different scales."""
    rows = []
    for f, scale in (("a", 1.0), ("b", 10.0), ("c", 0.1)):
        for k in range(4):
            t_mean, t_sd = scale * (k - 1.5), scale * (0.5 + 0.25 * k)
            rows.append({"family_id": f, "target_mean": t_mean, "target_sd": t_sd,
                         "model_mean": model_mean(f, t_mean, t_sd, scale), "model_sd": model_sd(t_sd),
                         "ks_exact": 0.1 * k, "mean_error_sd": 0.0})
    return rows


def test_summarize_tracking_perfect_ignoring_and_offset_models():
    perfect = summarize_tracking(_rows(lambda f, t, s, sc: t, lambda s: s))
    assert perfect["location_r2"] == pytest.approx(1.0) and perfect["location_slope"] == pytest.approx(1.0)
    assert perfect["scale_r2"] == pytest.approx(1.0) and perfect["sd_within_2x"] == 1.0
    assert perfect["median_ks"] == pytest.approx(0.15)
    # a model that knows each family's typical mean but ignores the parameters: R^2 0, slope 0
    ignoring = summarize_tracking(_rows(lambda f, t, s, sc: 0.0, lambda s: 3 * s))
    assert ignoring["location_r2"] == pytest.approx(0.0, abs=1e-12)
    assert ignoring["location_slope"] == pytest.approx(0.0, abs=1e-12)
    assert ignoring["sd_within_2x"] == 0.0
    # a constant offset of half a target sd: R^2 = 1 - n * 0.25 / SS_tot, slope stays 1
    rows = _rows(lambda f, t, s, sc: t + 0.5 * s, lambda s: s)
    off = summarize_tracking(rows)
    ss_tot = 0.0
    for f in "abc":
        fr = [r for r in rows if r["family_id"] == f]
        c = np.mean([r["target_mean"] for r in fr])
        ss_tot += sum(((r["target_mean"] - c) / r["target_sd"]) ** 2 for r in fr)
    assert off["location_r2"] == pytest.approx(1 - len(rows) * 0.25 / ss_tot)
    assert off["per_family"]["b"]["num_prompts"] == 4
    # a family whose target means do not vary (Student's t: all 0, up to float noise) has no R^2 or
    # slope of its own, but its errors still count in the pooled R^2
    flat = [{"family_id": "t", "target_mean": 1e-17 * k, "target_sd": 1.0, "model_mean": 0.5, "model_sd": 1.0,
             "ks_exact": 0.1, "mean_error_sd": 0.5} for k in range(3)]
    mixed = summarize_tracking(rows + flat)
    assert math.isnan(mixed["per_family"]["t"]["location_r2"]) and math.isnan(mixed["per_family"]["t"]["location_slope"])
    assert mixed["location_r2"] == pytest.approx(1 - (len(rows) * 0.25 + 3 * 0.25) / ss_tot)
    with pytest.raises(ValueError, match="no rows"):
        summarize_tracking([{"family_id": "a"}])


def test_within_range_split_is_unseen_and_inside_the_training_box():
    train = set(get_split("train", max_specs=10**6))
    within = get_split("test_within_range", max_specs=10**6)
    assert within and not train.intersection(within)
    for fid, grids in GRIDS.items():
        if "train" not in grids:
            assert "within_range" not in grids
            continue
        counts = {p.name for p in get_family(fid).params if p.integer}
        for axis_train, axis_mid, name in zip(grids["train"].axes, grids["within_range"].axes, grids["train"].names):
            assert axis_mid, (fid, name)
            assert not set(axis_mid) & set(axis_train), (fid, name)
            assert all(min(axis_train) < v < max(axis_train) for v in axis_mid), (fid, name)
            if name in counts:
                assert all(isinstance(v, int) for v in axis_mid), (fid, name)
    few = get_split("test_within_range", max_specs=3)
    assert len(few) == 3 * len({s.family_id for s in within})


@pytest.mark.parametrize("shape, k", [((10, 10), 3), ((10, 10), 6), ((3, 2, 2), 3), ((24,), 5), ((5, 5, 5), 4)])
def test_spread_indices_cover_every_axis(shape, k):
    idx = spread_indices(shape, k)
    assert len(idx) == k and len(set(idx)) == k and all(0 <= i < math.prod(shape) for i in idx)
    coords = np.array(np.unravel_index(idx, shape)).T
    for axis, n in enumerate(shape):
        assert len(set(coords[:, axis])) == min(n, k), (axis, coords)


def test_missed_targets_names_every_miss():
    from calft.tracking import missed_targets

    tracking = {"sample_location_r2": 0.95, "sample_sd_within_2x": 0.7, "median_sample_ks": 0.15,
                "in_support_rate": 0.9, "location_r2": 0.5,  # exact R^2: not a target any more
                "per_family": {"a": {"sample_location_slope": 0.9, "median_sample_ks_all": 0.3},
                               "b": {"sample_location_slope": 0.5, "median_sample_ks_all": 0.6},
                               "c": {"sample_location_slope": 0.1, "perfect_location_slope": 0.953,
                                     "perfect_slope_sd": 0.404},
                               "t": {"sample_location_slope": float("nan")}}}  # no slope (constant targets)
    base = {"per_family": {"a": {"median_sample_ks_all": 0.99}, "b": {"median_sample_ks_all": 0.55}}}
    assert missed_targets(tracking) == [
        "sample_sd_within_2x 0.7 (target >= 0.75)", "in_support_rate 0.9 (target >= 0.95)",
        "sampled slope below 0.7 for b 0.50, c 0.10 (perfect sampler 0.95, sd 0.40)"]
    # too steep: above 1.3, or above a perfect sampler's slope + 3 of its sds where that is higher
    # (d: 0.99 + 3 x 0.42 = 2.25, so 2.2 passes; e: 1.00 + 3 x 0.02 < 1.3, so 1.35 misses; f: 154.6, a wild answer)
    steep = {"per_family": {"d": {"sample_location_slope": 2.2, "perfect_location_slope": 0.99, "perfect_slope_sd": 0.42},
                            "e": {"sample_location_slope": 1.35, "perfect_location_slope": 1.0, "perfect_slope_sd": 0.02},
                            "f": {"sample_location_slope": 154.6, "perfect_location_slope": 0.99, "perfect_slope_sd": 0.42},
                            "g": {"sample_location_slope": 1.3}}}  # no perfect sampler measured: 1.3 itself passes
    assert missed_targets(steep) == ["sampled slope above max(1.3, perfect sampler + 3 sd) for e 1.35 (perfect "
                                     "sampler 1.00, sd 0.02), f 154.60 (perfect sampler 0.99, sd 0.42)"]
    assert missed_targets(steep, split="test_selected") == []
    # with the base model sampled on the same prompts: b's answers are further from the target than the base's
    worse = "sampled KS of every answer above the base model's for b 0.60 vs 0.55"
    assert missed_targets(tracking, base)[-1] == worse
    # test_selected (one prompt per family, outside the training ranges): only the comparison with the base
    assert missed_targets(tracking, base, split="test_selected") == [worse]
    good = {"sample_location_r2": 0.9, "sample_sd_within_2x": 0.8, "median_sample_ks": 0.2, "in_support_rate": 0.95,
            "per_family": {"a": {"sample_location_slope": 0.7, "median_sample_ks_all": 0.99}}}
    assert missed_targets(good, base) == []  # equal to the base's is not worse
    assert missed_targets({"sample_location_r2": float("nan")}) == []  # unmeasured: no claim


def test_targets_verdict_says_which_targets_a_split_holds():
    from calft.tracking import targets_verdict

    assert targets_verdict(["in_support_rate 0.9 (target >= 0.95)"], "test_within_range") == \
        "targets missed: in_support_rate 0.9 (target >= 0.95)"
    assert targets_verdict([], "test_within_range") == "all calibration targets met"
    # test_selected holds only the comparison with the base: its verdict must not read as 'every target met'
    assert targets_verdict([], "test_selected").startswith("all calibration targets met on this split (here: no family")


def test_perfect_slope_sd_is_the_scatter_of_a_perfect_samplers_slope():
    """perfect_slope_sd (a closed form) against the sd of the slope over many simulated perfect
    samplers: each prompt's sample mean = target mean + N(0, sd^2 / n), scored by summarize_tracking."""
    from calft.tracking import summarize_tracking

    rng = np.random.default_rng(0)
    t_mean = np.array([1.0, 1.3, 2.0, 2.2, 3.5, 0.2, 0.9])
    t_sd = np.array([0.5, 2.0, 1.0, 0.7, 3.0, 0.3, 0.8])
    fam = ["a"] * 5 + ["b"] * 2
    n = np.array([100, 100, 40, 100, 7, 100, 60])
    slopes, sd = [], None
    for _ in range(2000):
        means = t_mean + rng.standard_normal(t_mean.size) * t_sd / np.sqrt(n)
        rows = [{"family_id": f, "target_mean": t, "target_sd": s, "sample_mean": m, "sample_sd": s, "sample_ks": 0.0,
                 "sample_mean_error_sd": 0.0, "perfect_mean": m, "num_valid_samples": int(k)}
                for f, t, s, m, k in zip(fam, t_mean, t_sd, means, n)]
        summary = summarize_tracking(rows)
        slopes.append(summary["sample_location_slope"])
        sd = summary["perfect_slope_sd"]
    assert np.mean(slopes) == pytest.approx(1.0, abs=3 * sd / np.sqrt(2000))
    assert np.std(slopes) == pytest.approx(sd, rel=0.06)  # the sd of a 2000-draw sd is 1.6% of it
