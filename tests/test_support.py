"""calft.support against scipy: an independent brute-force discretizer written here is the oracle."""

import math
import re
import time
import tracemalloc
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

from calft.families import get_family
from calft.splits import get_split
from calft.support import build_support, format_centers

Q_LOW, Q_HIGH = 0.001, 0.999


def _fixed(k: int, d: int) -> str:
    """Independent formatter: exact decimal arithmetic."""
    return format(Decimal(k).scaleb(-d), "f")


def oracle_continuous(fid, params, d, max_bins, tail="clip_to_edge_bin", q_low=Q_LOW, q_high=Q_HIGH):
    """docs/method.md, section 'Supports' for continuous families, written the artifact's way (cdf differences).

    Grid: k in [ceil(lower / step), floor(upper / step)] with the float step 10.0**-d, centers
    k * step, subsampled at np.linspace(0, n-1, max_bins, dtype=int), as the artifact's
    `_continuous_grid` (chandar-lab/calibration-finetuning) does; the centers are computed only
    at the kept indices (the full grid of a Cauchy prompt at 5 decimals is ~1 GB).
    """
    dist = get_family(fid).frozen(params)
    s_lo, s_hi = dist.support()
    lower, upper = max(dist.ppf(q_low), s_lo), min(dist.ppf(q_high), s_hi)
    step = 10.0 ** (-d)
    start, end = math.ceil(lower / step), math.floor(upper / step)
    n = end - start + 1
    idx = np.linspace(0, n - 1, num=max_bins, dtype=int) if n > max_bins else np.arange(n)
    centers = (start + idx).astype(float) * step
    edges = np.concatenate(([lower], (centers[1:] + centers[:-1]) / 2, [upper]))
    probs = np.diff(dist.cdf(edges))
    if tail == "clip_to_edge_bin":
        probs[0] += dist.cdf(lower)
        probs[-1] += dist.sf(upper)
    return [f"{c:.{d}f}" for c in centers], probs / probs.sum(), edges


def oracle_integer(fid, params):
    """docs/method.md, section 'Supports' for integer families when the range fits in max_bins."""
    dist = get_family(fid).frozen(params)
    s_lo, s_hi = dist.support()
    lo = int(s_lo) if np.isfinite(s_lo) else math.floor(dist.ppf(Q_LOW))
    hi = int(s_hi) if np.isfinite(s_hi) else math.ceil(dist.ppf(Q_HIGH))
    ks = np.arange(lo, hi + 1)
    probs = dist.pmf(ks)
    probs[0] += dist.cdf(lo - 1)
    probs[-1] += dist.sf(hi)
    keep = probs > 0
    return [str(k) for k in ks[keep]], probs[keep] / probs[keep].sum()


CONTINUOUS_CASES = [
    ("gaussian", {"mu": 0, "sigma": 1}, 2, 1001),
    ("gaussian", {"mu": 3.5, "sigma": 3}, 2, 1001),  # subsampled: 1856 centers -> 1001
    ("exponential", {"lambda": 2}, 3, 1001),
    ("uniform", {"a": 3.5, "b": 10.5}, 2, 1001),
    ("triangular", {"a": -3, "c": -2.9, "b": -2}, 3, 1001),
    ("beta", {"alpha": 0.5, "beta": 0.5}, 2, 1001),  # U-shaped, mass piles at the edges
    ("truncnorm", {"mu": 1, "sigma": 1.5, "lower": -1, "upper": 2}, 2, 1001),
    ("pareto", {"alpha": 2, "xm": 0.5}, 2, 1001),
    ("lognormal", {"mu": 2.5, "sigma": 2}, 2, 101),
    ("student_t", {"nu": 2.5}, 3, 50),
    ("gumbel", {"mu": -2, "beta": 0.5}, 1, 1001),
    ("inverse_gaussian", {"mu": 0.5, "lambda": 5}, 4, 333),
    ("cauchy", {"x0": -2, "gamma": 2}, 5, 1001),
]


@pytest.mark.parametrize("fid,params,d,max_bins", CONTINUOUS_CASES)
def test_continuous_matches_oracle(fid, params, d, max_bins):
    sup = build_support(fid, params, num_decimals=d, max_bins=max_bins)
    values, probs, edges = oracle_continuous(fid, params, d, max_bins)
    assert sup.values == tuple(values)
    assert sup.probs.dtype == np.float64 and sup.num_decimals == d and not sup.integer
    assert abs(sup.probs.sum() - 1.0) < 1e-12
    np.testing.assert_allclose(sup.probs, probs, rtol=1e-9, atol=1e-13)
    # tails land in the edge bins: first bin = P(X <= e_1), last bin = P(X > e_{m-1})
    dist = get_family(fid).frozen(params)
    if len(values) > 1:
        np.testing.assert_allclose(sup.probs[0], dist.cdf(edges[1]), rtol=1e-9)
        np.testing.assert_allclose(sup.probs[-1], dist.sf(edges[-2]), rtol=1e-9)
    assert (sup.lower, sup.upper) == (edges[0], edges[-1])


def test_range_ends_on_a_grid_point():
    # lower = 0.07 and upper = 0.29 as floats: 0.07 / 0.01 = 7.000000000000001 and
    # 0.29 / 0.01 = 28.999999999999996, so the artifact's rule drops both end centers; exact
    # decimal comparison agrees here (float 0.07 > 0.07 and float 0.29 < 0.29)
    kwargs = dict(num_decimals=2, quantile_low=0.07, quantile_high=0.29)
    sup = build_support("uniform", {"a": 0, "b": 1}, **kwargs)
    assert (sup.lower, sup.upper) == (0.07, 0.29)
    assert Fraction(0.07) > Fraction(7, 100) and Fraction(0.29) < Fraction(29, 100)
    assert sup.values == tuple(f"0.{k:02d}" for k in range(8, 29))
    values, probs, _ = oracle_continuous("uniform", {"a": 0, "b": 1}, 2, 1001, q_low=0.07, q_high=0.29)
    assert sup.values == tuple(values)
    np.testing.assert_allclose(sup.probs, probs, rtol=1e-12)
    # a window wholly above the median (sf differences only)
    sup = build_support("gamma", {"alpha": 2, "beta": 1}, num_decimals=2, quantile_low=0.7, quantile_high=0.95)
    values, probs, _ = oracle_continuous("gamma", {"alpha": 2, "beta": 1}, 2, 1001, q_low=0.7, q_high=0.95)
    assert sup.values == tuple(values)
    np.testing.assert_allclose(sup.probs, probs, rtol=1e-10)


INTEGER_CASES = [
    ("binomial", {"n": 25, "p": 0.5}),
    ("poisson", {"lambda": 4}),
    ("geometric", {"p": 0.125}),
    ("negative_binomial", {"r": 15, "p": 0.15}),
    ("skellam", {"mu1": 10.5, "mu2": 10.5}),
    ("skellam", {"mu1": 1, "mu2": 8}),
    ("hypergeometric", {"M": 100, "K": 50, "N": 20}),
    ("beta_binomial", {"n": 40, "alpha": 0.5, "beta": 0.5}),
    ("bernoulli", {"p": 0.3}),
]


@pytest.mark.parametrize("fid,params", INTEGER_CASES)
def test_integer_exact_pmf_with_folded_tails(fid, params):
    sup = build_support(fid, params, num_decimals=5)
    values, probs = oracle_integer(fid, params)
    assert sup.values == tuple(values) and sup.integer and sup.num_decimals == 0
    np.testing.assert_allclose(sup.probs, probs, rtol=1e-12, atol=1e-15)
    assert abs(sup.probs.sum() - 1.0) < 1e-12


def test_skellam_lower_tail_is_kept():
    sup = build_support("skellam", {"mu1": 10.5, "mu2": 10.5})
    dist = get_family("skellam").frozen({"mu1": 10.5, "mu2": 10.5})
    lo = int(sup.values[0])
    assert lo < 0 and sup.tail_mass > 1e-3
    np.testing.assert_allclose(sup.probs[0], dist.cdf(lo), rtol=1e-10)  # pmf(lo) + P(X < lo)
    np.testing.assert_allclose(sup.probs[-1], dist.sf(int(sup.values[-1]) - 1), rtol=1e-10)
    assert sup.probs[0] > 1.5 * dist.pmf(lo)


@pytest.mark.parametrize(
    "fid,params,max_bins,first,last",
    [
        ("poisson", {"lambda": 1000.5}, 11, 995, 1005),  # mode 1000, window centred on it
        ("skellam", {"mu1": 50, "mu2": 50}, 21, -10, 10),
        ("geometric", {"p": 0.001}, 101, 1, 101),  # mode 1 at the bound: window shifts right
        ("poisson", {"lambda": 0.5}, 3, 0, 2),
        ("binomial", {"n": 5000, "p": 0.3}, 1001, 1000, 2000),  # bounded range wider than max_bins
    ],
)
def test_central_window_around_mode(fid, params, max_bins, first, last):
    sup = build_support(fid, params, max_bins=max_bins)
    dist = get_family(fid).frozen(params)
    assert sup.values == tuple(str(k) for k in range(first, last + 1))
    want = dist.pmf(np.arange(first, last + 1))
    want[0] += dist.cdf(first - 1)
    want[-1] += dist.sf(last)
    np.testing.assert_allclose(sup.probs, want / want.sum(), rtol=1e-10, atol=1e-15)
    assert sup.probs.sum() == pytest.approx(1.0, abs=1e-12)


def test_cauchy_is_fast_and_small():
    params = {"x0": -2, "gamma": 2}
    build_support("cauchy", params, num_decimals=5)  # warm scipy
    t0 = time.perf_counter()
    sup = build_support("cauchy", params, num_decimals=5, max_bins=1001)
    elapsed = time.perf_counter() - t0
    tracemalloc.start()
    build_support("cauchy", params, num_decimals=5, max_bins=1001)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the full grid would hold ~1.27e8 centers (~1 GB); the index formula needs ~1001 of them
    assert len(sup.values) == 1001 and float(sup.values[-1]) - float(sup.values[0]) > 1200
    assert elapsed < 0.25, f"{elapsed:.3f} s"
    assert peak < 2_000_000, f"peak {peak} bytes"


def _assert_valid(sup, fid, d, max_bins):
    probs = sup.probs
    assert probs.dtype == np.float64 and np.all(np.isfinite(probs)) and np.all(probs > 0), (fid, sup.params)
    assert abs(probs.sum() - 1.0) < 1e-12
    assert 1 <= len(sup.values) <= max_bins and len(set(sup.values)) == len(sup.values)
    pattern = r"-?\d+" if sup.integer else (r"-?\d+\.\d{%d}" % d if d else r"-?\d+")
    assert all(re.fullmatch(pattern, v) for v in sup.values), (fid, sup.values[:3])
    assert all(not re.fullmatch(r"-0(\.0*)?", v) for v in sup.values)  # no negative zero
    x = sup.numeric_values()
    assert np.all(np.diff(x) > 0)
    lo, hi = get_family(fid).support_bounds(sup.params)
    assert lo <= x[0] and x[-1] <= hi


def test_every_family_selected_and_grid_sample():
    specs = get_split("test_selected") + get_split("ood_selected") + get_split("test_ood_family")
    specs += get_split("train")[::13] + get_split("test_unseen_params")[::7]
    assert {s.family_id for s in specs} == set(get_family(s.family_id).id for s in specs)
    assert len({s.family_id for s in specs}) == 30
    for spec in specs:
        for d in (2, 5):
            sup = build_support(spec.family_id, spec.params_dict, num_decimals=d)
            _assert_valid(sup, spec.family_id, d, 1001)


@pytest.mark.parametrize("fid,params", [("gaussian", {"mu": 3.5, "sigma": 3}), ("lognormal", {"mu": 2.5, "sigma": 2})])
def test_hard_recipe_16384_bins(fid, params):
    sup = build_support(fid, params, num_decimals=5, max_bins=16384)
    assert len(sup.values) == 16384
    _assert_valid(sup, fid, 5, 16384)
    values, probs, _ = oracle_continuous(fid, params, 5, 16384)
    assert sup.values == tuple(values)
    np.testing.assert_allclose(sup.probs, probs, rtol=1e-8, atol=1e-14)


def test_degenerate_supports():
    for fid, params, value in [
        ("bernoulli", {"p": 0}, "0"),
        ("bernoulli", {"p": 1}, "1"),
        ("binomial", {"n": 0, "p": 0.3}, "0"),
        ("hypergeometric", {"M": 10, "K": 4, "N": 0}, "0"),
        ("hypergeometric", {"M": 10, "K": 10, "N": 3}, "3"),
    ]:
        sup = build_support(fid, params)
        assert sup.values == (value,) and sup.probs.tolist() == [1.0], (fid, params)


def test_no_grid_point_in_range_gives_nearest_to_median():
    sup = build_support("beta", {"alpha": 2, "beta": 5}, num_decimals=0)  # [0.01, 0.79]: no integer
    assert sup.values == ("0",) and sup.probs.tolist() == [1.0]
    sup = build_support("gaussian", {"mu": 3.5, "sigma": 3}, max_bins=1)
    assert sup.values == ("3.50",) and sup.probs.tolist() == [1.0]


def test_zero_prints_without_sign():
    sup = build_support("gaussian", {"mu": 0, "sigma": 0.01}, num_decimals=2)
    assert "0.00" in sup.values and "-0.00" not in sup.values and "-0.01" in sup.values
    rng = np.random.default_rng(0)
    ks = [0, 5, -5, 123, -123, 100000, -99999, 7, 2**52 - 1, -(2**52 - 1)] + rng.integers(-10**9, 10**9, 200).tolist()
    for d in (0, 1, 2, 5, 9, 15):
        assert format_centers(ks, d) == [format(Decimal(k).scaleb(-d), "f") for k in ks], d
    assert format_centers([], 2) == []


def test_renormalize_tail_policy_drops_outside_mass():
    params = {"x0": 0, "gamma": 1}
    sup = build_support("cauchy", params, num_decimals=1, tail_policy="renormalize")
    values, probs, _ = oracle_continuous("cauchy", params, 1, 1001, tail="renormalize")
    assert sup.values == tuple(values)
    np.testing.assert_allclose(sup.probs, probs, rtol=1e-9, atol=1e-14)
    clipped = build_support("cauchy", params, num_decimals=1)
    assert clipped.probs[0] > sup.probs[0] and abs(clipped.tail_mass - 2e-3) < 1e-9


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_decimals": -1}, "num_decimals"),
        ({"num_decimals": 2.0}, "num_decimals"),
        ({"num_decimals": True}, "num_decimals"),
        ({"max_bins": 0}, "max_bins"),
        ({"max_bins": 10.5}, "max_bins"),
        ({"quantile_low": 0.0}, "quantile_low"),
        ({"quantile_high": 1.0}, "quantile_high"),
        ({"quantile_low": 0.6, "quantile_high": 0.4}, "quantile_low < quantile_high"),
        ({"tail_policy": "clip"}, "unknown tail_policy 'clip'"),
    ],
)
def test_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_support("gaussian", {"mu": 0, "sigma": 1}, **kwargs)


def test_quantile_on_grid_point_follows_the_artifact_float_rule():
    # uniform(3.5, 10.5): lower = 3.5 + 0.001 * 7 = 3.507, whose float is one ulp above the decimal
    # 3.507; 3.507 / 1e-5 still rounds to 350700 in float64, so the artifact (and calft) keep
    # '3.50700', which exact decimal comparison would drop (module docstring of calft.support)
    sup = build_support("uniform", {"a": 3.5, "b": 10.5}, num_decimals=5)
    assert Fraction(sup.lower) > Fraction(3507, 1000)
    assert sup.values[0] == "3.50700" and len(sup.values) == 1001


@pytest.mark.parametrize(
    "fid,params,match",
    [
        ("binomial", {"n": 1e18, "p": 0.5}, "beyond 2\\*\\*53"),
        ("negative_binomial", {"r": 1e9, "p": 1e-9}, "beyond 2\\*\\*53"),
        ("geometric", {"p": 1e-300}, "beyond 2\\*\\*53"),
        ("poisson", {"lambda": 10**400}, "parameter 'lambda' must be finite"),
        ("gaussian", {"mu": -(10**400), "sigma": 1}, "parameter 'mu' must be finite"),
        ("binomial", {"n": 2.5, "p": 0.5}, "'n' is a count and must be a whole number"),
        ("hypergeometric", {"M": 1e12, "K": 5e11, "N": 1e11}, "'M'.*integer in \\[1, 10000000\\]"),
    ],
)
def test_library_edges_raise_clear_value_errors(fid, params, match):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        build_support(fid, params)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize(
    "fid,params,mode",
    [
        ("binomial", {"n": 10**15, "p": 0.3}, 3 * 10**14),  # floor((n+1)p)
        ("negative_binomial", {"r": 10**6, "p": 1e-9}, None),  # mode floor((r-1)(1-p)/p)
        ("binomial", {"n": 10**12, "p": 0.5}, 5 * 10**11),
        ("hypergeometric", {"M": 10**7, "K": 5 * 10**6, "N": 10**6}, 5 * 10**5),
    ],
)
def test_huge_counts_window_is_centred_on_the_mode(fid, params, mode):
    if mode is None:
        r, p = params["r"], params["p"]
        mode = math.floor((r - 1) * (1 - p) / p)
    t0 = time.perf_counter()
    sup = build_support(fid, params)
    assert time.perf_counter() - t0 < 5
    ks = sup.numeric_values()
    assert len(ks) == 1001
    # centred within 2 values, or 1e-6 sd where the pmf is flat to float64 around the mode
    # (negative binomial: sd = 1e12); the old logpmf search was 1.08 sd off for binomial 1e15
    sd = float(get_family(fid).frozen(params).std())
    assert abs((ks[0] + ks[-1]) / 2 - mode) <= max(2, 1e-6 * sd), ((ks[0] + ks[-1]) / 2, mode, sd)


def test_bad_family_or_params_propagate():
    with pytest.raises(ValueError, match="did you mean 'gaussian'"):
        build_support("gausian", {"mu": 0, "sigma": 1})
    with pytest.raises(ValueError, match="gaussian: parameter 'sigma'"):
        build_support("gaussian", {"mu": 0, "sigma": -1})
    with pytest.raises(ValueError, match="too fine"):
        build_support("cauchy", {"x0": 0, "gamma": 1e6}, num_decimals=15)
