"""Trie-mode training and the shared trie-node forward (calft.tree), on tiny models.

- the trie loss is exactly E_{s~p}[soft path loss of s] (enumeration), and the mean over sampled
  paths converges to it (Monte Carlo);
- its gradient equals sum_s p(s) grad(path loss of s) from plain full forwards (float64);
- the node cap: all nodes = the full loss; a small cap is unbiased over seeds;
- the training forward gives the same log-probs as score_trie;
- sliding-window layers (Qwen2, Mistral, Gemma-3, gpt-oss) with the window shorter than the prompt;
- a node with 1000 children (multi-digit tokenizers) end to end;
- python -m calft.train --mode trie (and --share-prompt) runs, and resume equals uninterrupted.
"""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats
import torch

from calft import scoring as ev
from calft.tree import SoftTargetKLLoss
from calft.batching import (build_batch, build_tree_batch, tree_rows, tree_strings,
                            trie_row_weights)
from calft.losses import SparseTargets, linear_soft_target_kl
from calft.models import lm_head_weight
from calft.prompts import prompt_text, prompt_token_ids
from calft.tokenization import answer_token_ids
from calft.support import build_support
from calft.tree import score_trie
from calft.trie import build_trie


@pytest.fixture(scope="module")
def tiny64(tiny_model_dir):
    from calft.models import load_model

    return load_model(str(tiny_model_dir), dtype=torch.float64)


@pytest.fixture(scope="module")
def prepared(tiny_tokenizer, tmp_path_factory):
    """Gaussian at 1 decimal (small max_bins) and binomial prompts: real supports and tries."""
    from calft.data import DataSettings, prepare_prompts
    from calft.splits import get_split

    specs = get_split("train", families=["gaussian", "binomial"], max_specs=2)
    return prepare_prompts(tiny_tokenizer, specs, DataSettings(num_decimals=1, max_bins=30),
                           cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def normalized(prep) -> np.ndarray:
    p = np.asarray(prep.support.probs, dtype=np.float64)
    return p / p.sum()


def path_losses(objective, prompts, pi, tok) -> np.ndarray:
    """The soft path loss of every support string of prompt pi (G = 1), one plain forward each."""
    out = []
    for s in range(len(prompts[pi].answer_ids)):
        batch = build_batch(prompts, np.array([[pi, s]]), mode="soft", pad_id=tok.pad_token_id,
                            eos_id=tok.eos_token_id, global_batch=1)
        with torch.no_grad():
            out.append(objective(batch).item())
    return np.asarray(out)


def tree_loss(objective, prompts, pis, tok, **kw) -> float:
    batch = build_tree_batch(prompts, np.array([[pi, 0] for pi in pis]), pad_id=tok.pad_token_id,
                             global_batch=len(pis), **kw)
    with torch.no_grad():
        return objective(batch).item()


# ------------------------------------------------------------------------------------------------
# the trie loss is the expected path loss

def test_trie_loss_is_expected_path_loss(tiny64, tiny_tokenizer, prepared):
    objective = SoftTargetKLLoss(tiny64)
    rng = np.random.default_rng(0)
    for pi, prep in enumerate(prepared):
        p, losses = normalized(prep), path_losses(objective, prepared, pi, tiny_tokenizer)
        trie = tree_loss(objective, prepared, [pi], tiny_tokenizer)
        exact = float(p @ losses)
        # float64 model and loss; the batch weights are float32 (relative 6e-8 each)
        assert abs(trie - exact) < 1e-6 * exact, f"prompt {pi}: trie {trie!r} vs E_p[path loss] {exact!r}"
        draws = losses[rng.choice(p.size, size=4000, p=p)]  # Monte Carlo: the paper's soft recipe
        se = draws.std() / np.sqrt(draws.size)
        assert abs(draws.mean() - trie) < 4 * se + 1e-9, (pi, draws.mean(), trie, se)
    # several prompts in one padded tree batch (prefix sharing on): the mean of the per-prompt losses
    one = [tree_loss(objective, prepared, [pi], tiny_tokenizer) for pi in range(len(prepared))]
    batch = build_tree_batch(prepared, np.array([[pi, 0] for pi in range(len(prepared))]),
                             pad_id=tiny_tokenizer.pad_token_id, global_batch=len(prepared))
    assert batch.prefix_len > 0
    with torch.no_grad():
        together = objective(batch).item()
    assert together == pytest.approx(np.mean(one), rel=1e-9)
    packed = build_tree_batch(prepared, np.array([[pi, 0] for pi in range(len(prepared))]),
                              pad_id=tiny_tokenizer.pad_token_id, global_batch=len(prepared), pack=True)
    assert packed.input_ids.shape == (1, batch.num_tokens - (len(prepared) - 1) * batch.prefix_len)
    with torch.no_grad():
        assert objective(packed).item() == pytest.approx(np.mean(one), rel=1e-9)


def test_share_prompt_is_mean_path_loss(tiny64, tiny_tokenizer, prepared):
    """max_nodes = 0 (soft --share-prompt): the k sampled paths of a prompt in one tree forward give
    exactly the mean of their soft path losses (a path drawn twice counts twice)."""
    objective = SoftTargetKLLoss(tiny64)
    for pi in range(len(prepared)):
        losses = path_losses(objective, prepared, pi, tiny_tokenizer)
        strings = tree_strings(prepared, pi, seed=3, epoch=1, num=5)
        got = tree_loss(objective, prepared, [pi], tiny_tokenizer, max_nodes=0, samples_per_prompt=5,
                        seed=3, epoch=1)
        assert got == pytest.approx(losses[strings].mean(), rel=1e-6), (pi, strings)


def test_uniform_paths_mean_path_loss_and_draws(tiny64, tiny_tokenizer, prepared):
    """--uniform-paths k: the K target paths are the ones drawn without it, then k paths uniform over
    the strings of positive probability; the tree forward gives the mean soft path loss over all
    K + k paths (every path weighted alike), which estimates (K E_p + k E_u)[path loss] / (K + k)."""
    objective = SoftTargetKLLoss(tiny64)
    for pi, prep in enumerate(prepared):
        losses = path_losses(objective, prepared, pi, tiny_tokenizer)
        strings = tree_strings(prepared, pi, seed=3, epoch=1, num=4, uniform=2)
        np.testing.assert_array_equal(strings[:4], tree_strings(prepared, pi, seed=3, epoch=1, num=4))
        got = tree_loss(objective, prepared, [pi], tiny_tokenizer, max_nodes=0, samples_per_prompt=4,
                        seed=3, epoch=1, uniform_paths=2)
        assert got == pytest.approx(losses[strings].mean(), rel=1e-6), (pi, strings)
        # the uniform draws: every string of positive probability alike (chi-square), none of zero
        p = normalized(prep)
        draws = np.concatenate([tree_strings(prepared, pi, seed=s, epoch=0, num=1, uniform=50)[1:]
                                for s in range(200)])
        positive = np.flatnonzero(p > 0)
        assert np.isin(draws, positive).all()
        counts = np.bincount(draws, minlength=p.size)[positive]
        assert stats.chisquare(counts).pvalue > 1e-4, counts
    with pytest.raises(ValueError, match="max_nodes = 0"):
        build_tree_batch(prepared, np.array([[0, 0]]), pad_id=tiny_tokenizer.pad_token_id, global_batch=1,
                         max_nodes=-1, uniform_paths=1)


def test_weights_are_visit_mass_over_path_length(prepared):
    """w(v) = sum_{s visits v} p(s)/(L_s+1); root: E[1/(L+1)]; all on one length = mass/(L+1)."""
    for prep in prepared:
        p, trie = normalized(prep), prep.trie
        w = trie_row_weights(prep)
        want = np.zeros(trie.num_nodes)
        for s in range(p.size):
            want[trie.path_nodes(s)] += p[s] / (len(prep.answer_ids[s]) + 1)
        np.testing.assert_allclose(w, want, rtol=1e-12, atol=1e-15)
        lengths = np.array([len(a) for a in prep.answer_ids])
        if (lengths == lengths[0]).all():
            mass = ev.target_node_mass(trie, np.asarray(trie.sequence_leaf), p)
            internal = np.diff(np.asarray(trie.row_ptr)) > 0
            np.testing.assert_allclose(w[internal], mass[internal] / (lengths[0] + 1), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# gradients: trie mode vs brute-force enumeration

def toy_prompt(tok, strings, probs):
    """A PreparedPrompt-like toy: answers as token lists ("1" is a prefix of "12" and "13")."""
    answers = answer_token_ids(tok, strings)
    trie = build_trie(answers, np.asarray(probs), eos_id=tok.eos_token_id)
    return SimpleNamespace(prompt_ids=np.asarray(prompt_token_ids(tok, prompt_text("binomial", {"n": 20, "p": 0.3}))),
                           support=SimpleNamespace(probs=np.asarray(probs, dtype=np.float64)),
                           answer_ids=[list(a) for a in answers], trie=trie)


def brute_force_loss(model, prep, eos_id) -> torch.Tensor:
    """sum_s p(s) * mean over the L_s+1 positions of KL(q(.|v) || model(.|v)): plain full forwards
    of prompt + s (strings of one length batched), dense float64 log-softmax."""
    p = normalized(prep)
    trie, P, total = prep.trie, len(prep.prompt_ids), 0.0
    by_length = {}
    for s, ans in enumerate(prep.answer_ids):
        by_length.setdefault(len(ans), []).append(s)
    for L, group in by_length.items():
        seqs = torch.tensor([list(prep.prompt_ids) + list(prep.answer_ids[s]) for s in group])
        logits = model(input_ids=seqs, use_cache=False).logits.double()  # [S, P + L, V]
        logp = torch.log_softmax(logits[:, P - 1:], dim=-1)  # the L+1 trained positions
        for i, s in enumerate(group):
            kl = 0.0
            for j, v in enumerate(trie.path_nodes(s)):
                lo, hi = trie.row_ptr[v], trie.row_ptr[v + 1]
                q = torch.tensor(trie.probs[lo:hi], dtype=torch.float64)
                kl = kl + (q * (q.log() - logp[i, j, torch.tensor(trie.token_ids[lo:hi])])).sum()
            total = total + p[s] * kl / (L + 1)
    return total


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    """LlamaRMSNorm computes in float32 even in a float64 model, so sums of gradients grouped
    differently (the shared prompt once vs once per string) would round at float32; keep it float64."""
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


@pytest.mark.parametrize("lora", [False, True], ids=["all-params", "lora"])
def test_trie_gradient_matches_enumeration(tiny_model_dir, tiny_tokenizer, float64_rmsnorm, lora):
    from calft.models import add_lora, load_model

    tok = tiny_tokenizer
    prep = toy_prompt(tok, ["1", "12", "13", "2", "205", "-3"], [0.3, 0.1, 0.15, 0.2, 0.05, 0.2])
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), dtype=torch.float64)
    if lora:
        model = add_lora(model, r=4, alpha=8, dropout=0.0).double()
        for n, prm in model.named_parameters():  # non-zero B so the LoRA path is live
            if "lora_B" in n:
                torch.nn.init.normal_(prm, std=0.5)
    else:
        model.requires_grad_(True)
    model.eval()
    params = [prm for prm in model.parameters() if prm.requires_grad]
    want = brute_force_loss(model, prep, tok.eos_token_id)
    want_grads = torch.autograd.grad(want, params)
    batch = build_tree_batch([prep], np.array([[0, 0]]), pad_id=tok.pad_token_id, global_batch=1)
    # the batch stores float32 weights and targets; use the exact float64 ones so only float64
    # round-off remains (the rows are the internal nodes in ascending order)
    nodes = np.nonzero(np.diff(prep.trie.row_ptr) > 0)[0]
    batch.weights = torch.as_tensor(trie_row_weights(prep)[nodes])
    batch.targets = SparseTargets(batch.targets.row_ptr, batch.targets.token_ids, torch.as_tensor(
        np.concatenate([prep.trie.probs[prep.trie.row_ptr[v]:prep.trie.row_ptr[v + 1]] for v in nodes])))
    got = SoftTargetKLLoss(model)(batch)
    got_grads = torch.autograd.grad(got, params)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for prm, a, b in zip(params, got_grads, want_grads):
        err = (a - b).abs().max().item()
        assert err <= 1e-10 * max(1.0, b.abs().max().item()), f"max grad err {err:.3g} (scale {b.abs().max():.3g})"


# ------------------------------------------------------------------------------------------------
# node cap

def test_node_cap(tiny64, tiny_tokenizer, prepared):
    tok, pi = tiny_tokenizer, 1
    prep = prepared[pi]
    objective = SoftTargetKLLoss(tiny64)
    full = build_tree_batch(prepared, np.array([[pi, 0]]), pad_id=tok.pad_token_id, global_batch=1)
    internal = np.nonzero(np.diff(prep.trie.row_ptr) > 0)[0]
    with torch.no_grad():  # per-node KL once, so the many seeds below need no forward
        weight, bias = lm_head_weight(tiny64)
        kl = linear_soft_target_kl(objective.hidden_rows(full), weight, full.targets, reduction="none").numpy()
        full_loss = objective(full).item()
    kl_of = dict(zip(internal.tolist(), kl))
    capped = tree_loss(objective, prepared, [pi], tok, max_nodes=internal.size, samples_per_prompt=3)
    assert capped == full_loss  # the cap at all nodes is the full trie loss, bit for bit
    cap, k = 5, 2
    w_full = trie_row_weights(prep)
    heaviest = internal[np.argsort(-w_full[internal], kind="stable")[:cap]]
    estimates = []
    for seed in range(3000):
        strings = np.random.default_rng(seed).choice(len(prep.answer_ids), size=k, p=normalized(prep))
        nodes, w = tree_rows(prep, max_nodes=cap, strings=strings)
        assert {0} <= set(nodes.tolist()) <= set(internal.tolist())
        np.testing.assert_array_equal(w[np.isin(nodes, heaviest)], w_full[np.intersect1d(nodes, heaviest)])
        assert np.isin(heaviest, nodes).all()  # the cap's nodes are always there, with their exact weight
        parents = np.asarray(prep.trie.parent)[nodes[nodes > 0]]
        assert np.isin(parents, nodes).all(), "not closed under ancestors"
        estimates.append(sum(wi * kl_of[int(v)] for v, wi in zip(nodes, w)))
    estimates = np.asarray(estimates)
    se = estimates.std() / np.sqrt(estimates.size)
    assert se > 0 and abs(estimates.mean() - full_loss) < 4 * se, (estimates.mean(), full_loss, se)
    # the capped forward itself: its loss is the sum of its weights x the per-node KL
    for epoch in range(2):
        batch = build_tree_batch(prepared, np.array([[pi, 0]]), pad_id=tok.pad_token_id, global_batch=1,
                                 max_nodes=cap, samples_per_prompt=k, seed=7, epoch=epoch)
        assert batch.input_ids.shape[1] < full.input_ids.shape[1]
        with torch.no_grad():
            got = objective(batch).item()
        strings = tree_strings(prepared, pi, seed=7, epoch=epoch, num=k)
        nodes, w = tree_rows(prep, max_nodes=cap, strings=strings)
        assert got == pytest.approx(sum(wi * kl_of[int(v)] for v, wi in zip(nodes, w)), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# the training forward is the scoring forward; sliding-window layers

def support_prompt(tok, family, params, decimals=1, max_bins=30):
    """A PreparedPrompt-like object for any tokenizer (no cache)."""
    sup = build_support(family, params, num_decimals=decimals, max_bins=max_bins)
    answers = answer_token_ids(tok, sup.values)
    return SimpleNamespace(prompt_ids=np.asarray(prompt_token_ids(tok, prompt_text(family, params))),
                           support=SimpleNamespace(probs=np.asarray(sup.probs), values=sup.values),
                           answer_ids=[list(a) for a in answers],
                           trie=build_trie(answers, np.asarray(sup.probs), eos_id=tok.eos_token_id))


def training_edge_log_probs(model, prompts, eos_id, pad_id, pack=False) -> list[np.ndarray]:
    """log m(t|v) at every edge of each prompt's trie, from the training path (tree batch of all
    prompts, padded with prefix sharing or packed, LM head on the gathered rows), float64 log-softmax."""
    batch = build_tree_batch(prompts, np.array([[i, 0] for i in range(len(prompts))]), pad_id=pad_id,
                             global_batch=len(prompts), pack=pack)
    with torch.no_grad():
        h = SoftTargetKLLoss(model).hidden_rows(batch)  # [N, H]
        weight, bias = lm_head_weight(model)
        logp = torch.log_softmax((h @ weight.T).double(), dim=-1).numpy()
    out, r = [], 0
    for prep in prompts:
        trie = prep.trie
        edge = np.full(trie.num_edges, np.nan)
        for v in np.nonzero(np.diff(trie.row_ptr) > 0)[0]:  # rows: internal nodes, ascending
            lo, hi = trie.row_ptr[v], trie.row_ptr[v + 1]
            edge[lo:hi] = logp[r, trie.token_ids[lo:hi]]
            r += 1
        out.append(edge)
    assert r == len(batch.gather_index)
    return out


def test_training_forward_equals_score_trie(tiny_model_dir, tiny_tokenizer):
    from calft.models import add_lora, load_model

    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = add_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0)
    for n, prm in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(prm, std=0.3)
    prompts = [support_prompt(tok, "gaussian", {"mu": 0.5, "sigma": 0.8}),
               support_prompt(tok, "binomial", {"n": 12, "p": 0.4}, decimals=0)]
    for pack in (False, True):
        got = training_edge_log_probs(model, prompts, tok.eos_token_id, tok.pad_token_id, pack=pack)
        for prep, edge in zip(prompts, got):
            want = score_trie(model, prep.prompt_ids, prep.trie, chunk_size=7)
            assert np.abs(edge - want).max() < 2e-5, (pack, np.abs(edge - want).max())


WINDOW = 8  # shorter than every prompt (~60 tokens) and than prompt + answer


def sliding_model(kind: str, vocab: int, eos_id: int, pad_id: int, impl: str):
    """A tiny random model with sliding-window layers (window WINDOW), built from its config."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=eos_id, pad_token_id=pad_id, sliding_window=WINDOW)
    mixed = ["sliding_attention", "full_attention", "sliding_attention"]
    config, cls = {
        # Qwen2: layers >= max_window_layers slide
        "qwen2": lambda: (tf.Qwen2Config(**common, use_sliding_window=True, max_window_layers=1),
                          tf.Qwen2ForCausalLM),
        "mistral": lambda: (tf.MistralConfig(**common), tf.MistralForCausalLM),  # every layer slides
        "gemma3": lambda: (tf.Gemma3TextConfig(**common, head_dim=8, layer_types=mixed), tf.Gemma3ForCausalLM),
        "gpt_oss": lambda: (tf.GptOssConfig(**{**common, "intermediate_size": 32}, head_dim=8, num_local_experts=4,
                                            num_experts_per_tok=2, layer_types=mixed), tf.GptOssForCausalLM),
    }[kind]()
    config._attn_implementation = impl
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("kind, impl", [("qwen2", "sdpa"), ("mistral", "sdpa"), ("gemma3", "eager"),
                                        ("gemma3", "sdpa"), ("gpt_oss", "eager")])
def test_sliding_window_layers(kind, impl, tiny_tokenizer):
    """score_trie and the training forward equal one full forward per string (sequence_log_probs_ref)
    on a model whose sliding window is shorter than the prompt; the window really matters."""
    tok = tiny_tokenizer
    model = sliding_model(kind, len(tok), tok.eos_token_id, tok.pad_token_id, impl)
    prompts = [support_prompt(tok, "binomial", {"n": 12, "p": 0.4}, decimals=0),
               support_prompt(tok, "gaussian", {"mu": -1.0, "sigma": 0.5})]
    assert len(prompts[0].prompt_ids) > 4 * WINDOW
    trained = training_edge_log_probs(model, prompts, tok.eos_token_id, tok.pad_token_id)
    packed = training_edge_log_probs(model, prompts, tok.eos_token_id, tok.pad_token_id, pack=True)
    for prep, edge, edge_packed in zip(prompts, trained, packed):
        ref = ev.sequence_log_probs_ref(model, prep.prompt_ids, prep.answer_ids, tok.eos_token_id)
        for chunk in (256, 5):
            got = ev.node_log_mass(prep.trie, score_trie(model, prep.prompt_ids, prep.trie, chunk_size=chunk))
            got = got[prep.trie.sequence_leaf]
            assert np.abs(got - ref).max() < 1e-5, f"chunk {chunk}: max err {np.abs(got - ref).max():.3g}"
        for e in (edge, edge_packed):
            from_training = ev.node_log_mass(prep.trie, e)[prep.trie.sequence_leaf]
            assert np.abs(from_training - ref).max() < 1e-5, np.abs(from_training - ref).max()
    wide = sliding_model(kind, len(tok), tok.eos_token_id, tok.pad_token_id, impl)
    wide.config.sliding_window = 4096  # same weights, window longer than everything
    for layer in wide.modules():
        if getattr(layer, "sliding_window", None):
            layer.sliding_window = 4096
    prep = prompts[0]
    no_window = ev.sequence_log_probs_ref(wide, prep.prompt_ids, prep.answer_ids, tok.eos_token_id)
    ref = ev.sequence_log_probs_ref(model, prep.prompt_ids, prep.answer_ids, tok.eos_token_id)
    assert np.abs(no_window - ref).max() > 1e-3  # the test would catch a mask without the window


# ------------------------------------------------------------------------------------------------
# multi-digit tokenizers: a node with 1000 children

def test_node_with_1000_children_trains(float64_rmsnorm):
    """Llama-3-like: 1000 one-token answers (3-digit groups) at the root, one of them continued.
    The trie loss equals the enumeration over full forwards, and a few steps lower it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from calft.models import add_lora

    V, eos, K = 1100, 1, 1000
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=eos, pad_token_id=0)
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(config).double().eval(), r=4, alpha=8, dropout=0.0).double()
    rng = np.random.default_rng(0)
    answers = [[t] for t in range(100, 100 + K)] + [[100, 7], [100, 8, 9]]
    probs = rng.dirichlet(np.ones(len(answers)))
    trie = build_trie(answers, probs, eos_id=eos)
    assert int(np.diff(trie.row_ptr).max()) == K
    prep = SimpleNamespace(prompt_ids=rng.integers(2, V, size=20), answer_ids=answers, trie=trie,
                           support=SimpleNamespace(probs=probs))
    objective = SoftTargetKLLoss(model)
    batch = build_tree_batch([prep], np.array([[0, 0]]), pad_id=0, global_batch=1)
    # rows: the root (K children), the K one-token nodes (EOS; "100" also 7 and 8), "100 7", "100 8", "100 8 9"
    assert batch.targets.num_rows == 1 + K + 3 and batch.targets.nnz == K + (K + 2) + 3
    with torch.no_grad():
        loss = objective(batch).item()
        want = brute_force_loss(model, prep, eos).item()
        edge = score_trie(model, prep.prompt_ids, trie)
        some = list(range(0, K, 50)) + [K, K + 1]  # one forward per string: a sample of them
        ref = ev.sequence_log_probs_ref(model, prep.prompt_ids, [answers[i] for i in some], eos)
    assert loss == pytest.approx(want, rel=1e-6)  # float32 targets and weights in the batch
    assert np.abs(ev.node_log_mass(trie, edge)[trie.sequence_leaf[some]] - ref).max() < 1e-9
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        step_loss = objective(batch)
        step_loss.backward()
        opt.step()
    with torch.no_grad():
        assert objective(batch).item() < loss - 1e-3


# ------------------------------------------------------------------------------------------------
# python -m calft.train --mode trie

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["CALFT_CACHE_DIR"] = str(tmp_path_factory.mktemp("calft_cache"))
    e["OMP_NUM_THREADS"] = "1"  # every run at one thread: bitwise comparable (issue 11)
    e.pop("TRITON_INTERPRET", None)
    return e


def trie_args(model_dir, out_dir, *extra):
    """tests/test_train.py's tiny run in trie mode: 8 prompts, batch 4 prompts (2 x 2 accumulation),
    a cap of 12 nodes per prompt covered by 2 sampled paths, so the sampling must replay exactly."""
    from test_train import tiny_args

    args = tiny_args(model_dir, out_dir, "--mode", "trie", "--trie-max-nodes", "12", "--samples-per-prompt",
                     "2", "--lora-dropout", "0", *extra)
    return args


@pytest.fixture(scope="module")
def trie_run(tiny_model_dir, tmp_path_factory, env):
    from test_train import run_train

    out = tmp_path_factory.mktemp("runs") / "trie"
    run_train(trie_args(tiny_model_dir, out, "--checkpoint-interval", "3"), env)
    return out


def test_trie_mode_trains(trie_run):
    from test_train import read_metrics

    metrics = read_metrics(trie_run)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(np.isfinite(m["loss"]) and m["tokens"] > 0 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (trie_run / "adapter_model.safetensors").is_file()
    assert json.loads((trie_run / "config.json").read_text())["mode"] == "trie"


def test_trie_mode_resume_equals_uninterrupted(trie_run, tiny_model_dir, tmp_path, env):
    from safetensors.torch import load_file
    from test_train import read_metrics, run_train

    out = tmp_path / "resumed"
    run_train(trie_args(tiny_model_dir, out, "--stop-at-step", "2"), env)
    run_train(trie_args(tiny_model_dir, out, "--resume"), env)
    want, got = read_metrics(trie_run), read_metrics(out)
    assert [m["loss"] for m in got] == [m["loss"] for m in want]  # exactly, not approximately
    assert [m["grad_norm"] for m in got] == [m["grad_norm"] for m in want]
    a, b = load_file(trie_run / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trie_mode_torchrun_two_processes_match_one(trie_run, tiny_model_dir, tmp_path, env):
    from safetensors.torch import load_file
    from test_train import read_metrics, run_train

    run_train(trie_args(tiny_model_dir, tmp_path / "two"), env, torchrun=2)
    one, two = read_metrics(trie_run), read_metrics(tmp_path / "two")
    for a, b in zip(one, two):  # same global batch; fp32 sums in another order
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    a, b = load_file(trie_run / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_share_prompt_runs(tiny_model_dir, tmp_path, env):
    from test_train import read_metrics, run_inline, tiny_args

    out = tmp_path / "shared"
    run_inline(tiny_args(tiny_model_dir, out, "--share-prompt", "--samples-per-prompt", "3", "--trie-pack"),
               env["CALFT_CACHE_DIR"])
    metrics = read_metrics(out)
    assert len(metrics) == 6 and all(np.isfinite(m["loss"]) for m in metrics)


@pytest.mark.parametrize("flags, message", [
    (["--trie-max-nodes", "5"], "--trie-max-nodes applies to --mode trie"),
    (["--mode", "trie", "--trie-max-nodes", "-2"], "--trie-max-nodes must be >= 0 or -1"),
    (["--mode", "hard", "--share-prompt"], "--share-prompt applies to --mode soft"),
    (["--trie-pack"], "--trie-pack applies to --mode trie and --share-prompt"),
])
def test_trie_flags_give_clear_errors(flags, message, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from test_train import tiny_args, train_in_process

    code, err = train_in_process(tiny_args(tiny_model_dir, tmp_path / "out", *flags), monkeypatch, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
