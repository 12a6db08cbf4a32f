"""MCQ answer-position balance and open-ended generation benchmarks: parsing, metrics vs scipy,
prompt sets, and a smoke run on the tiny model."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from calft.open_ended import (
    load_prompt_set,
    mcq_metrics,
    normalize_output,
    parse_mcq_answer,
    run_open_ended,
    top_p_support_size,
    unique_rate,
)


@pytest.mark.parametrize("text, letter", [
    ("Q?\nA) x\nB) y\nC) z\nD) w\nAnswer: B", "B"),
    ("...\nanswer: c", "C"),
    ("**Answer:** D", "D"),
    ("The correct answer is (A).", "A"),
    ("Answer - B\nActually, Answer: C", "C"),  # the last declaration wins
    ("Answer: E", None),  # not an option
    ("A) one\nB) two", None),  # no declaration
    ("Answer: Because", None),  # a word, not a letter
])
def test_parse_mcq_answer(text, letter):
    assert parse_mcq_answer(text) == letter


def test_mcq_metrics_match_scipy():
    answers = ["A"] * 10 + ["B"] * 5 + ["C"] * 3 + ["D"] * 2 + [None] * 4
    m = mcq_metrics(answers)
    ref = stats.chisquare([10, 5, 3, 2])
    assert m["num_questions"] == 24 and m["parse_rate"] == pytest.approx(20 / 24)
    assert m["chi2_stat"] == pytest.approx(ref.statistic) and m["chi2_pvalue"] == pytest.approx(ref.pvalue)
    # TV = 1/2 (|.5-.25| + |.25-.25| + |.15-.25| + |.1-.25|) = .25
    assert m["tv_uniform"] == pytest.approx(0.25)
    assert mcq_metrics(["A"] * 8)["tv_uniform"] == pytest.approx(0.75)  # always "A": 1 - 1/K
    assert math.isnan(mcq_metrics([None, None])["tv_uniform"])


def test_open_ended_metrics():
    assert normalize_output("  'Cat'.\n") == "cat"
    assert unique_rate(["Cat", "cat.", "dog", "Dog!"]) == 0.5
    assert top_p_support_size(torch.tensor([0.5, 0.3, 0.15, 0.05])) == 3  # .5+.3 < .9 <= .95
    assert top_p_support_size(torch.tensor([0.05, 0.95])) == 1
    assert top_p_support_size(torch.full((10,), 0.1), top_p=1.0) == 10
    with pytest.raises(ValueError):
        top_p_support_size(torch.tensor([1.0]), top_p=0)


def test_prompt_sets_ship_with_the_package():
    oe = load_prompt_set("open_ended")["prompts"]
    assert len(oe) == 102 and len(set(oe)) == 102
    mcq = load_prompt_set("mcq")
    assert mcq["letters"] == "ABCD" and len(mcq["topics"]) >= 20 and "{topic}" in mcq["instruction"]
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompt_set("nope")


def test_run_open_ended_smoke(tiny_model_dir):
    from calft.models import load_model, load_tokenizer

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    a = run_open_ended(model, tok, num_prompts=2, samples_per_prompt=4, max_new_tokens=3)
    b = run_open_ended(model, tok, num_prompts=2, samples_per_prompt=4, max_new_tokens=3)
    assert a == b  # seeded
    assert a["num_prompts"] == 2 and 0 < a["unique_rate"] <= 1
    assert all(1 <= r["first_token_support"] <= len(tok) for r in a["per_prompt"])
    # A random tiny model spreads its first token widely: far more than one token for 90% mass.
    assert np.mean([r["first_token_support"] for r in a["per_prompt"]]) > 10
