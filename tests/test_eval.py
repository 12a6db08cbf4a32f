"""Exact evaluation: trie scoring vs brute force, the exact metrics vs float64 oracles, summaries,
plots and the `python -m calft.eval` CLI, all on the tiny model."""
import csv
import io
import json
import math

import numpy as np
import pytest
import torch

from calft import scoring as ev
from calft.report import format_comparison_table
from calft.prompts import prompt_text, prompt_token_ids
from calft.tokenization import answer_token_ids
from calft.support import build_support


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from calft.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tiny64(tiny_model_dir):
    from calft.models import load_model

    return load_model(str(tiny_model_dir), dtype=torch.float64)


# Integer values with shared prefixes ("1" is a prefix of "10".."12": node "1" holds EOS and
# continuations), negative values, and a continuous support.
CASES = [
    ("binomial", {"n": 12, "p": 0.4}, 2),
    ("skellam", {"mu1": 2.0, "mu2": 3.0}, 2),
    ("gaussian", {"mu": 0.5, "sigma": 0.3}, 2),
]


def _brute(model, tok, family, params, decimals):
    sup = build_support(family, params, num_decimals=decimals, max_bins=41)
    pids = prompt_token_ids(tok, prompt_text(family, params))
    ref = ev.sequence_log_probs_ref(model, pids, answer_token_ids(tok, sup.values), tok.eos_token_id)
    return sup, ref


@pytest.mark.parametrize("family, params, decimals", CASES)
def test_support_log_probs_matches_brute_force_fp32(tiny, family, params, decimals):
    model, tok = tiny
    sup, ref = _brute(model, tok, family, params, decimals)
    text = prompt_text(family, params)
    for chunk in (512, 7):  # one chunk; many chunks (ancestors live in earlier chunks)
        got = ev.support_log_probs(model, tok, text, sup.values, chunk_size=chunk)
        err = np.abs(got - ref)
        assert err.max() < 1e-5, f"chunk {chunk}: max err {err.max():.3g} at {sup.values[err.argmax()]!r}"


def test_eager_attention_agrees(tiny_model_dir, tiny):
    """The additive 4D mask works with both attention backends that honour it."""
    from calft.models import load_model

    _, tok = tiny
    eager = load_model(str(tiny_model_dir))
    eager.config._attn_implementation = "eager"
    family, params, d = CASES[1]
    sup, ref = _brute(tiny[0], tok, family, params, d)
    got = ev.support_log_probs(eager, tok, prompt_text(family, params), sup.values, chunk_size=5)
    assert eager.config._attn_implementation == "eager"
    assert np.abs(got - ref).max() < 1e-5


def test_support_log_probs_float64_is_exact(tiny, tiny64):
    _, tok = tiny
    family, params, d = CASES[2]
    sup, ref = _brute(tiny64, tok, family, params, d)
    got = ev.support_log_probs(tiny64, tok, prompt_text(family, params), sup.values, chunk_size=16)
    assert np.abs(got - ref).max() < 1e-10


def test_support_log_probs_through_peft(tiny_model_dir, tiny):
    from calft.models import add_lora, load_model

    _, tok = tiny
    model = add_lora(load_model(str(tiny_model_dir)), r=2)
    torch.manual_seed(1)
    for name, prm in model.named_parameters():
        if "lora_B" in name:
            prm.data.normal_(0, 0.5)  # a non-trivial adapter
    model.eval()
    family, params, d = CASES[0]
    sup, ref = _brute(model, tok, family, params, d)
    got = ev.support_log_probs(model, tok, prompt_text(family, params), sup.values)
    assert np.abs(got - ref).max() < 1e-5


def test_tree_attention_refuses_mask_ignoring_backends(tiny):
    model, tok = tiny
    saved = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="4D mask"):
            ev.support_log_probs(model, tok, "x", ["1"])
    finally:
        model.config._attn_implementation = saved


# ----------------------------------------------------------------------------- exact metrics


@pytest.fixture(scope="module")
def prepared(tiny):
    from calft.data import DataSettings, prepare_prompts
    from calft.splits import PromptSpec

    _, tok = tiny
    specs = [PromptSpec.make(f, p) for f, p, _ in CASES] + [PromptSpec.make("binomial", {"n": 5, "p": 0.3})]
    return prepare_prompts(tok, specs, DataSettings(num_decimals=2, max_bins=41), cache_dir=False, progress=False)


def _oracle_metrics(p, log_m):
    """Float64 definitions of docs/method.md, section 'Metrics' from per-string log-probs."""
    m = np.exp(log_m)
    M = m.sum()
    pos = p > 0
    return {
        "support_mass": M,
        "seq_kl": np.sum(p[pos] * np.log(p[pos] / m[pos])),
        "seq_kl_renorm": np.sum(p[pos] * np.log(p[pos] * M / m[pos])),
        "tv_renorm": 0.5 * np.abs(p - m / M).sum(),
    }


def test_exact_metrics_match_oracle_and_chain_rule(tiny, prepared):
    model, tok = tiny
    for prep in prepared:
        got = ev.exact_metrics(model, tok, prep, return_log_probs=True)
        ref_logm = ev.sequence_log_probs_ref(model, prep.prompt_ids, prep.answer_ids, tok.eos_token_id)
        assert np.abs(got["log_m"] - ref_logm).max() < 1e-5
        oracle = _oracle_metrics(np.asarray(prep.support.probs), got["log_m"])
        for k, v in oracle.items():
            assert got[k] == pytest.approx(v, rel=1e-10, abs=1e-12), k
        # chain rule: sum_v mass(v) KL(q(.|v) || m(.|v)) == KL over whole strings
        assert got["node_kl"] == pytest.approx(got["seq_kl"], rel=1e-9)
        assert got["seq_kl"] > got["seq_kl_renorm"] >= 0 and 0 <= got["tv_renorm"] <= 1


def test_zero_probability_strings_still_count_in_support_mass(tiny):
    """A trie built from p drops p=0 strings; their model mass must still enter M."""
    from types import SimpleNamespace

    from calft.splits import PromptSpec
    from calft.trie import build_trie

    model, tok = tiny
    spec = PromptSpec.make("binomial", {"n": 12, "p": 0.4})
    sup = build_support("binomial", spec.params_dict)
    probs = np.asarray(sup.probs).copy()
    probs[[0, 11]] = 0.0  # "0" and "11" ("11" shares the prefix "1" with kept strings)
    probs /= probs.sum()
    answers = answer_token_ids(tok, sup.values)
    text = prompt_text("binomial", spec.params_dict)
    prep = SimpleNamespace(spec=spec, text=text, prompt_ids=np.asarray(prompt_token_ids(tok, text)),
                           support=SimpleNamespace(values=sup.values, probs=probs), answer_ids=answers,
                           trie=build_trie(answers, probs, eos_id=tok.eos_token_id))
    assert (np.asarray(prep.trie.sequence_leaf) < 0).sum() == 2
    got = ev.exact_metrics(model, tok, prep, return_log_probs=True)
    ref_logm = ev.sequence_log_probs_ref(model, prep.prompt_ids, answers, tok.eos_token_id)
    assert np.abs(got["log_m"] - ref_logm).max() < 1e-5
    assert got["support_mass"] == pytest.approx(np.exp(ref_logm).sum(), rel=1e-4)
    assert got["node_kl"] == pytest.approx(got["seq_kl"], rel=1e-9)


def test_mc_logit_kl_matches_path_oracle(tiny, prepared):
    """Independent oracle: trie.path_nodes + trie.targets + a full log-softmax at each node."""
    model, tok = tiny
    prep = prepared[0]
    got = ev.exact_metrics(model, tok, prep, seed=5)
    rng = np.random.default_rng(ev.mc_seed(5, prep.text))
    p = np.asarray(prep.support.probs)
    kls = []
    for i in rng.choice(p.size, size=ev.MC_PATHS, p=p / p.sum()):
        ids = list(prep.prompt_ids) + list(prep.answer_ids[i])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        path_kl = []
        for j, node in enumerate(prep.trie.path_nodes(i)):
            prefix = list(prep.answer_ids[i][:j])
            t_ids, q = prep.trie.targets(prefix)
            assert int(node) >= 0
            row = logp[len(prep.prompt_ids) - 1 + j]
            path_kl.append(float(np.sum(q * (np.log(q) - row[torch.tensor(np.array(t_ids))].numpy()))))
        kls.append(np.mean(path_kl))
    assert got["mc_logit_kl"] == pytest.approx(np.mean(kls), rel=1e-6)


def test_exact_metrics_are_deterministic(tiny, prepared):
    model, tok = tiny
    a = ev.evaluate_exact(model, tok, prepared, progress=False)
    b = ev.evaluate_exact(model, tok, prepared, progress=False)
    assert a == b
    assert [r["family_id"] for r in a] == ["binomial", "skellam", "gaussian", "binomial"]


# ----------------------------------------------------------------------------- summaries


def test_summarize_weights_families_equally():
    rows = [
        {"family_id": "a", "seq_kl": 1.0, "valid_rate": 0.5},
        {"family_id": "a", "seq_kl": 3.0, "valid_rate": float("nan")},
        {"family_id": "a", "seq_kl": 5.0, "valid_rate": 0.7},
        {"family_id": "b", "seq_kl": 10.0, "valid_rate": 0.1},
    ]
    s = ev.summarize(rows)
    assert s["seq_kl"] == pytest.approx((3.0 + 10.0) / 2)  # not the prompt mean 4.75
    assert s["valid_rate"] == pytest.approx((0.6 + 0.1) / 2)  # NaNs skipped within a family
    assert s["num_prompts"] == 4 and s["num_families"] == 2
    assert s["per_family"]["a"]["seq_kl"] == pytest.approx(3.0)
    with pytest.raises(ValueError):
        ev.summarize([])


def test_comparison_table():
    t = format_comparison_table({"base": {"seq_kl": 1.23456, "support_mass": 1.2e-4},
                                    "soft": {"seq_kl": 0.5, "support_mass": 0.93}})
    lines = t.splitlines()
    assert lines[0] == "| model | support_mass | seq_kl |"
    assert lines[2] == "| base | 0.00012 | 1.235 |" and lines[3] == "| soft | 0.93 | 0.5 |"


# ----------------------------------------------------------------------------- plots


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plots_are_written(tmp_path):
    from calft.plots import plot_overview, plot_prompt, plot_tracking

    sup = build_support("gaussian", {"mu": 0, "sigma": 1}, num_decimals=2, max_bins=1001)
    p = np.asarray(sup.probs)
    model_p = {"base": np.full(p.size, 1 / p.size), "soft": p[::-1].copy()}
    a = plot_prompt(tmp_path / "a.png", sup.values, p, model_p, title="gaussian",
                    samples={"soft": np.random.default_rng(0).normal(size=200)})
    isup = build_support("binomial", {"n": 10, "p": 0.3})
    b = plot_prompt(tmp_path / "sub" / "b.png", isup.values, isup.probs, {"base": isup.probs}, integer=True)
    c = plot_overview(tmp_path / "o.png", {"base": {"gaussian": {"seq_kl_renorm": 1.2}, "beta": {"seq_kl_renorm": 0.9}},
                                           "soft": {"gaussian": {"seq_kl_renorm": 0.01}, "beta": {"seq_kl_renorm": 0.02}}})
    rows = [{"family_id": f, "target_mean": t, "target_sd": 1.0, "model_mean": t + 0.3, "model_sd": 1.5}
            for f in ("gaussian", "beta", "binomial") for t in (0.0, 1.0, 2.0)]
    d = plot_tracking(tmp_path / "t.png", {"base": rows, "soft": rows[::-1]})
    assert all(_is_png(x) for x in (a, b, c, d))


# ----------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tiny_model_dir, tmp_path):
    from calft.eval import main
    from calft.models import add_lora, load_model

    adapter = tmp_path / "adapter"
    add_lora(load_model(str(tiny_model_dir)), r=2).save_pretrained(str(adapter))  # zero-init B: == base
    out = tmp_path / "out"
    summary = main(["--model", str(tiny_model_dir), "--adapter", str(adapter), "--split", "test_selected",
                    "--families", "binomial,beta", "--metrics", "all", "--num-samples", "3", "--max-new-tokens",
                    "3", "--max-bins", "101", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
                    "--device", "cpu", "--quiet"])
    by_model = summary["splits"]["test_selected"]
    assert set(by_model) == {"base", "adapter"}
    for k in ev.EXACT_METRICS:  # a zero-initialized LoRA is the base model
        assert by_model["adapter"][k] == pytest.approx(by_model["base"][k], rel=1e-6), k
    assert by_model["base"]["num_prompts"] == 2 and by_model["base"]["num_families"] == 2
    rows = (out / "per_prompt.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("split,model,family_id,params")
    report = (out / "report.md").read_text()
    assert "| base |" in report and "| adapter |" in report and "test_selected" in report
    # every answer's text, one line per model and prompt; parsing them again gives the CSV's counts
    from calft.sampling import sample_metrics
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    csv_rows = list(csv.DictReader(io.StringIO((out / "per_prompt.csv").read_text())))
    assert sorted((r["model"], r["family_id"]) for r in lines) == sorted(
        (m, f) for m in ("base", "adapter") for f in ("binomial", "beta"))
    for r, c in zip(lines, csv_rows):
        assert len(r["outputs"]) == 3 and (c["model"], c["family_id"]) == (r["model"], r["family_id"])
        assert sample_metrics(r["outputs"], r["family_id"], r["params"])["num_valid"] == int(c["num_valid"])
    assert json.loads((out / "summary.json").read_text())["splits"]["test_selected"]["base"]["num_prompts"] == 2
    pngs = sorted((out / "plots").rglob("*.png"))
    assert len(pngs) == 4 and all(_is_png(x) for x in pngs)  # 2 prompts + the overview + tracking
    assert "location_r2" in report and "test_selected_tracking.png" in report
    track = summary["tracking"]["test_selected"]
    for k in ("mean_error_sd", "median_ks"):  # one prompt per family: R^2 is undefined (NaN) here
        assert track["adapter"][k] == pytest.approx(track["base"][k], rel=1e-6), k
    assert math.isfinite(by_model["base"]["valid_rate"])


def test_same_model_maps_the_embedded_alias_to_its_checkpoint(tmp_path, monkeypatch):
    """A run records the embedded model's cached path; scoring it under the alias is the same
    model (no warning in calft.eval, no refusal in the paper suite); another directory is not."""
    from calft import models

    ckpt = tmp_path / "cache" / "smollm2-135m-instruct"
    ckpt.mkdir(parents=True)
    monkeypatch.setattr(models, "_embedded_checkpoint", lambda rebuild=False: ckpt)
    assert models.same_model(str(ckpt), "smollm2-135m-instruct")
    assert models.same_model("SmolLM2-135M-Instruct", str(tmp_path / "cache" / "." / "smollm2-135m-instruct"))
    assert models.same_model("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B")
    assert not models.same_model(str(tmp_path / "other"), "smollm2-135m-instruct")
    assert not models.same_model("Qwen/Qwen3-0.6B", "smollm2-135m-instruct")
