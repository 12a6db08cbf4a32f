"""The batched sampler (calft.batch_sampling) against one-sample-at-a-time generation, and the
sampled metrics of an evaluation (calft.sampling + calft.tracking) on a tiny model whose answers
are fixed by construction, against hand-computed values."""
import math

import numpy as np
import pytest
import torch

from tiny import naive_samples

from calft.batch_sampling import common_prefix_len, plan_chunks, sample_prompts
from calft.sampling import draw_tokens, generate_samples, sample_seeds, stop_token_ids


def test_plan_chunks_cover_every_sample_once_in_order():
    assert plan_chunks(3, 5, 4) == [[(0, 0, 4)], [(0, 4, 5), (1, 0, 3)], [(1, 3, 5), (2, 0, 2)], [(2, 2, 5)]]
    assert plan_chunks(2, 3, 100) == [[(0, 0, 3), (1, 0, 3)]]
    assert common_prefix_len([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2


@pytest.mark.parametrize("max_rows", [3, 4, 64])
def test_batched_sampler_matches_the_naive_oracle(tiny, max_rows):
    """Prompts of different lengths (right-padded together), chunks that split a prompt's samples,
    and rows that stop at different steps: every answer is the one the oracle draws."""
    from calft.prompts import prompt_token_ids

    model, tok = tiny
    prompts = [prompt_token_ids(tok, t) for t in ("Generate exactly ONE random number.",
                                                   "Output ONLY the number 7, 8 or 9, please.", "a")]
    assert len({len(p) for p in prompts}) == 3
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id] + list(range(40, 140))  # many stops
    try:
        stops = stop_token_ids(model, tok)
        got = sample_prompts(model, tok, prompts, 5, seed=2, prompt_keys=["a", "b", "c"], max_rows=max_rows,
                             max_new_tokens=6)
        ref = [naive_samples(model, tok, p, sample_seeds(2, k, 5), 6, stops) for p, k in zip(prompts, "abc")]
        one = [generate_samples(model, tok, p, 5, seed=2, prompt_key=k, max_new_tokens=6) for p, k in zip(prompts, "abc")]
    finally:
        model.generation_config.eos_token_id = saved
    assert got == ref == one
    assert len({len(x) for x in sum(ref, [])}) > 1  # rows really stopped at different lengths


def test_can_still_parse_never_gives_up_on_an_answer_that_could_parse():
    """Against brute force: for every text over an alphabet of digits, signs, points, exponents,
    spaces, letters and "<" up to length 4, can_still_parse(text) is False only when no extension
    of up to 3 more characters parses; and every prefix of an accepted answer is kept going."""
    import itertools

    from calft.sampling import can_still_parse, parse_output

    alphabet = "1.-e x<"
    ext = ["".join(t) for n in range(4) for t in itertools.product(alphabet + "/>k", repeat=n)]
    stopped = 0
    for n in range(5):
        for chars in itertools.product(alphabet, repeat=n):
            text = "".join(chars)
            if not can_still_parse(text):
                stopped += 1
                assert all(parse_output(text + t)[0] != "ok" for t in ext), text
    assert stopped > 1000  # it does give up on most prose
    for answer in (" -12.5e+3 ", "+.5", "7.", "\u00a03\u3000", "<think>a</think> 4", "1E-07\n"):
        assert parse_output(answer)[0] == "ok"
        assert all(can_still_parse(answer[:k]) for k in range(len(answer) + 1)), answer
    assert not can_still_parse("Sure") and not can_still_parse("3 4") and not can_still_parse("1e5e")
    assert can_still_parse("\ufffd")  # half a character: it may still become whitespace


def test_stopping_unparseable_answers_keeps_every_status(tiny):
    """The tiny model answers garbage (every answer malformed): with stop_unparseable its answers
    are cut early and keep their status. (Valid answers are kept whole: the coin model's test
    below samples through evaluate_sampling, which stops unparseable answers, and gets "1"/"3".)"""
    from calft.prompts import prompt_token_ids
    from calft.sampling import classify_outputs

    model, tok = tiny
    prompts = [prompt_token_ids(tok, t) for t in ("Generate exactly ONE random number.", "Binomial n=4")]
    full = sample_prompts(model, tok, prompts, 40, seed=3, max_new_tokens=8)
    cut = sample_prompts(model, tok, prompts, 40, seed=3, max_new_tokens=8, stop_unparseable=True)
    assert sum(len(c) < len(f) for a, b in zip(cut, full) for c, f in zip(a, b)) > 20
    for a, b in zip(cut, full):
        sa, va = classify_outputs(a, "gaussian", {"mu": 0.0, "sigma": 1.0})
        sb, vb = classify_outputs(b, "gaussian", {"mu": 0.0, "sigma": 1.0})
        assert sa == sb and np.array_equal(va, vb)
        assert [c for c, st in zip(a, sa) if st == "valid"] == [f for f, st in zip(b, sb) if st == "valid"]


def test_batched_sampler_rejects_bad_settings(tiny):
    model, tok = tiny
    with pytest.raises(ValueError):
        sample_prompts(model, tok, [[1, 2]], 0)
    with pytest.raises(ValueError, match="top_p"):
        sample_prompts(model, tok, [[1, 2]], 2, top_p=0.0)


# ------------------------------------------------------------------------------------------------
# sampled metrics on a tiny model that answers "1" or "3" (probability 1/2 each), then stops

@pytest.fixture(scope="module")
def coin_model(tmp_path_factory):
    """The tiny Llama (untied head) rewired so that its answers are known: the blocks add nothing
    (o_proj and down_proj zero, so the last hidden state is the normed embedding of the input
    token), the prompt's last token embeds to e0, "1" and "3" embed to e1, and the head maps e0 to
    "1" and "3" (logit ~57 each: the other tokens' mass is ~1e-21) and e1 to the terminator."""
    from tiny import make_tiny_model

    from calft.models import load_model, load_tokenizer
    from calft.prompts import answer_format

    path = tmp_path_factory.mktemp("coin_model")
    make_tiny_model(path, tie=False)
    model, tok = load_model(str(path)), load_tokenizer(str(path))
    ids = {d: tok.convert_tokens_to_ids(d) for d in ("1", "3")}
    end = answer_format(tok).terminator_ids[-1]
    return model, tok, ids, end


def _rewire(model, last_prompt_token, ids, end):
    H = model.config.hidden_size
    e0, e1 = torch.zeros(H), torch.zeros(H)
    e0[0], e1[1] = 1.0, 1.0
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb[last_prompt_token] = e0
        for t in ids.values():
            emb[t] = e1
        head.zero_()
        for t in ids.values():
            head[t] = 10.0 * e0  # logit 10 x sqrt(H) after the RMS norm
        head[end] = 10.0 * e1


def test_sampled_metrics_against_a_hand_computed_case(coin_model):
    from calft.data import DataSettings, prepare_prompts
    from calft.sampling import evaluate_sampling
    from calft.splits import PromptSpec
    from calft.tracking import missed_targets, sample_tracking, summarize_tracking

    model, tok, ids, end = coin_model
    # Binomial(4, .5): mean 2, sd 1, pmf 1,4,6,4,1 / 16; Binomial(2, .5): mean 1, sd 1/sqrt(2), "3" is above n
    specs = [PromptSpec("binomial", (("n", 4), ("p", 0.5))), PromptSpec("binomial", (("n", 2), ("p", 0.5)))]
    preps = prepare_prompts(tok, specs, DataSettings(num_decimals=1, max_bins=1001), cache_dir=False, progress=False)
    assert len({int(p.prompt_ids[-1]) for p in preps}) == 1
    _rewire(model, int(preps[0].prompt_ids[-1]), ids, end)
    N = 40
    sampled = evaluate_sampling(model, tok, preps, num_samples=N, seed=5, batch_size=16, progress=False)
    # by hand: sample j is the lower-id digit when its first uniform is below 1/2
    low, high = sorted(ids, key=ids.get)
    expected = [[low if np.random.default_rng(s).random(32)[0] < 0.5 else high for s in sample_seeds(5, p.text, N)]
                for p in preps]
    assert [s.outputs for s in sampled] == expected
    f = [sum(o == "1" for o in outs) / N for outs in expected]  # fraction of "1" per prompt
    assert 0 < f[0] < 1 and 0 < f[1] < 1
    rows = []
    for prep, smp in zip(preps, sampled):
        rows.append({"family_id": "binomial", **smp.metrics, **sample_tracking(prep.support, smp.values, seed=0)})
    a, b = rows
    # prompt A: every answer inside 0..4; mean 3 - 2f, population sd 2 sqrt(f (1 - f))
    assert a["valid_rate"] == 1.0 and a["support_violation_rate"] == 0.0
    assert a["sample_mean"] == pytest.approx(3 - 2 * f[0]) and a["sample_sd"] == pytest.approx(2 * math.sqrt(f[0] * (1 - f[0])))
    assert a["target_mean"] == pytest.approx(2.0) and a["target_sd"] == pytest.approx(1.0)
    # KS: the sample CDF is 0, f, f, 1, 1 at 0..4 against 1, 5, 11, 15, 16 / 16
    assert a["sample_ks"] == pytest.approx(max(1 / 16, abs(f[0] - 5 / 16), abs(f[0] - 11 / 16)))
    # prompt B: the "3"s are above n = 2 (support violations); the valid "1"s: mean 1 (exact), sd 0
    assert b["valid_rate"] == pytest.approx(f[1]) and b["support_violation_rate"] == pytest.approx(1 - f[1])
    assert b["count_above_support"] == round(N * (1 - f[1]))
    assert b["sample_mean"] == 1.0 and b["sample_sd"] == 0.0 and b["sample_ks"] == pytest.approx(1 / 4)
    # perfect_ks: as many draws from the target as there are valid samples, seeded by (0, n)
    for prep, row in zip(preps, rows):
        x = np.array([float(v) for v in prep.support.values])
        draws = np.random.default_rng([0, row["num_valid_samples"]]).choice(x, size=row["num_valid_samples"],
                                                                            p=prep.support.probs / prep.support.probs.sum())
        brute = max(abs(np.mean(draws <= t) - prep.support.probs[x <= t].sum()) for t in np.union1d(x, draws))
        assert row["perfect_ks"] == pytest.approx(brute, abs=1e-12)
        assert row["perfect_mean"] == pytest.approx(draws.mean(), abs=1e-12)
    s = summarize_tracking(rows)
    # location, in target-sd units, centred within the family: targets 2 (sd 1) and 1 (sd 1/sqrt 2)
    ss_tot = ((2 - 1.5) / 1) ** 2 + ((1 - 1.5) / math.sqrt(0.5)) ** 2
    assert s["sample_location_r2"] == pytest.approx(1 - (a["sample_mean"] - 2) ** 2 / ss_tot)
    # slope with weights 1/sd^2 = 1, 2: weighted centres of targets (2 + 2) / 3 and means (mA + 2) / 3
    tc, mc = (2 * 1 + 1 * 2) / 3, (a["sample_mean"] + 2 * 1) / 3
    slope = ((2 - tc) * (a["sample_mean"] - mc) + 2 * (1 - tc) * (1 - mc)) / ((2 - tc) ** 2 + 2 * (1 - tc) ** 2)
    assert s["sample_location_slope"] == pytest.approx(slope)
    assert s["per_family"]["binomial"]["sample_location_slope"] == pytest.approx(slope)
    # the perfect sampler's slope: the same formula on the means of its draws
    pa, pb = a["perfect_mean"], b["perfect_mean"]
    pc = (pa + 2 * pb) / 3
    perfect_slope = ((2 - tc) * (pa - pc) + 2 * (1 - tc) * (pb - pc)) / ((2 - tc) ** 2 + 2 * (1 - tc) ** 2)
    assert s["perfect_location_slope"] == pytest.approx(perfect_slope)
    # its sd by the CLT: deviations 2/3 and -1/3 from the weighted centre, weights 1 and 2, n_A and n_B
    # valid samples: sqrt((4/9) / (1 n_A) + (1/9) / ((1/2) n_B)) / (1 (4/9) + 2 (1/9))
    n_a, n_b = a["num_valid_samples"], b["num_valid_samples"]
    assert s["perfect_slope_sd"] == pytest.approx(math.sqrt(4 / (9 * n_a) + 2 / (9 * n_b)) / (2 / 3))
    # sd within 2x: A when 2 sqrt(f(1-f)) is in [1/2, 2]; B never (all valid samples equal)
    in_a = 0.5 <= 2 * math.sqrt(f[0] * (1 - f[0])) <= 2
    assert s["sample_sd_within_2x"] == pytest.approx((int(in_a) + 0) / 2)
    assert s["median_sample_ks"] == pytest.approx((a["sample_ks"] + 0.25) / 2)
    assert s["median_perfect_ks"] == pytest.approx((a["perfect_ks"] + b["perfect_ks"]) / 2)
    # pooled over all 2N samples: N + N f_B inside the support
    assert s["in_support_rate"] == pytest.approx((N + N * f[1]) / (2 * N))
    assert s["support_violation_rate"] == pytest.approx(N * (1 - f[1]) / (2 * N))
    missed = missed_targets(s)
    assert any(m.startswith("in_support_rate") for m in missed)
    assert ("sampled slope below" in " ".join(missed)) == (slope < 0.7)


def test_beyond_range_and_clipped_location_on_the_coin_model(coin_model):
    """The coin model answers "1" or "3" whatever it is asked. Gaussian(10, 0.5) at 1 decimal has the
    range [8.5, 11.5] (its 0.001 / 0.999 quantiles 10 -/+ 1.545, inward onto the 0.1 grid): every
    answer is below it, so beyond_range_rate is 1 and each clipped mean is the range's low end; with
    Gaussian(20, 0.5) beside it (range [18.5, 21.5]) the clipped means are 8.5 and 18.5, 1.5 below
    each target mean, about 3 target sds, against target means 5 sds from their centre."""
    from calft.data import DataSettings, prepare_prompts
    from calft.sampling import evaluate_sampling
    from calft.splits import PromptSpec
    from calft.tracking import sample_tracking, summarize_tracking

    model, tok, ids, end = coin_model
    specs = [PromptSpec("gaussian", (("mu", mu), ("sigma", 0.5))) for mu in (10, 20)]
    preps = prepare_prompts(tok, specs, DataSettings(num_decimals=1, max_bins=1001), cache_dir=False, progress=False)
    assert len({int(p.prompt_ids[-1]) for p in preps}) == 1
    _rewire(model, int(preps[0].prompt_ids[-1]), ids, end)
    sampled = evaluate_sampling(model, tok, preps, num_samples=30, seed=2, batch_size=16, progress=False)
    rows = [{"family_id": "gaussian", **smp.metrics, **sample_tracking(prep.support, smp.values, seed=0)}
            for prep, smp in zip(preps, sampled)]
    for mu, prep, row, smp in zip((10, 20), preps, rows, sampled):
        x = [float(v) for v in prep.support.values]
        assert (min(x), max(x)) == (pytest.approx(mu - 1.5), pytest.approx(mu + 1.5))
        assert set(smp.outputs) <= {"1", "3"} and row["num_valid_samples"] == 30
        assert row["num_beyond_range"] == 30 and row["sample_clipped_mean"] == pytest.approx(mu - 1.5)
        assert row["target_mean"] == pytest.approx(mu, abs=1e-9) and row["target_sd"] == pytest.approx(0.5, rel=0.01)
    s = summarize_tracking(rows)
    sd = [r["target_sd"] for r in rows]
    assert s["beyond_range_rate"] == 1.0
    assert s["sample_clipped_location_r2"] == pytest.approx(
        1 - sum((1.5 / v) ** 2 for v in sd) / sum((5 / v) ** 2 for v in sd))
