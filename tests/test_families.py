"""calft.families against docs/method.md, section 'Families and grids' (table written out here) and scipy built independently."""

import math

import numpy as np
import pytest
from scipy import stats

from calft.families import (
    FAMILIES,
    HELD_OUT_FAMILY_IDS,
    TRAIN_FAMILY_IDS,
    get_family,
)

# docs/method.md, section 'Families and grids', row by row: id -> (display, tier, prompt params, integer, held_out)
SPEC_TABLE = {
    "uniform": ("Uniform", "I", ("a", "b"), False, False),
    "gaussian": ("Gaussian", "I", ("mu", "sigma"), False, False),
    "bernoulli": ("Bernoulli", "I", ("p",), True, True),
    "beta": ("Beta", "II", ("alpha", "beta"), False, False),
    "binomial": ("Binomial", "II", ("n", "p"), True, False),
    "poisson": ("Poisson", "II", ("lambda",), True, True),
    "exponential": ("Exponential", "II", ("lambda",), False, False),
    "geometric": ("Geometric", "II", ("p",), True, False),
    "negative_binomial": ("Negative Binomial", "II", ("r", "p"), True, False),
    "lognormal": ("LogNormal", "II", ("mu", "sigma"), False, False),
    "triangular": ("Triangular", "II", ("a", "c", "b"), False, False),
    "rayleigh": ("Rayleigh", "II", ("sigma",), False, False),
    "maxwell": ("Maxwell", "II", ("scale",), False, True),
    "truncnorm": ("TruncNorm", "II", ("mu", "sigma", "lower", "upper"), False, True),
    "cauchy": ("Cauchy", "III", ("x0", "gamma"), False, False),
    "student_t": ("Student's t", "III", ("nu",), False, False),
    "chi_square": ("Chi-Square", "III", ("nu",), False, False),
    "f_distribution": ("F-Distribution", "III", ("d1", "d2"), False, False),
    "gamma": ("Gamma", "III", ("alpha", "beta"), False, False),
    "weibull": ("Weibull", "III", ("k", "lambda"), False, True),
    "laplace": ("Laplace", "III", ("mu", "b"), False, False),
    "logistic": ("Logistic", "III", ("mu", "s"), False, False),
    "pareto": ("Pareto", "III", ("alpha", "xm"), False, False),
    "hypergeometric": ("Hypergeometric", "III", ("M", "K", "N"), True, False),
    "gumbel": ("Gumbel", "III", ("mu", "beta"), False, False),
    "skellam": ("Skellam", "III", ("mu1", "mu2"), True, False),
    "beta_binomial": ("Beta-Binomial", "III", ("n", "alpha", "beta"), True, False),
    "lomax": ("Lomax", "III", ("alpha", "lambda"), False, False),
    "inverse_gaussian": ("Inverse Gaussian", "III", ("mu", "lambda"), False, False),
    "chi": ("Chi", "III", ("df",), False, True),
}

# (params, scipy distribution written from the formulas of docs/method.md, support from its table)
ORACLE = {
    "uniform": ({"a": -1.5, "b": 2.0}, stats.uniform(loc=-1.5, scale=3.5), (-1.5, 2.0)),
    "gaussian": ({"mu": 1.0, "sigma": 2.0}, stats.norm(1.0, 2.0), (-math.inf, math.inf)),
    "bernoulli": ({"p": 0.3}, stats.bernoulli(0.3), (0, 1)),
    "beta": ({"alpha": 2.0, "beta": 3.0}, stats.beta(2.0, 3.0), (0, 1)),
    "binomial": ({"n": 12, "p": 0.4}, stats.binom(12, 0.4), (0, 12)),
    "poisson": ({"lambda": 3.5}, stats.poisson(3.5), (0, math.inf)),
    "exponential": ({"lambda": 2.0}, stats.expon(scale=0.5), (0, math.inf)),
    "geometric": ({"p": 0.3}, stats.geom(0.3), (1, math.inf)),
    "negative_binomial": ({"r": 5, "p": 0.4}, stats.nbinom(5, 0.4), (0, math.inf)),
    "lognormal": ({"mu": 0.5, "sigma": 0.75}, stats.lognorm(s=0.75, scale=math.exp(0.5)), (0, math.inf)),
    "triangular": ({"a": 1.0, "c": 2.0, "b": 5.0}, stats.triang(c=0.25, loc=1.0, scale=4.0), (1.0, 5.0)),
    "rayleigh": ({"sigma": 1.5}, stats.rayleigh(scale=1.5), (0, math.inf)),
    "maxwell": ({"scale": 2.0}, stats.maxwell(scale=2.0), (0, math.inf)),
    "truncnorm": (
        {"mu": 1.0, "sigma": 1.5, "lower": -1.0, "upper": 2.0},
        stats.truncnorm(-2.0 / 1.5, 1.0 / 1.5, loc=1.0, scale=1.5),
        (-1.0, 2.0),
    ),
    "cauchy": ({"x0": -2.0, "gamma": 2.0}, stats.cauchy(-2.0, 2.0), (-math.inf, math.inf)),
    "student_t": ({"nu": 3.5}, stats.t(3.5), (-math.inf, math.inf)),
    "chi_square": ({"nu": 6.0}, stats.chi2(6.0), (0, math.inf)),
    "f_distribution": ({"d1": 5.0, "d2": 10.0}, stats.f(5.0, 10.0), (0, math.inf)),
    "gamma": ({"alpha": 2.0, "beta": 3.0}, stats.gamma(2.0, scale=3.0), (0, math.inf)),
    "weibull": ({"k": 1.5, "lambda": 2.0}, stats.weibull_min(1.5, scale=2.0), (0, math.inf)),
    "laplace": ({"mu": 1.0, "b": 0.5}, stats.laplace(1.0, 0.5), (-math.inf, math.inf)),
    "logistic": ({"mu": -1.0, "s": 2.0}, stats.logistic(-1.0, 2.0), (-math.inf, math.inf)),
    "pareto": ({"alpha": 3.0, "xm": 1.5}, stats.pareto(3.0, scale=1.5), (1.5, math.inf)),
    "hypergeometric": ({"M": 30, "K": 20, "N": 15}, stats.hypergeom(30, 20, 15), (5, 15)),  # N-(M-K)=5
    "gumbel": ({"mu": 0.5, "beta": 2.0}, stats.gumbel_r(0.5, 2.0), (-math.inf, math.inf)),
    "skellam": ({"mu1": 3.0, "mu2": 5.0}, stats.skellam(3.0, 5.0), (-math.inf, math.inf)),
    "beta_binomial": ({"n": 20, "alpha": 2.0, "beta": 0.5}, stats.betabinom(20, 2.0, 0.5), (0, 20)),
    "lomax": ({"alpha": 2.5, "lambda": 1.5}, stats.lomax(2.5, scale=1.5), (0, math.inf)),
    "inverse_gaussian": ({"mu": 2.0, "lambda": 5.0}, stats.invgauss(0.4, scale=5.0), (0, math.inf)),
    "chi": ({"df": 3.0}, stats.chi(3.0), (0, math.inf)),
}


def test_registry_matches_spec_table():
    assert list(FAMILIES) == list(SPEC_TABLE)  # all 30, family-table order
    for fid, (display, tier, names, integer, held_out) in SPEC_TABLE.items():
        fam = get_family(fid)
        assert (fam.id, fam.display, fam.tier, fam.param_names, fam.integer_only, fam.held_out) == (
            fid, display, tier, names, integer, held_out,
        ), fid
    assert HELD_OUT_FAMILY_IDS == ("bernoulli", "poisson", "maxwell", "truncnorm", "weibull", "chi")
    assert len(TRAIN_FAMILY_IDS) == 24 and not set(TRAIN_FAMILY_IDS) & set(HELD_OUT_FAMILY_IDS)


@pytest.mark.parametrize("fid", list(SPEC_TABLE))
def test_scipy_mapping_and_support_bounds(fid):
    params, oracle, bounds = ORACLE[fid]
    fam = get_family(fid)
    dist = fam.frozen(params)
    lo, hi = oracle.ppf(0.01), oracle.ppf(0.99)
    xs = np.unique(np.round(np.linspace(lo, hi, 17))) if fam.integer_only else np.linspace(lo, hi, 17)
    np.testing.assert_allclose(dist.cdf(xs), oracle.cdf(xs), rtol=1e-13, atol=1e-15)
    if fam.integer_only:
        np.testing.assert_allclose(dist.pmf(xs), oracle.pmf(xs), rtol=1e-13, atol=1e-15)
    else:
        np.testing.assert_allclose(dist.pdf(xs), oracle.pdf(xs), rtol=1e-13, atol=1e-15)
    assert fam.support_bounds(params) == tuple(float(b) for b in bounds)
    mean, var = fam.moments(params)
    want = oracle.stats(moments="mv")
    np.testing.assert_allclose([mean, var], [float(w) for w in want], rtol=1e-12, equal_nan=True)


@pytest.mark.parametrize("fid", list(SPEC_TABLE))
def test_light_frozen_equals_scipy_frozen(fid):
    params = ORACLE[fid][0]
    fam = get_family(fid)
    full, light = fam.frozen(params), fam.light_frozen(params)
    xs = np.linspace(*full.ppf([0.001, 0.999]), 23)
    methods = ["cdf", "sf", "logpmf", "pmf"] if fam.integer_only else ["cdf", "sf", "pdf"]
    for name in methods:
        np.testing.assert_array_equal(getattr(light, name)(np.floor(xs) if fam.integer_only else xs),
                                      getattr(full, name)(np.floor(xs) if fam.integer_only else xs), err_msg=name)
    q = [0.001, 0.3, 0.5, 0.999]
    np.testing.assert_array_equal(light.ppf(q), full.ppf(q))
    assert light.support() == full.support()


def test_moments_infinite_or_undefined():
    assert all(math.isnan(m) for m in get_family("cauchy").moments({"x0": 0, "gamma": 1}))
    assert get_family("pareto").moments({"alpha": 2, "xm": 1}) == (2.0, math.inf)  # var infinite
    mean, var = get_family("student_t").moments({"nu": 2.5})
    assert mean == 0.0 and var == pytest.approx(2.5 / 0.5)
    assert math.isinf(get_family("student_t").moments({"nu": 1.5})[1])


def test_validate_normalizes_counts_and_order():
    out = get_family("binomial").validate({"p": np.float64(0.5), "n": 30.0})
    assert list(out) == ["n", "p"] and out["n"] == 30 and type(out["n"]) is int and type(out["p"]) is float
    out = get_family("hypergeometric").validate({"M": 100.0, "K": np.int64(50), "N": np.float32(20)})
    assert out == {"M": 100, "K": 50, "N": 20} and all(type(v) is int for v in out.values())
    # a non-integral count is an error, never rounded silently (binomial n=2.5 used to become 2)
    _raises("hypergeometric", {"M": 100, "K": 50, "N": 20.4}, "'N'", "whole number", "integer >= 0")
    _raises("binomial", {"n": 2.5, "p": 0.5}, "'n'", "whole number")
    _raises("binomial", {"n": 10**400, "p": 0.5}, "'n'", "must be finite")
    _raises("hypergeometric", {"M": 10**12, "K": 5, "N": 5}, "'M'", "integer in [1, 10000000]")
    assert get_family("triangular").validate({"a": 0, "b": 2, "c": 2}) == {"a": 0.0, "c": 2.0, "b": 2.0}
    assert get_family("bernoulli").validate({"p": 0}) == {"p": 0.0}  # degenerate but valid


def _raises(fid, params, *fragments):
    with pytest.raises(ValueError) as info:
        get_family(fid).validate(params)
    msg = str(info.value)
    for frag in (fid, *fragments):
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


def test_error_scale_not_positive():
    _raises("gaussian", {"mu": 0, "sigma": 0}, "'sigma'", "(0, inf)")
    _raises("gamma", {"alpha": 1, "beta": -2}, "'beta'", "(0, inf)")


def test_error_probability_out_of_range():
    _raises("binomial", {"n": 10, "p": 1.2}, "'p'", "[0, 1]")
    _raises("bernoulli", {"p": -0.1}, "'p'", "[0, 1]")
    _raises("geometric", {"p": 0}, "'p'", "(0, 1]")  # geom(0) has no distribution
    _raises("negative_binomial", {"r": 3, "p": 0.0}, "'p'", "(0, 1]")


def test_error_bounds_out_of_order():
    _raises("uniform", {"a": 2, "b": 2}, "'b'", "'a'", "(2.0, inf)")
    _raises("truncnorm", {"mu": 0, "sigma": 1, "lower": 1, "upper": -1}, "'upper'", "'lower'")
    _raises("triangular", {"a": 0, "c": 3, "b": 2}, "'c'", "[0.0, 2.0]")
    _raises("triangular", {"a": 0, "c": 0, "b": -1}, "'b'")


def test_error_counts():
    _raises("binomial", {"n": -1, "p": 0.5}, "'n'", "integer >= 0")
    _raises("negative_binomial", {"r": 0, "p": 0.5}, "'r'", "integer >= 1")
    _raises("hypergeometric", {"M": 10, "K": 11, "N": 3}, "'K'", "[0, 10]")
    _raises("hypergeometric", {"M": 10, "K": 5, "N": 12}, "'N'", "[0, 10]")


def test_error_non_finite():
    _raises("gaussian", {"mu": math.nan, "sigma": 1}, "'mu'", "finite")
    _raises("gaussian", {"mu": 0, "sigma": math.inf}, "'sigma'", "finite")
    _raises("binomial", {"n": math.inf, "p": 0.5}, "'n'", "finite")


def test_error_missing_and_extra_keys():
    _raises("gaussian", {"mu": 0}, "missing", "'sigma'", "(mu, sigma)")
    msg = _raises("gaussian", {"mu": 0, "sigma": 1, "sigmaa": 2}, "unexpected", "'sigmaa'", "(mu, sigma)")
    assert "did you mean 'sigma'" in msg
    _raises("gaussian", {"mean": 0, "sigma": 1}, "unexpected", "'mean'")


def test_error_non_numeric():
    _raises("gaussian", {"mu": "1", "sigma": 1}, "'mu'", "real number")
    _raises("gaussian", {"mu": None, "sigma": 1}, "'mu'", "real number")
    _raises("bernoulli", {"p": True}, "'p'", "real number")
    with pytest.raises(ValueError, match="mapping"):
        get_family("gaussian").validate([0, 1])


def test_unknown_family_suggests_nearest():
    with pytest.raises(ValueError, match="unknown distribution family 'gausian'; did you mean 'gaussian'"):
        get_family("gausian")
    with pytest.raises(ValueError, match="did you mean 'negative_binomial'"):
        get_family("negative_binomal")
    with pytest.raises(ValueError, match="unknown distribution family 'zzz'") as info:
        get_family("zzz")
    assert "did you mean" not in str(info.value) and "uniform" in str(info.value)  # lists known ids


def test_frozen_validates_first():
    with pytest.raises(ValueError, match="lomax"):
        get_family("lomax").frozen({"alpha": -1, "lambda": 1})


@pytest.mark.parametrize("mu1,mu2", [(2.562, 7.249), (0.5, 0.5), (30.0, 1.0), (0.01, 5.0)])
def test_skellam_ppf_is_the_smallest_integer_reaching_q(mu1, mu2):
    """scipy 1.17's generic discrete ppf raises an 'endless loop' error for Skellam(2.562, 7.249)
    at q = 0.1 (a test_within_range prompt); calft's is the definition, checked on scipy's cdf."""
    q = np.r_[np.linspace(1e-6, 1 - 1e-6, 2001), (np.arange(1000) + 0.5) / 1000]
    got = FAMILIES["skellam"].frozen({"mu1": mu1, "mu2": mu2}).ppf(q)
    ks = np.arange(-300, 301)
    cdf = stats.skellam.cdf(ks, mu1, mu2)
    assert got.tolist() == [int(ks[np.argmax(cdf >= x)]) for x in q]
