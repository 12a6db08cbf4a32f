"""calft.batching: epoch plans (balanced order, sampling, sharding), batch contents against the
trie's own `targets(prefix)`, weights, and the batch loss against a float64 dense-logits oracle."""
import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from calft.tree import SoftTargetKLLoss
from calft.batching import (balanced_order, build_batch, epoch_plan, epoch_size, global_num_positions, micro_batches,
                            sample_strings, step_items, steps_per_epoch)


def fake_prompt(family, probs):
    return SimpleNamespace(spec=SimpleNamespace(family_id=family), support=SimpleNamespace(probs=np.asarray(probs)))


# ------------------------------------------------------------------------------------------------
# order and sampling (no model, no trie)

def test_balanced_order_round_robin():
    fams = ["a"] * 5 + ["b"] * 2 + ["c"] * 3
    order = balanced_order(fams, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(10))
    got = [fams[i] for i in order]
    # rounds: (a b c) (a b c) (a c) (a) (a): families in first-appearance order each round
    assert got == ["a", "b", "c", "a", "b", "c", "a", "c", "a", "a"]
    # within a family the order is a permutation that depends on the generator
    perms = {tuple(i for i in balanced_order(fams, np.random.default_rng(s)) if fams[i] == "a") for s in range(8)}
    assert len(perms) > 1


def test_epoch_plan_deterministic_and_reshuffled():
    prompts = [fake_prompt(f, [0.5, 0.5]) for f in ["x"] * 6 + ["y"] * 6]
    a = epoch_plan(prompts, seed=3, epoch=0)
    assert np.array_equal(a, epoch_plan(prompts, seed=3, epoch=0))
    assert not np.array_equal(a, epoch_plan(prompts, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_plan(prompts, seed=4, epoch=0))
    assert sorted(a[:, 0].tolist()) == list(range(12))  # every prompt once per epoch
    assert [prompts[p].spec.family_id for p in a[:4, 0]] == ["x", "y", "x", "y"]


def test_family_balanced_epoch_hand_computed():
    # a: 5 prompts, b: 2, c: 1 -> every family fills 5 slots: a once each, b's two prompts 3 and 2
    # times, c's one prompt 5 times; 15 items in round-robin order over the three families
    fams = ["a"] * 5 + ["b"] * 2 + ["c"]
    prompts = [fake_prompt(f, [0.25, 0.25, 0.25, 0.25]) for f in fams]
    assert epoch_size(fams) == 8 and epoch_size(fams, balance_families=True) == 15
    for epoch in range(4):
        plan = epoch_plan(prompts, seed=1, epoch=epoch, balance_families=True)
        counts = np.bincount(plan[:, 0], minlength=8)
        assert plan.shape == (15, 2)
        assert counts[:5].tolist() == [1] * 5 and sorted(counts[5:7].tolist()) == [2, 3] and counts[7] == 5
        assert [fams[i] for i in plan[:9, 0]] == ["a", "b", "c"] * 3
    # a repeated prompt gets strings of its own draw, not one string copied (5 uniform draws of 4)
    repeats = [epoch_plan(prompts, seed=s, epoch=0, balance_families=True) for s in range(6)]
    assert any(len(set(p[p[:, 0] == 7, 1].tolist())) > 1 for p in repeats)
    # with samples_per_prompt, every repeat brings its own samples; equal families change nothing
    assert epoch_plan(prompts, seed=1, epoch=0, samples_per_prompt=3, balance_families=True).shape == (45, 2)
    equal = [fake_prompt(f, [0.5, 0.5]) for f in ["x"] * 3 + ["y"] * 3]
    assert sorted(epoch_plan(equal, seed=2, epoch=0, balance_families=True)[:, 0].tolist()) == list(range(6))


def test_family_weights_hand_computed():
    # a: 2 prompts, b: 4; balanced share 4 each; a at weight 2 fills 8 slots, two per round:
    # rounds (a a b) x 4. At weight 1.5: round(6) slots in rounds floor(k / 1.5) = 0 0 1 2 2 3
    fams = ["a"] * 2 + ["b"] * 4
    prompts = [fake_prompt(f, [0.5, 0.5]) for f in fams]
    assert epoch_size(fams, balance_families=True, family_weights={"a": 2}) == 12
    assert epoch_size(fams, balance_families=True, family_weights={"a": 1.5}) == 10
    assert epoch_size(fams, balance_families=True, family_weights={"b": 0.1}) == 5  # at least one prompt
    for epoch in range(3):
        plan = epoch_plan(prompts, seed=0, epoch=epoch, balance_families=True, family_weights={"a": 2})
        assert "".join(fams[i] for i in plan[:, 0]) == "aab" * 4
        assert np.bincount(plan[:, 0], minlength=6).tolist() == [4, 4, 1, 1, 1, 1]
    plan = epoch_plan(prompts, seed=0, epoch=0, balance_families=True, family_weights={"a": 1.5})
    assert "".join(fams[i] for i in plan[:, 0]) == "aab" "ab" "aab" "ab"
    order = balanced_order(["x"] * 3 + ["y"] * 3, np.random.default_rng(0), {"y": 3})
    assert ["x" if i < 3 else "y" for i in order] == ["x", "y", "y", "y", "x", "x"]  # y's 3 in round 0
    # weights of 1 (or none given) leave the plan exactly as the unweighted one
    assert np.array_equal(epoch_plan(prompts, seed=5, epoch=1, balance_families=True, family_weights={"a": 1.0}),
                          epoch_plan(prompts, seed=5, epoch=1, balance_families=True))
    with pytest.raises(ValueError, match="need balance_families"):
        epoch_plan(prompts, seed=0, epoch=0, family_weights={"a": 2})


def test_sampling_matches_probabilities():
    probs = np.array([0.6, 0.0, 0.3, 0.1])
    n = 40_000
    counts = np.bincount(sample_strings(probs, n, np.random.default_rng(1)), minlength=4)
    assert counts[1] == 0  # a zero-probability string is never drawn
    sigma = np.sqrt(n * probs * (1 - probs))
    assert np.all(np.abs(counts - n * probs) <= 5 * sigma + 1e-9), (counts, n * probs)
    plan = epoch_plan([fake_prompt("x", probs)], seed=0, epoch=0, samples_per_prompt=2000)
    assert plan.shape == (2000, 2) and set(plan[:, 1].tolist()) <= {0, 2, 3}


def test_sharding_covers_global_batch():
    plan = np.arange(40).reshape(20, 2)
    g = step_items(plan, 1, global_batch=8)
    shards = [step_items(plan, 1, global_batch=8, world_size=4, rank=r) for r in range(4)]
    assert np.array_equal(np.concatenate(shards), g)
    assert np.array_equal(g, plan[8:16])
    with pytest.raises(ValueError, match="divisible"):
        step_items(plan, 0, global_batch=8, world_size=3, rank=0)
    with pytest.raises(ValueError, match="larger than one epoch"):
        steps_per_epoch(5, 8)
    assert steps_per_epoch(20, 8) == 2


def test_kept_last_partial_batch():
    # the artifact trains on the last partial batch: 1988 prompts / 32 -> 63 steps, the last of 4
    assert steps_per_epoch(1988, 32, keep_last=True) == 63 and steps_per_epoch(1988, 32) == 62
    assert steps_per_epoch(5, 8, keep_last=True) == 1 and steps_per_epoch(16, 8, keep_last=True) == 2
    plan = np.arange(2 * 1988).reshape(1988, 2)
    last = step_items(plan, 62, global_batch=32)
    assert np.array_equal(last, plan[1984:])
    shards = [step_items(plan, 62, global_batch=32, world_size=4, rank=r) for r in range(4)]
    assert [len(s) for s in shards] == [1, 1, 1, 1] and np.array_equal(np.concatenate(shards), last)
    micro = micro_batches(last, 4)
    assert [len(m) for m in micro] == [1, 1, 1, 1]
    assert [len(m) for m in micro_batches(plan[:3], 4)] == [1, 1, 1, 0]  # the trainer pads the empty one
    full = step_items(plan, 3, global_batch=32)  # full steps: the same consecutive micro-batches as before
    assert all(np.array_equal(m, full[8 * i:8 * (i + 1)]) for i, m in enumerate(micro_batches(full, 4)))


# ------------------------------------------------------------------------------------------------
# real prompts: tiny tokenizer, supports, tries

@pytest.fixture(scope="module")
def prepared(tiny_tokenizer, tmp_path_factory):
    from calft.data import DataSettings, prepare_prompts
    from calft.splits import get_split

    specs = get_split("train", families=["gaussian", "binomial", "uniform"], max_specs=2)
    return prepare_prompts(tiny_tokenizer, specs, DataSettings(num_decimals=1, max_bins=60),
                           cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def test_soft_batch_matches_trie(prepared, tiny_tokenizer):
    tok = tiny_tokenizer
    items = epoch_plan(prepared, seed=0, epoch=0)[:5]
    batch = build_batch(prepared, items, mode="soft", pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        global_batch=10)
    B, T = batch.input_ids.shape
    flat = batch.input_ids.reshape(-1)
    row = 0
    for b, (p, s) in enumerate(items):
        prep = prepared[p]
        answer = list(prep.answer_ids[s])
        seq = list(prep.prompt_ids) + answer
        assert batch.input_ids[b, :len(seq)].tolist() == seq
        assert batch.attention_mask[b].tolist() == [1] * len(seq) + [0] * (T - len(seq))
        for j in range(len(answer) + 1):
            pos = int(batch.gather_index[row])
            assert divmod(pos, T) == (b, len(prep.prompt_ids) - 1 + j)
            if j < len(answer):  # the position's next input token is the answer token it predicts
                assert int(flat[pos + 1]) == answer[j]
            ids, probs = prep.trie.targets(answer[:j])
            lo, hi = batch.targets.row_ptr[row], batch.targets.row_ptr[row + 1]
            assert batch.targets.token_ids[lo:hi].tolist() == ids.tolist()
            np.testing.assert_allclose(batch.targets.probs[lo:hi].numpy(), probs, rtol=1e-6)
            assert (answer + [tok.eos_token_id])[j] in ids.tolist()  # its own next token is a target
            row += 1
        seq_w = batch.weights[row - len(answer) - 1:row]
        torch.testing.assert_close(seq_w.sum(), torch.tensor(1 / 10), rtol=1e-6, atol=0)
        assert torch.all(seq_w == seq_w[0])
    assert row == len(batch.gather_index) == len(batch.targets.row_ptr) - 1
    assert batch.targets.probs.dtype == torch.float32
    assert batch.num_tokens == int(batch.attention_mask.sum())
    P0 = batch.prefix_len  # the longest common prefix, ending before the first trained position
    assert torch.all(batch.input_ids[:, :P0] == batch.input_ids[:1, :P0])
    assert P0 == min(len(prepared[p].prompt_ids) for p, _ in items) - 1 or \
        not torch.all(batch.input_ids[:, P0] == batch.input_ids[0, P0])


def test_hard_batch_one_hot_token_mean(prepared, tiny_tokenizer):
    tok = tiny_tokenizer
    plan = epoch_plan(prepared, seed=0, epoch=0, samples_per_prompt=4)
    items = plan[:8]
    total = global_num_positions(prepared, items)
    assert total == sum(len(prepared[p].answer_ids[s]) + 1 for p, s in items)
    parts = [build_batch(prepared, items[k:k + 4], mode="hard", pad_id=tok.pad_token_id,
                         eos_id=tok.eos_token_id, global_batch=8, global_positions=total) for k in (0, 4)]
    assert sum(float(b.weights.sum()) for b in parts) == pytest.approx(1.0, rel=1e-6)
    b0 = parts[0]
    assert torch.equal(b0.targets.row_ptr, torch.arange(len(b0.gather_index) + 1))
    assert torch.all(b0.targets.probs == 1)
    expect = []
    for p, s in items[:4]:
        expect += list(prepared[p].answer_ids[s]) + [tok.eos_token_id]
    assert b0.targets.token_ids.tolist() == expect


def dense_reference_loss(model, batch):
    """Dense oracle: full [B, T, V] logits, log_softmax, KL per trained row, weighted sum."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    total = torch.zeros((), dtype=torch.float64)
    t = batch.targets
    for r, pos in enumerate(batch.gather_index.tolist()):
        ids = t.token_ids[t.row_ptr[r]:t.row_ptr[r + 1]]
        q = t.probs[t.row_ptr[r]:t.row_ptr[r + 1]].double()
        total = total + batch.weights[r].double() * (q * (q.log() - logp[pos, ids])).sum()
    return total


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_batch_loss_matches_dense_oracle(prepared, tiny_tokenizer, tiny_model_dir, mode):
    from calft.models import add_lora, load_model

    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = add_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0)
    for name, p in model.named_parameters():  # LoRA B starts at 0; make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    items = epoch_plan(prepared, seed=1, epoch=0)[:4]
    total = global_num_positions(prepared, items)
    batch = build_batch(prepared, items, mode=mode, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        global_batch=4, global_positions=total)
    assert batch.prefix_len >= 8  # the chat template's shared start runs once (batch 1)
    unshared = SoftTargetKLLoss(model)(dataclasses.replace(batch, prefix_len=0))
    loss = SoftTargetKLLoss(model)(batch)
    torch.testing.assert_close(loss, unshared, rtol=1e-5, atol=1e-6)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    ref_model = copy.deepcopy(model).double()
    ref = dense_reference_loss(ref_model, batch)
    ref.backward()
    # fp32 fused path vs the float64 model + dense loss; tolerances for fp32 on a tiny model
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for n, p in ref_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n].double(), p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_support_mixed_targets_give_the_gradient_of_kl_plus_off_support_term():
    """float64 autograd of sum_r w_r [KL(q_r || p_r) - lam log P_S(r)] against the soft-target op
    fed with support_mixed_targets, on rows of 2, 3 and 1 target entries (odd sizes, V = 11)."""
    from calft.losses import SparseTargets, linear_soft_target_kl
    from calft.tree import support_mixed_targets

    torch.manual_seed(0)
    N, H, V, lam = 3, 5, 11, 0.7
    rows = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64)
    rp, ids = torch.tensor([0, 2, 5, 6]), torch.tensor([1, 4, 0, 2, 3, 7])
    pr = torch.tensor([0.3, 0.7, 0.2, 0.5, 0.3, 1.0], dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    logp = (rows @ W.T).log_softmax(-1)
    ref = sum(w[r] * ((pr[rp[r]:rp[r + 1]] * (pr[rp[r]:rp[r + 1]].log() - logp[r, ids[rp[r]:rp[r + 1]]])).sum()
                      - lam * logp[r, ids[rp[r]:rp[r + 1]]].logsumexp(0)) for r in range(N))
    g_ref, = torch.autograd.grad(ref, rows)
    targets, weights = support_mixed_targets(rows.detach(), W, None, SparseTargets(rp, ids, pr), w, lam)
    for r in range(N):  # each row's mixed target is still a distribution on its ids
        assert abs(float(targets.probs[rp[r]:rp[r + 1]].sum()) - 1.0) < 1e-12
    g, = torch.autograd.grad(linear_soft_target_kl(rows, W, targets, weights=weights, reduction="sum"), rows)
    err = (g - g_ref).abs().max().item()
    assert err < 1e-6 * g_ref.abs().max().item(), f"max gradient error {err:.3g}"


def test_support_log_ratio_loss_hand_case_and_dense_float64_oracle():
    """calft.tree.support_log_ratio_loss: sum_r w_r mean_{k in S} (log(p_S(k)+eps) - log(q_k+eps))^2 / 2.

    Hand case: logits (0, ln 3) on S -> p_S = (1/4, 3/4); q = (1/2, 1/2), eps = 0 -> errors
    (ln 1/2, ln 3/2), w = 2 -> 2 x ((ln 2)^2 + (ln 1.5)^2) / 4. Then value and gradients (rows, W,
    bias) against a dense float64 oracle (the full-vocabulary softmax, restricted to S and
    renormalized) on rows of 2, 3 and 1 entries at the default floor; a tail child's gradient is
    not scaled by its mass as the KL's is; 0 with a zero gradient where p_S = q.
    """
    from calft.losses import SparseTargets
    from calft.tree import LOG_RATIO_FLOOR, support_log_ratio_loss

    h = torch.ones(1, 1, dtype=torch.float64)
    W = torch.tensor([[0.0], [5.0], [np.log(3.0)]], dtype=torch.float64)
    t = SparseTargets(torch.tensor([0, 2]), torch.tensor([0, 2]), torch.tensor([0.5, 0.5], dtype=torch.float64))
    got = support_log_ratio_loss(h, W, None, t, torch.tensor([2.0], dtype=torch.float64), eps=0.0)
    assert float(got) == pytest.approx(2 * (np.log(2.0) ** 2 + np.log(1.5) ** 2) / 4, rel=1e-12)
    # Huber cap delta = 0.5: |ln 1/2| = 0.69 > 0.5 counts 0.5 x (0.69 - 0.25); ln 1.5 = 0.41 stays squared
    got = support_log_ratio_loss(h, W, None, t, torch.tensor([2.0], dtype=torch.float64), eps=0.0, cap=0.5)
    assert float(got) == pytest.approx(2 * (0.5 * (np.log(2.0) - 0.25) + np.log(1.5) ** 2 / 2) / 2, rel=1e-12)

    torch.manual_seed(0)
    N, H, V, eps = 3, 5, 11, LOG_RATIO_FLOOR
    rows = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    Wr = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    rp, ids = torch.tensor([0, 2, 5, 6]), torch.tensor([1, 4, 0, 2, 3, 7])
    q = torch.tensor([0.3, 0.7, 0.0005, 0.5, 0.4995, 1.0], dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    probs = (rows @ Wr.T + b).softmax(-1)  # dense [N, V]
    ref = 0.0
    for r in range(N):
        S = slice(int(rp[r]), int(rp[r + 1]))
        p_s = probs[r, ids[S]] / probs[r, ids[S]].sum()
        ref = ref + w[r] * (((p_s + eps).log() - (q[S] + eps).log()) ** 2 / 2).mean()
    g_ref = torch.autograd.grad(ref, (rows, Wr, b))
    got = support_log_ratio_loss(rows, Wr, b, SparseTargets(rp, ids, q), w)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-12) and float(ref.detach()) > 1e-3
    for g, gr in zip(torch.autograd.grad(got, (rows, Wr, b)), g_ref):
        torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-12)
    # the capped term against the same oracle with the Huber branch written out
    delta, ref_cap = 0.3, 0.0
    probs = (rows @ Wr.T + b).softmax(-1)  # a fresh graph: the one above was freed by autograd.grad
    for r in range(N):
        S = slice(int(rp[r]), int(rp[r + 1]))
        p_s = probs[r, ids[S]] / probs[r, ids[S]].sum()
        e = (p_s + eps).log() - (q[S] + eps).log()
        ref_cap = ref_cap + w[r] * torch.where(e.abs() <= delta, e * e / 2, delta * (e.abs() - delta / 2)).mean()
    got = support_log_ratio_loss(rows, Wr, b, SparseTargets(rp, ids, q), w, cap=delta)
    assert float(got.detach()) == pytest.approx(float(ref_cap.detach()), rel=1e-12)
    assert float(got.detach()) < float(ref.detach())  # some |e| > 0.3 here: the cap lowers the term
    for g, gr in zip(torch.autograd.grad(got, (rows, Wr, b)), torch.autograd.grad(ref_cap, (rows, Wr, b))):
        torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-12)
    # SoftTargetKLLoss hands both support terms one log p_S: the same value, gradients and mixed targets
    from calft.tree import _support_log_probs, support_mixed_targets
    t = SparseTargets(rp, ids, q)
    support = _support_log_probs(rows, Wr, b, t)
    shared = support_log_ratio_loss(rows, Wr, b, t, w, support=support)
    assert float(shared.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    for g, gr in zip(torch.autograd.grad(shared, (rows, Wr, b)), g_ref):
        torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-12)
    mixed, mixed_w = support_mixed_targets(rows, Wr, b, t, w, 0.5, support=support)
    own, own_w = support_mixed_targets(rows, Wr, b, t, w, 0.5)
    assert not mixed.probs.requires_grad and torch.equal(mixed.probs, own.probs) and torch.equal(mixed_w, own_w)

    # a tail child at 0.02 for a target of 0.002 (one row, logits as free parameters): its logit's
    # gradient is ~ e_k / |S| = ln(0.021 / 0.003) / 2 ~ 0.9, where the KL's is p - q = 0.018
    q = torch.tensor([0.998, 0.002], dtype=torch.float64)
    z = torch.tensor([np.log(0.98), np.log(0.02)], dtype=torch.float64, requires_grad=True)
    loss = support_log_ratio_loss(torch.ones(1, 1, dtype=torch.float64), z[:, None], None,
                                  SparseTargets(torch.tensor([0, 2]), torch.tensor([0, 1]), q),
                                  torch.ones(1, dtype=torch.float64))
    g, = torch.autograd.grad(loss, z)
    assert float(g[1]) > 0.5 and float(g[1]) > 20 * (0.02 - 0.002), g

    # p_S = q: logits log q on S (one-hot rows h, W = log q at each id): no loss, no gradient
    h = torch.eye(2, dtype=torch.float64, requires_grad=True)
    W = torch.zeros(4, 2, dtype=torch.float64)
    W[1, 0], W[3, 0] = np.log(0.2), np.log(0.8)
    W[0, 1], W[2, 1] = np.log(0.6), np.log(0.4)
    t = SparseTargets(torch.tensor([0, 2, 4]), torch.tensor([1, 3, 0, 2]),
                      torch.tensor([0.2, 0.8, 0.6, 0.4], dtype=torch.float64))
    zero = support_log_ratio_loss(h, W, None, t, torch.ones(2, dtype=torch.float64))
    g, = torch.autograd.grad(zero, h)
    assert abs(float(zero.detach())) < 1e-24 and g.abs().max() < 1e-12
