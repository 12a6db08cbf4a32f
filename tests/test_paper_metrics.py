"""The paper artifact's metric definitions (calft.artifact_metrics), each against a hand-computed
case or scipy; NoveltyBench's partition against its rule; retention's strict/flexible scoring."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from calft.artifact_metrics import (
    scipy_anderson,
    TOP_P_THRESHOLDS,
    anderson_fitted,
    anderson_known,
    distinct_outputs,
    mcq_strict_metrics,
    normalize_first_line,
    parse_mcq_strict,
    structured_metrics,
    top_p_support_sizes,
    variance_error_ddof0,
)

# -----------------------------------------------------------------------------
# structured sampling


def test_anderson_known_by_hand():
    # n = 2, F = U(0, 1): x = (0.25, 0.5) -> A^2 = -2 - 1/2 [1 (ln .25 + ln .5) + 3 (ln .5 + ln .75)]
    x = [0.5, 0.25]
    by_hand = -2 - 0.5 * (1 * (math.log(0.25) + math.log(0.5)) + 3 * (math.log(0.5) + math.log(0.75)))
    assert anderson_known(x, stats.uniform(0, 1)) == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize("family, name, dist", [("gaussian", "norm", stats.norm(1.5, 2.0)),
                                                 ("exponential", "expon", stats.expon(scale=0.7)),
                                                 ("logistic", "logistic", stats.logistic(-1, 0.5))])
def test_anderson_fitted_is_scipy(family, name, dist):
    x = dist.rvs(size=57, random_state=np.random.default_rng(3))
    assert anderson_fitted(x, family) == pytest.approx(scipy_anderson(x, name), rel=1e-12)
    if name == "norm":  # scipy fits mean and sd (ddof=1), then applies the known-law formula
        fitted = stats.norm(x.mean(), x.std(ddof=1))
        assert anderson_fitted(x, family) == pytest.approx(anderson_known(x, fitted), rel=1e-10)
    assert math.isnan(anderson_fitted(x[:4], family))  # the artifact skips fewer than 5 values
    assert math.isnan(anderson_fitted(x, "uniform"))  # scipy's anderson does not test it


def test_anderson_known_matches_scipy_goodness_of_fit():
    x = stats.norm(0, 1).rvs(size=40, random_state=np.random.default_rng(5))
    ref = stats.goodness_of_fit(stats.norm, x, known_params={"loc": 0, "scale": 1}, statistic="ad",
                                n_mc_samples=9, rng=np.random.default_rng(0)).statistic
    assert anderson_known(x, stats.norm(0, 1)) == pytest.approx(ref, rel=1e-10)


def test_variance_error_is_ddof0():
    # x = 1, 2, 3, 6: mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5; target 2 -> 1.5
    assert variance_error_ddof0([1, 2, 3, 6], 2.0) == pytest.approx(1.5)
    assert math.isnan(variance_error_ddof0([], 2.0)) and math.isnan(variance_error_ddof0([1.0], math.inf))


def test_structured_metrics_by_hand():
    # Uniform(0, 4): 4 samples 1, 3, "x", 5 -> valid 1, 3; "x" malformed; 5 above the support.
    row = structured_metrics(["1", "3", "x", "5"], "uniform", {"a": 0, "b": 4})
    assert row["valid_rate"] == 0.5 and row["support_violation_rate"] == 0.25
    # W1 at (i + 0.5)/n quantiles of U(0, 4) with n = 2: 1 and 3 -> |1 - 1| + |3 - 3| = 0
    assert row["wasserstein_1"] == pytest.approx(0.0, abs=1e-12) and row["w1_over_sd"] == pytest.approx(0.0, abs=1e-12)
    # variance 16/12 against the sample's population variance 1: |1 - 4/3| = 1/3
    assert row["variance_error_ddof0"] == pytest.approx(1 / 3)
    assert math.isnan(row["anderson_known"])  # uniform: not one of the four AD families
    g = structured_metrics(["0.5", "-1", "1.5", "0", "2", "-0.5"], "gaussian", {"mu": 0, "sigma": 1})
    x = [0.5, -1, 1.5, 0, 2, -0.5]
    assert g["anderson_known"] == pytest.approx(anderson_known(x, stats.norm(0, 1)))
    assert g["anderson_fitted"] == pytest.approx(scipy_anderson(np.array(x), "norm"))
    w1 = np.mean(np.abs(np.sort(x) - stats.norm.ppf((np.arange(6) + 0.5) / 6)))
    assert g["wasserstein_1"] == pytest.approx(w1)


# -----------------------------------------------------------------------------
# open generation and MCQ


def test_open_generation_normalization_and_distinct():
    assert normalize_first_line('\n  "Blue  sky"\nmore') == "Blue sky"
    assert normalize_first_line("<think>hmm</think>\n'cat'") == "cat"
    assert normalize_first_line("Cat.") == "Cat."  # no lower-casing, punctuation kept (the artifact's)
    assert distinct_outputs(["cat", "Cat", " cat ", "", "\n", "dog"]) == 3  # empty outputs do not count


def test_top_p_support_sizes_by_hand():
    p = torch.tensor([0.05, 0.5, 0.3, 0.15])  # sorted .5 .3 .15 .05, cumulative .5 .8 .95 1
    sizes = top_p_support_sizes(p)
    assert len(sizes) == 21 and tuple(sizes) == TOP_P_THRESHOLDS
    assert sizes[0.01] == 1 and sizes[0.5] == 1 and sizes[0.55] == 2 and sizes[0.8] == 2
    assert sizes[0.85] == 3 and sizes[0.95] == 3 and sizes[0.99] == 4
    with pytest.raises(ValueError):
        top_p_support_sizes(p, (0.0,))


GOOD_MCQ = "Question: What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nCorrect Answer: B\nExplanation: Two and two."


def test_mcq_strict_parser():
    assert parse_mcq_strict(GOOD_MCQ)["parseable"] and parse_mcq_strict(GOOD_MCQ)["answer"] == "B"
    assert not parse_mcq_strict(GOOD_MCQ + "\nThanks!")["parseable"]  # an unexpected line
    assert not parse_mcq_strict(GOOD_MCQ.replace("Correct Answer: B", "Correct Answer: (B)"))["parseable"]
    assert not parse_mcq_strict(GOOD_MCQ.replace("\nExplanation: Two and two.", ""))["parseable"]
    dup = parse_mcq_strict(GOOD_MCQ.replace("D. 6", "D. 4"))
    assert dup["parseable"] and not dup["unique_options"]  # the artifact parses it, counts it apart
    assert not parse_mcq_strict(GOOD_MCQ.replace("A. 3", "A) 3"))["parseable"]


def test_mcq_strict_metrics_by_hand():
    texts = [GOOD_MCQ.replace("Correct Answer: B", f"Correct Answer: {x}") for x in "AAAB"] + ["junk", GOOD_MCQ.replace("D. 6", "D. 4")]
    m = mcq_strict_metrics([parse_mcq_strict(t) for t in texts])
    # 5 parseable of 6: A 3, B 2 -> f = (.6, .4, 0, 0); TV = 1/2 (.35 + .15 + .25 + .25) = .5
    assert m["parse_rate"] == pytest.approx(5 / 6) and m["valid_correct_answer_rate"] == pytest.approx(5 / 6)
    assert m["unique_options_rate"] == pytest.approx(4 / 6)
    assert m["freq_A"] == pytest.approx(0.6) and m["tv_uniform"] == pytest.approx(0.5)
    assert m["max_abs_deviation"] == pytest.approx(0.35)
    assert m["chi2_pvalue"] == pytest.approx(stats.chisquare([3, 2, 0, 0]).pvalue)
    assert math.isnan(mcq_strict_metrics([parse_mcq_strict("junk")])["tv_uniform"])


# -----------------------------------------------------------------------------
# NoveltyBench partition


def test_short_answer_rule():
    from calft.novelty import short_answer_rule

    assert short_answer_rule("Paris", "paris") is True  # 2 * 1 >= 1
    assert short_answer_rule("the red fox", "a red dog") is False  # shared {red}: 2 * 1 < 3
    assert short_answer_rule("the red fox", "the red dog") is True  # shared {the, red}: 4 >= 3
    assert short_answer_rule("one two three four five six", "one") is None  # 6 words: ROUGE decides


def test_rouge_threshold_and_partition_by_hand():
    from calft.novelty import ROUGE1_THRESHOLD, distinct, equivalent, partition, rouge1_f

    a = "the quick brown fox jumps over the lazy dog today"
    b = "the quick brown fox leaps over the lazy cat today"
    c = "an entirely different sentence about weather in spring and summer"
    # rouge-score unigrams with counts: a and b share the(2), quick, brown, fox, over, lazy, today = 8
    # of 10 each -> F = 0.8 > 0.458; a and c share nothing -> 0
    assert rouge1_f(a, b) == pytest.approx(0.8) and rouge1_f(a, c) == 0.0
    assert equivalent(a, b) and not equivalent(a, c)
    assert ROUGE1_THRESHOLD == 0.458
    # greedy against the class's first member: b joins a; d is like b (quick, brown, fox, leaps, cat:
    # F = 0.5) but is compared with a only (quick, brown, fox: F = 0.3 < 0.458): a class of its own.
    # Short answers go by whitespace words: "Paris" = "paris", but "paris." is another word.
    d = "a quick brown fox leaps near a sleepy cat now"
    assert rouge1_f(b, d) == pytest.approx(0.5) and rouge1_f(a, d) == pytest.approx(0.3)
    responses = [a, b, c, d, "Paris", "paris", "paris."]
    assert partition(responses) == [0, 0, 1, 2, 3, 3, 4]
    assert distinct(responses) == 5 and distinct([]) == 0


def test_curated_prompts_ship_with_their_licence():
    from importlib import resources

    from calft.novelty import load_prompts

    rows = load_prompts()
    assert len(rows) == 100 and len({r["id"] for r in rows}) == 100 and all(r["prompt"] for r in rows)
    folder = resources.files("calft") / "benchmark_data" / "noveltybench"
    assert "Copyright (c) 2025 Yiming Zhang" in (folder / "LICENSE").read_text()


# -----------------------------------------------------------------------------
# retention scoring


@pytest.mark.parametrize("text, strict, flexible", [
    ("3 + 4 = 7\n#### 7", "7", "7"),
    ("#### 1,200.50 dollars", "1200.5", "1200.5"),
    ("#### 7 or 8", None, "8"),  # two numbers on the #### line: no strict answer
    ("The answer is 12.", None, "12"),
    ("nothing here", None, None),
    ("#### -3\nso 5", "-3", "5"),
])
def test_strict_and_flexible_answers(text, strict, flexible):
    from calft.retention import flexible_answer, strict_answer

    assert strict_answer(text) == strict and flexible_answer(text) == flexible


def test_retention_items_are_fixed_and_scored():
    from calft.retention import build_items, score_outputs

    a, b = build_items("arith_add1", 5), build_items("arith_add1", 5)
    assert a == b and all(it["prompt"].startswith("Calculate") for it in a)
    for it in a:  # the gold answer is the sum in the question
        x, y = (int(t) for t in it["prompt"].removeprefix("Calculate ").rstrip(".").split(" + "))
        assert it["gold"] == str(x + y)
    gsm = build_items("gsm_symbolic", 2)
    assert gsm[0]["prompt"].count("Question:") == 3 and "####" in gsm[0]["prompt"]  # 2 worked examples
    s = score_outputs(["#### 5", "it is 6", "#### 6 no, 7"], ["5", "6", "7"])
    assert s["strict"] == pytest.approx(1 / 3) and s["flexible"] == pytest.approx(1.0)
    assert s["strict_format_rate"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="unknown retention task"):
        build_items("mmlu", 3)
