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
