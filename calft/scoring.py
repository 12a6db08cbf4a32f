"""Scoring: the model's probability of every canonical answer, in one pass over the trie, and
`evaluate_models`, the one evaluation path of calft.train, calft.eval and the calibration curve.

Notation (docs/method.md, sections 'Trie targets' and 'Metrics'). A prompt has a target p over support strings S. Each string s,
tokenized alone and followed by EOS, is a root-to-leaf path of the trie; node v is a token prefix
with visit mass mass(v) = sum of p(s) over the strings below v, and target q(t|v) = mass(vt)/mass(v).
The model gives m(t|v) at every node, hence
    log m(s) = sum over the path of s of log m(t|v)        (probability of emitting exactly s + EOS)
    M               = sum_S m(s)                                           support_mass
    seq_kl          = sum_S p(s) log(p(s)/m(s))
    seq_kl_renorm   = sum_S p(s) log(p(s) M/m(s)) = seq_kl + log M
    tv_renorm       = 1/2 sum_S |p(s) - m(s)/M|
    node_kl         = sum_v mass(v) KL(q(.|v) || m(.|v))  (= seq_kl by the chain rule)
    mc_logit_kl     = mean over 4 paths s ~ p of the mean of KL(q(.|v) || m(.|v)) along the path
                      (the artifact's Monte-Carlo logit KL, seeded)

Scoring (calft.tree.score_trie, shared with trie-mode training) runs the prompt once into a KV
cache, then every internal trie node after it with a tree attention mask: about one forward token
per internal node, instead of one full forward of prompt + answer per string.
Log-softmax and all sums are float64.
"""
from __future__ import annotations

import math
import time
import zlib
from contextlib import contextmanager

import numpy as np
import torch

from calft.sampling import evaluate_sampling
from calft.prompts import render_chat, terminator_ids
from calft.tokenization import answer_token_ids
from calft.trie import build_trie
from calft.tracking import exact_tracking, sample_tracking, summarize_tracking
# The trie-node forward lives in calft.tree (shared with trie-mode training); re-exported here.
from calft.tree import TREE_ATTENTION, edge_sources, node_log_mass, score_trie, subtree_sums  # noqa: F401

EXACT_METRICS = ("support_mass", "seq_kl", "seq_kl_renorm", "tv_renorm", "node_kl", "mc_logit_kl")
MC_PATHS = 4  # the artifact's logit-KL estimate averages 4 sampled paths


# -----------------------------------------------------------------------------
# trie scoring (see calft.tree for score_trie and tree attention)


def _answer_trie(tokenizer, values, rendered_prompt: str):
    """Trie over the canonical in-context tokens of `values` + the template's terminator."""
    answers = answer_token_ids(tokenizer, list(values), rendered_prompt)
    return _terminated_trie(answers, terminator_ids(tokenizer))


def _terminated_trie(answers, terminator):
    """build_trie over answers + terminator (all its tokens: a chain when it has several)."""
    term = [int(t) for t in np.atleast_1d(terminator)]
    if len(term) == 1:
        return build_trie(answers, np.ones(len(answers)), eos_id=term[0])
    return build_trie([list(map(int, a)) + term for a in answers], np.ones(len(answers)))


def support_log_probs(model, tokenizer, prompt_text: str, support_values, *, chunk_size: int = 256) -> np.ndarray:
    """float64[len(support_values)]: log m(s) of each canonical string s followed by EOS.

    The prompt is chat-formatted exactly as in training (calft.prompts.prompt_token_ids); s is
    tokenized in context and "EOS" is the template's terminator (calft.prompts.answer_format).
    """
    values = list(support_values)
    if not values:
        raise ValueError("support_values is empty")
    rendered = render_chat(tokenizer, prompt_text)
    trie = _answer_trie(tokenizer, values, rendered)
    prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
    edge_logp = score_trie(model, prompt_ids, trie, chunk_size=chunk_size)
    return node_log_mass(trie, edge_logp)[np.asarray(trie.sequence_leaf)]


@torch.no_grad()
def sequence_log_probs_ref(model, prompt_ids, answer_ids, eos_id) -> np.ndarray:
    """Brute-force oracle: one full forward of prompt + answer + EOS per string (float64 sums).

    eos_id: the terminator, one token id or a sequence of them."""
    device = next(model.parameters()).device
    prompt = list(map(int, prompt_ids))
    term = [int(t) for t in np.atleast_1d(eos_id)]
    out = np.empty(len(answer_ids), dtype=np.float64)
    for i, ans in enumerate(answer_ids):
        seq = prompt + list(map(int, ans)) + term
        logits = model(input_ids=torch.tensor([seq], device=device)).logits[0].double()  # [T, V]
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)  # rows predicting answer + EOS
        out[i] = logp.gather(1, torch.tensor(seq[len(prompt):], device=device)[:, None]).sum().item()
    return out


# -----------------------------------------------------------------------------
# exact metrics


def target_node_mass(trie, leaf: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """mass(v) under target p: leaf masses summed up the tree (float64, from p, not trie.probs)."""
    return subtree_sums(trie, leaf, probs)


def _scoring_trie(prepared):
    """The prepared trie, or (when it dropped zero-probability strings) one holding every string."""
    trie = prepared.trie
    leaf = np.asarray(trie.sequence_leaf, dtype=np.int64)
    if (leaf >= 0).all():
        return trie, leaf
    term = getattr(prepared, "terminator_ids", ())
    if not len(term):  # older objects: the last edge of any path is the (one-token) terminator
        term = [int(np.asarray(trie.parent_token)[leaf[leaf >= 0][0]])]
    full = _terminated_trie([list(a) for a in prepared.answer_ids], term)
    return full, np.asarray(full.sequence_leaf, dtype=np.int64)


def mc_seed(seed: int, prompt_text: str) -> np.random.SeedSequence:
    """Seed of one prompt's Monte-Carlo paths: (seed, crc32 of the prompt text)."""
    return np.random.SeedSequence([int(seed), zlib.crc32(prompt_text.encode("utf-8"))])


def exact_metrics(model, tokenizer, prepared, *, seed: int = 0, chunk_size: int = 256,
                  return_log_probs: bool = False) -> dict:
    """The exact metrics of docs/method.md, section 'Metrics' (see the module docstring) for one PreparedPrompt.

    With return_log_probs=True the dict also holds "log_m": float64 log m(s) per support string.
    `tokenizer` is unused (the prompt is already tokenized) and kept for the public signature.
    """
    del tokenizer
    p = np.asarray(prepared.support.probs, dtype=np.float64)
    trie, leaf = _scoring_trie(prepared)
    edge_logp = score_trie(model, prepared.prompt_ids, trie, chunk_size=chunk_size)
    log_m = node_log_mass(trie, edge_logp)[leaf]
    pos = p > 0
    log_mass = float(np.logaddexp.reduce(log_m))
    seq_kl = float(np.sum(p[pos] * (np.log(p[pos]) - log_m[pos])))
    # Node KL, edge by edge: sum_e mass(child_e) * (log q_e - log m_e) over edges with target mass.
    mass = target_node_mass(trie, leaf, p)
    src = edge_sources(trie)
    child = np.asarray(trie.child, dtype=np.int64)
    w = mass[child]
    on = w > 0
    log_q = np.zeros_like(w)
    log_q[on] = np.log(w[on]) - np.log(mass[src[on]])
    edge_term = np.where(on, w * (log_q - edge_logp), 0.0)
    node_kl_total = float(edge_term.sum())
    # Per-node KL(q(.|v) || m(.|v)) = sum over v's edges of q (log q - log m) = edge_term / mass(v).
    per_node = np.zeros(trie.num_nodes, dtype=np.float64)
    np.add.at(per_node, src[on], edge_term[on] / mass[src[on]])
    rng = np.random.default_rng(mc_seed(seed, prepared.text))
    paths = rng.choice(p.size, size=MC_PATHS, p=p / p.sum())
    path_kls = [per_node[trie.path_nodes(int(i))].mean() for i in paths]  # nodes before each token
    out = {
        "support_mass": math.exp(log_mass),
        "log_support_mass": log_mass,
        "seq_kl": seq_kl,
        "seq_kl_renorm": seq_kl + log_mass,
        "tv_renorm": float(0.5 * np.abs(p - np.exp(log_m - log_mass)).sum()),
        "node_kl": node_kl_total,
        "mc_logit_kl": float(np.mean(path_kls)),
        "num_strings": int(p.size),
        "num_nodes": int(trie.num_nodes),
    }
    out.update(exact_tracking(prepared.support, log_m - log_mass))  # does the mean follow the prompt?
    if return_log_probs:
        out["log_m"] = log_m
    return out


def evaluate_exact(model, tokenizer, prepared_list, progress: bool = True, *, seed: int = 0,
                   chunk_size: int = 256, return_log_probs: bool = False) -> list[dict]:
    """exact_metrics for every prepared prompt: one row per prompt with family_id and params."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    rows = []
    try:
        for prep in tqdm(prepared_list, desc="exact eval", disable=not progress):
            row = {"family_id": prep.spec.family_id, "params": dict(prep.spec.params_dict)}
            row.update(exact_metrics(model, tokenizer, prep, seed=seed, chunk_size=chunk_size,
                                     return_log_probs=return_log_probs))
            rows.append(row)
    finally:
        model.train(was_training)
    return rows


# -----------------------------------------------------------------------------
# summaries

SUMMARY_METRICS = EXACT_METRICS + (
    "valid_rate", "support_violation_rate", "mean_error", "variance_error", "wasserstein_1",
    "ks_stat", "ks_pvalue", "chi2_stat", "chi2_pvalue",
)


def _nanmean(xs) -> float:
    xs = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    xs = xs[~np.isnan(xs)]
    return float(xs.mean()) if xs.size else float("nan")


def summarize(rows) -> dict:
    """Equal family weight: mean over prompts within each family (NaNs skipped), then over families.

    Returns {metric: value, ..., "num_prompts", "num_families", "per_family": {family: {metric: value}}}
    for every metric of SUMMARY_METRICS present in the rows.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("summarize needs at least one row")
    metrics = [m for m in SUMMARY_METRICS if any(m in r for r in rows)]
    by_family: dict[str, list[dict]] = {}
    for r in rows:
        by_family.setdefault(r["family_id"], []).append(r)
    per_family = {f: {m: _nanmean(r.get(m) for r in rs) for m in metrics} | {"num_prompts": len(rs)}
                  for f, rs in by_family.items()}
    out = {m: _nanmean(pf[m] for pf in per_family.values()) for m in metrics}
    out.update(num_prompts=len(rows), num_families=len(per_family), per_family=per_family)
    return out


# -----------------------------------------------------------------------------
# evaluate_models: the one evaluation path (calft.train's final pass, calft.eval, the curve)


@contextmanager
def without_adapter(model):
    """Yield `model` (a PeftModel) with its adapter disabled: the base model, without a reload."""
    with model.disable_adapter():
        yield model


def evaluate_models(models, tokenizer, prepared: dict, *, exact: bool = True, exact_splits=None, sample_labels=None,
                    num_samples: int = 0, seed: int = 0, chunk_size: int = 256, batch_size: int = 1024,
                    max_new_tokens: int = 32,
                    keep_log_probs: bool = False, autocast=None, after_model=None, progress: bool = True) -> dict:
    """Score every model on every split's prepared prompts; one row per (split, model, prompt).

    models: [(label, open)] where open() is a context manager yielding the model (the base model of
        a PeftModel: `without_adapter(model)`; a freshly loaded one: see calft.eval).
    prepared: {split: [PreparedPrompt]}. exact: the exact metrics (docs/method.md, section
        'Metrics'), on every split or only those in exact_splits; sampling: num_samples answers per
        prompt at temperature 1 from the models in sample_labels (None = every model; a (label,
        split) pair: that model on that split only; 0 samples = none), with their tracking metrics.
    autocast: (device type, dtype) for torch.autocast, or None. after_model(label, model): called
        while the model is open, after its splits (e.g. extra benchmarks).
    Returns {"rows": {(split, label): [row]}, "summaries": {split: {label: summarize(rows)}},
    "tracking": {split: {label: summarize_tracking(rows)}}, "seconds": {(label, split): s},
    "probs": {(split, label): [m(s)/M per string]} (keep_log_probs), "samples": {(split, label):
    [valid sampled values]}, "outputs": {(split, label): [the answers' texts]}}. A (split, model) with neither exact nor sampled metrics has no entry.
    """
    out = {"rows": {}, "summaries": {}, "tracking": {}, "seconds": {}, "probs": {}, "samples": {}, "outputs": {}}
    for label, open_model in models:
        with open_model() as model:
            ctx = torch.autocast(autocast[0], dtype=autocast[1]) if autocast else _nothing()
            with ctx:
                for split, preps in prepared.items():
                    t0 = time.perf_counter()
                    rows = [{"family_id": p.spec.family_id, "params": dict(p.spec.params_dict)} for p in preps]
                    do_exact = exact and (exact_splits is None or split in exact_splits)
                    do_sample = num_samples > 0 and (sample_labels is None or label in sample_labels
                                                     or (label, split) in sample_labels)
                    if not (do_exact or do_sample):
                        continue
                    if do_exact:
                        scored = evaluate_exact(model, tokenizer, preps, progress, seed=seed,
                                                chunk_size=chunk_size, return_log_probs=keep_log_probs)
                        if keep_log_probs:
                            out["probs"][split, label] = [np.exp(r.pop("log_m") - r["log_support_mass"]) for r in scored]
                        for row, r in zip(rows, scored):
                            row.update({k: v for k, v in r.items() if k not in ("family_id", "params")})
                    if do_sample:
                        sampled = evaluate_sampling(model, tokenizer, preps, num_samples=num_samples, seed=seed,
                                                    batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                    progress=progress)
                        out["samples"][split, label] = [smp.values for smp in sampled]
                        out["outputs"][split, label] = [smp.outputs for smp in sampled]
                        for row, smp, prep in zip(rows, sampled, preps):
                            row.update(smp.metrics, **sample_tracking(prep.support, smp.values, seed=seed,
                                                                      num_answers=smp.metrics["num_samples"]))
                    out["seconds"][label, split] = time.perf_counter() - t0
                    out["rows"][split, label] = rows
                    out["summaries"].setdefault(split, {})[label] = summarize(rows)
                    out["tracking"].setdefault(split, {})[label] = summarize_tracking(rows)
            if after_model is not None:
                after_model(label, model)
    return out


@contextmanager
def _nothing():
    yield
