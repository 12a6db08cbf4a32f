"""Sampling protocol: parser, validators, per-prompt metrics (vs scipy / hand-computed values),
and seeded generation (vs a cache-free, one-sample-at-a-time oracle)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from tiny import naive_samples

from calft.families import get_family
from calft.sampling import (
    chi_square_discrete,
    classify_outputs,
    draw_tokens,
    generate_samples,
    parse_output,
    sample_metrics,
    sample_seeds,
    stop_token_ids,
    wasserstein_to_quantiles,
)

# ----------------------------------------------------------------------------- parser


@pytest.mark.parametrize("text, value", [
    ("3", 3.0), ("-2.5", -2.5), ("+.5", 0.5), ("1.", 1.0), ("1e3", 1000.0), ("2.5E-2", 0.025),
    ("  4.20\n", 4.2), ("<think>maybe 7?</think>3.1", 3.1), ("<think>a\nb</think>\n\n-0", 0.0),
    ("007", 7.0),
])
def test_parser_accepts_one_number(text, value):
    assert parse_output(text) == ("ok", value)


@pytest.mark.parametrize("text", ["", "   \n", "<think>only thinking</think>", "<think></think>  "])
def test_parser_empty(text):
    assert parse_output(text) == ("empty", None)


@pytest.mark.parametrize("text", [
    "abc", "3.1.2", "1,000", "3 4", "The answer is 3", "3.5 is my answer", "e5", ".", "-", "--1", "1e",
    "1e+", "0x1F", "nan", "inf", "-inf", "Infinity", "<think>unclosed 3", "3.5\nbecause", "3/4", "½",
    "\u0663", "1_000", "$5", "5%", "(3)", "3.0 3.0", "<think>x</think>3<think>y</think>4", "\"3\"",
])
def test_parser_rejects_malformed(text):
    assert parse_output(text) == ("malformed", None)


def test_parser_rejects_non_string():
    with pytest.raises(ValueError, match="str"):
        parse_output(3.0)


# ----------------------------------------------------------------------------- validators


@pytest.mark.parametrize("family, params, text, status", [
    ("gaussian", {"mu": 0, "sigma": 1}, "1e999", "non_finite"),
    ("gaussian", {"mu": 0, "sigma": 1}, "-1e999", "non_finite"),
    ("gaussian", {"mu": 0, "sigma": 1}, "-123456.5", "valid"),
    ("exponential", {"lambda": 2}, "-0.01", "below_support"),
    ("exponential", {"lambda": 2}, "0.00", "valid"),
    ("uniform", {"a": 1, "b": 3}, "3.01", "above_support"),
    ("uniform", {"a": 1, "b": 3}, "0.99", "below_support"),
    ("uniform", {"a": 1, "b": 3}, "3", "valid"),
    ("beta", {"alpha": 2, "beta": 2}, "1.5", "above_support"),
    ("binomial", {"n": 10, "p": 0.5}, "2.5", "non_integer"),
    ("binomial", {"n": 10, "p": 0.5}, "2.0000001", "non_integer"),
    ("binomial", {"n": 10, "p": 0.5}, "2.0000000001", "valid"),  # within the 1e-9 tolerance
    ("binomial", {"n": 10, "p": 0.5}, "2.0", "valid"),
    ("binomial", {"n": 10, "p": 0.5}, "11", "above_support"),
    ("binomial", {"n": 10, "p": 0.5}, "-1", "below_support"),
    ("geometric", {"p": 0.5}, "0", "below_support"),
    ("poisson", {"lambda": 3}, "1e999", "non_finite"),
    ("poisson", {"lambda": 3}, "1000", "valid"),
    ("skellam", {"mu1": 2, "mu2": 3}, "-7", "valid"),
    ("pareto", {"alpha": 3, "xm": 2}, "1.99", "below_support"),
])
def test_validators(family, params, text, status):
    statuses, values = classify_outputs([text], family, params)
    assert statuses == [status]
    assert values.size == (status == "valid")


def test_rates_count_every_status():
    texts = ["1", "2", "", "x", "1e999", "-1", "2.5", "11", "3"]
    m = sample_metrics(texts, "binomial", {"n": 10, "p": 0.5})
    assert m["num_samples"] == 9 and m["num_valid"] == 3
    assert m["valid_rate"] == pytest.approx(3 / 9)
    assert m["parse_failure_rate"] == pytest.approx(2 / 9)
    assert m["support_violation_rate"] == pytest.approx(4 / 9)
    assert [m[f"count_{s}"] for s in ("empty", "malformed", "non_finite", "below_support", "above_support",
                                      "non_integer")] == [1, 1, 1, 1, 1, 1]


# ----------------------------------------------------------------------------- metrics


def test_w1_hand_computed():
    # sorted x = .1 .2 .5 .9, uniform quantiles at (i+.5)/4 = .125 .375 .625 .875
    # |diff| = .025 .175 .125 .025 -> mean .0875
    m = sample_metrics(["0.9", "0.1", "0.5", "0.2"], "uniform", {"a": 0, "b": 1})
    assert m["wasserstein_1"] == pytest.approx(0.0875, abs=1e-15)
    assert m["mean_error"] == pytest.approx(abs(0.425 - 0.5))
    assert m["variance_error"] == pytest.approx(abs(np.var([0.1, 0.2, 0.5, 0.9], ddof=1) - 1 / 12))


def test_chi_square_hand_computed():
    # binomial(2, .5): expected [1.5, 3, 1.5] for n=6, observed [1, 2, 3]
    # chi2 = .25/1.5 + 1/3 + 2.25/1.5 = 2; df = 2 -> p = exp(-1)
    m = sample_metrics(["0", "1", "1", "2", "2", "2"], "binomial", {"n": 2, "p": 0.5})
    assert m["chi2_stat"] == pytest.approx(2.0, rel=1e-12)
    assert m["chi2_pvalue"] == pytest.approx(math.exp(-1), rel=1e-12)
    assert m["chi2_cells"] == 3 and math.isnan(m["ks_stat"])


def test_continuous_metrics_match_scipy():
    params = {"mu": 1.5, "sigma": 2.0}
    dist = get_family("gaussian").frozen(params)
    x = np.round(dist.rvs(size=500, random_state=np.random.default_rng(1)), 2)
    m = sample_metrics([f"{v:.2f}" for v in x], "gaussian", params)
    ks = stats.kstest(x, stats.norm(1.5, 2.0).cdf)
    assert m["ks_stat"] == pytest.approx(ks.statistic, rel=1e-12)
    assert m["ks_pvalue"] == pytest.approx(ks.pvalue, rel=1e-9)
    q = stats.norm(1.5, 2.0).ppf((np.arange(500) + 0.5) / 500)
    assert m["wasserstein_1"] == pytest.approx(np.abs(np.sort(x) - q).mean(), rel=1e-12)
    assert m["mean_error"] == pytest.approx(abs(x.mean() - 1.5), rel=1e-12)
    assert m["variance_error"] == pytest.approx(abs(x.var(ddof=1) - 4.0), rel=1e-12)
    assert math.isnan(m["chi2_stat"])


def test_discrete_chi_square_with_tails_matches_scipy():
    # Poisson(3): cells {<0 (no mass, dropped)}, 0..hi, {>hi}; hi = ceil(ppf(.999)) = 9
    dist = stats.poisson(3)
    x = dist.rvs(size=400, random_state=np.random.default_rng(2))
    x[:3] = [12, 15, 10]  # force the upper tail cell to be used
    m = sample_metrics([str(v) for v in x], "poisson", {"lambda": 3})
    hi = math.ceil(dist.ppf(0.999))
    obs = [np.sum(x == k) for k in range(hi + 1)] + [np.sum(x > hi)]
    exp = np.r_[dist.pmf(np.arange(hi + 1)), dist.sf(hi)] * x.size
    ref = stats.chisquare(obs, exp)
    assert m["chi2_cells"] == hi + 2
    assert m["chi2_stat"] == pytest.approx(ref.statistic, rel=1e-10)
    assert m["chi2_pvalue"] == pytest.approx(ref.pvalue, rel=1e-8)


def test_bounded_family_uses_quantile_cells():
    # Binomial(25, .5): quantile range 5..20 (not 0..25); cells (<5) and (>20) hold the rest,
    # so one sample at 0 lands in a cell of mass ~5e-4 instead of 3e-8.
    dist = stats.binom(25, 0.5)
    lo, hi = int(dist.ppf(0.001)), int(dist.ppf(0.999))
    x = np.r_[np.full(10, 12), [0, 25, 13, 11]]
    m = sample_metrics([str(v) for v in x], "binomial", {"n": 25, "p": 0.5})
    obs = [np.sum(x < lo)] + [np.sum(x == k) for k in range(lo, hi + 1)] + [np.sum(x > hi)]
    exp = np.r_[dist.cdf(lo - 1), dist.pmf(np.arange(lo, hi + 1)), dist.sf(hi)] * x.size
    ref = stats.chisquare(obs, exp)
    assert (lo, hi) == (5, 20)
    assert m["chi2_cells"] == hi - lo + 3
    assert m["chi2_stat"] == pytest.approx(ref.statistic, rel=1e-10)


def test_skellam_both_tails():
    dist = stats.skellam(2, 3)
    lo, hi = math.floor(dist.ppf(0.001)), math.ceil(dist.ppf(0.999))
    x = np.array([lo - 3, lo, 0, 0, hi, hi + 2, -1, 1])
    stat, p, cells = chi_square_discrete(x, dist, lo, hi)
    obs = [np.sum(x < lo)] + [np.sum(x == k) for k in range(lo, hi + 1)] + [np.sum(x > hi)]
    exp = np.r_[dist.cdf(lo - 1), dist.pmf(np.arange(lo, hi + 1)), dist.sf(hi)] * x.size
    ref = stats.chisquare(obs, exp)
    assert cells == hi - lo + 3
    assert stat == pytest.approx(ref.statistic, rel=1e-10) and p == pytest.approx(ref.pvalue, rel=1e-8)


def test_infinite_moments_give_nan():
    m = sample_metrics(["1", "2", "3"], "cauchy", {"x0": 0, "gamma": 1})
    assert math.isnan(m["mean_error"]) and math.isnan(m["variance_error"])
    m = sample_metrics(["2", "3", "5"], "pareto", {"alpha": 2, "xm": 1})  # mean 2, variance infinite
    assert m["mean_error"] == pytest.approx(abs(10 / 3 - 2)) and math.isnan(m["variance_error"])


def test_no_valid_samples():
    m = sample_metrics(["x", ""], "gaussian", {"mu": 0, "sigma": 1})
    assert m["valid_rate"] == 0 and all(math.isnan(m[k]) for k in ("mean_error", "wasserstein_1", "ks_stat"))
    assert math.isnan(wasserstein_to_quantiles([], stats.norm()))
    with pytest.raises(ValueError, match="no outputs"):
        sample_metrics([], "gaussian", {"mu": 0, "sigma": 1})


# ----------------------------------------------------------------------------- generation


def test_draw_tokens_inverts_the_cdf():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 6))
    u = np.array([0.0, 0.0999, 0.1001, 0.35, 0.61, 0.9999])
    assert draw_tokens(logits, u).tolist() == [0, 0, 1, 2, 3, 3]
    # top_p = 0.5 keeps {3 (.4), 2 (.3)}: renormalized cdf 3/7 at token 2, 1 at token 3
    assert draw_tokens(logits[:2], np.array([0.1, 0.5]), top_p=0.5).tolist() == [2, 3]


def test_generation_matches_naive_oracle_and_is_batch_invariant(tiny):
    model, tok = tiny
    from calft.prompts import prompt_token_ids

    prompt = prompt_token_ids(tok, "Generate exactly ONE random number.")
    # Many stop tokens make rows finish at different steps, exercising the cache row removal.
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id] + list(range(40, 140))
    try:
        stops = stop_token_ids(model, tok)
        a = generate_samples(model, tok, prompt, 7, seed=3, prompt_key="k", batch_size=3, max_new_tokens=6)
        b = generate_samples(model, tok, prompt, 7, seed=3, prompt_key="k", batch_size=7, max_new_tokens=6)
        ref = naive_samples(model, tok, prompt, sample_seeds(3, "k", 7), 6, stops)
        c = generate_samples(model, tok, prompt, 7, seed=4, prompt_key="k", batch_size=7, max_new_tokens=6)
    finally:
        model.generation_config.eos_token_id = saved
    assert a == b == ref
    assert len({len(x) for x in ref}) > 1  # rows really stopped at different lengths
    assert c != a  # the seed takes effect


def test_generation_rejects_bad_settings(tiny):
    model, tok = tiny
    with pytest.raises(ValueError):
        generate_samples(model, tok, [1, 2], 0)
    with pytest.raises(ValueError, match="top_p"):
        generate_samples(model, tok, [1, 2], 2, top_p=0.0)
