"""Training batches (input ids, trained positions, sparse targets) and the loss on one batch.

Data flow: PreparedPrompt (prompt ids, support strings, trie) -> an epoch plan of
(prompt, support string) items in family-balanced order -> a micro-batch
(input_ids [B, T], attention_mask [B, T], the flat indices b*T + t of the N trained positions,
SparseTargets with N rows, per-row weights [N]) -> the decoder's hidden states at those N rows
only -> `calft.losses.linear_soft_target_kl` against the LM head.

Which positions (docs/method.md, section 'The loss'). A prompt of P tokens followed by an answer string of L
tokens is the input ``x = prompt_ids + answer_ids`` (length P + L). Position ``t`` predicts token
``t + 1``, so the trained positions are ``t = P-1, ..., P-1+L``: L+1 positions predicting the L
answer tokens and then EOS, where "EOS" is the terminator that the chat template ends a turn with
(calft.prompts.answer_format: Gemma's <end_of_turn>, not its tokenizer's <eos>). (EOS itself is
never an input.) Position ``P-1+j`` sits at trie node ``path_nodes(s)[j]`` (the prefix of the first
j answer tokens). A terminator of K > 1 tokens adds K positions instead of one.

Targets and weights. With G sequences in one global optimizer step (all micro-batches of all
ranks) and reduction "sum" over the rows of all of them:

- soft: the target at node v is q(. | v) (the trie's conditional children masses); a sequence
  with n = L+1 positions gives each row the weight 1 / (n * G), so the step loss is
  ``(1/G) sum_seq (1/n_seq) sum_pos KL_pos`` (the paper's mean over sequences of the per-sequence
  mean);
- hard: the target is the actual next token with probability 1 (cross-entropy = KL with a one-hot
  target); every row has the weight 1 / (total trained positions of the step): a token-level mean.
- trie (build_tree_batch; G counts prompts): one row per prompt holds the prompt and one token per
  trie node (calft.tree: tree attention), and every node v with children is a trained row with
  target q(. | v) and weight w(v) / G, where w(v) = sum over the strings s whose path visits v of
  p(s) / (L_s + 1). Then ``sum_v w(v) KL_v = E_{s~p}[(1/(L_s+1)) sum_{v in path(s)} KL_v]``: the
  soft loss above in expectation over the sampled string, exactly, with no sampling noise. (docs/method.md,
  section 'The loss' phrases it as mass(v) x KL_v; the two agree up to the constant 1/(L+1) when all strings
  have L tokens, and w is the one that keeps the soft mode's per-sequence mean, so the losses and
  learning rates of the two modes are comparable when lengths differ, e.g. "1" vs "12".)
  --trie-max-nodes keeps the heaviest nodes exact and estimates the rest without bias from
  sampled paths; --share-prompt (max nodes 0) is the soft loss of k sampled strings per prompt
  in one tree forward of the prompt.

Order (docs/method.md, section 'Recipes'): for epoch e, the items are shuffled within each family with a
``numpy`` Generator seeded by (seed, e), then taken round-robin across the families (in the
order in which they first appear in the prompt list); a family that runs out drops out of the
rotation. The plan is a pure function of (seed, epoch), so every rank builds the same plan and
takes its own slice, and a resumed run rebuilds exactly the same order.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from calft.losses import SparseTargets
from calft.tree import subtree_sums, tree_layout


# ------------------------------------------------------------------------------------------------
# epoch plan: which (prompt, support string) items, in which order

def _family_groups(family_ids: Sequence[str]) -> list[list[int]]:
    """Indices per family, families in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, fam in enumerate(family_ids):
        groups.setdefault(fam, []).append(i)
    return list(groups.values())


def balanced_order(family_ids: Sequence[str], rng: np.random.Generator,
                   family_weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Indices of ``family_ids`` shuffled within each family, then interleaved round-robin.

    Example: families [a, a, a, b, c, c] -> e.g. [a2, b0, c5, a0, c4, a1]. A family of weight w
    (``family_weights``, default 1) gives w items per round: its k-th item goes in round
    floor(k / w), so a family with w times the items of the others is spread over the same rounds
    instead of filling the end of the epoch alone. Within a round families keep their order.
    """
    groups = _family_groups(family_ids)
    if not groups:
        return np.zeros(0, dtype=np.int64)
    weights = family_weights or {}
    shuffled = [np.asarray(idx, dtype=np.int64)[rng.permutation(len(idx))] for idx in groups]
    rounds = [np.floor(np.arange(len(g)) / weights.get(family_ids[idx[0]], 1.0)) for g, idx in zip(shuffled, groups)]
    items = np.concatenate(shuffled)
    family_rank = np.concatenate([np.full(len(g), j) for j, g in enumerate(shuffled)])
    return items[np.lexsort((family_rank, np.concatenate(rounds)))]  # by round, then family


def sample_strings(probs: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` i.i.d. indices drawn from the categorical ``probs`` (zero-probability entries never)."""
    cdf = np.cumsum(np.asarray(probs, dtype=np.float64))
    if not np.isfinite(cdf[-1]) or cdf[-1] <= 0:
        raise ValueError("support probabilities must be finite with a positive sum")
    u = rng.random(num) * cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int64)


def epoch_plan(prompts: Sequence, *, seed: int, epoch: int, samples_per_prompt: int = 1,
               balance_families: bool = False, family_weights: Mapping[str, float] | None = None) -> np.ndarray:
    """The items of one epoch as an int64 array [num_items, 2] of (prompt index, support string
    index), in family-balanced order; num_items = epoch_size(...) * samples_per_prompt.

    Each prompt contributes ``samples_per_prompt`` strings drawn i.i.d. from its discretized target
    (soft recipe: 1 per epoch; hard recipe: 16). With ``balance_families`` every family contributes
    as many prompts as the largest one: a smaller family's prompts repeat (a fresh permutation each
    epoch, cycled), each repeat with its own strings, so a family's share of training does not
    follow the size of its parameter grid. ``family_weights`` (with ``balance_families`` only)
    scales a family's share: round(w x the largest family's count) prompts, spread evenly through
    the epoch (balanced_order). Deterministic given (seed, epoch).
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if len(prompts) == 0:
        raise ValueError("no prompts to train on")
    if family_weights and not balance_families:
        raise ValueError("family weights scale the balanced share: they need balance_families")
    rng = np.random.default_rng([seed, epoch])
    index = np.arange(len(prompts), dtype=np.int64)
    if balance_families:
        family_ids = [p.spec.family_id for p in prompts]
        counts = _balanced_counts(family_ids, family_weights)
        index = np.concatenate([np.resize(rng.permutation(np.asarray(g, dtype=np.int64)), n)
                                for g, n in zip(_family_groups(family_ids), counts)])
    strings = np.concatenate([sample_strings(prompts[i].support.probs, samples_per_prompt, rng) for i in index])
    prompt_of_item = np.repeat(index, samples_per_prompt)
    families = [prompts[i].spec.family_id for i in prompt_of_item]
    order = balanced_order(families, rng, family_weights)
    return np.stack([prompt_of_item[order], strings[order]], axis=1)


def _balanced_counts(family_ids: Sequence[str], family_weights: Mapping[str, float] | None) -> list[int]:
    """Prompts per family (in _family_groups order) in a balanced epoch: round(w x the largest
    family's count), w = the family's weight (default 1), at least 1."""
    groups = _family_groups(family_ids)
    longest = max((len(g) for g in groups), default=0)
    weights = family_weights or {}
    return [max(1, round(weights.get(family_ids[g[0]], 1.0) * longest)) for g in groups]


def epoch_size(family_ids: Sequence[str], *, balance_families: bool = False,
               family_weights: Mapping[str, float] | None = None) -> int:
    """Prompts per epoch (before samples_per_prompt): all of them, or with balance_families the
    sum over families of round(weight x the largest family's prompt count) (epoch_plan)."""
    if not balance_families:
        return len(family_ids)
    return sum(_balanced_counts(family_ids, family_weights))


def steps_per_epoch(num_items: int, global_batch: int, *, keep_last: bool = False) -> int:
    """Global steps in one epoch: full batches only (the last partial batch is dropped; the order
    reshuffles every epoch, so each item is still seen on average), or with keep_last the
    artifact's ceil(num_items / global_batch), whose last step is shorter."""
    if keep_last:
        if num_items < 1:
            raise ValueError("no items to train on")
        return -(-num_items // global_batch)
    if num_items < global_batch:
        raise ValueError(f"the global batch ({global_batch} sequences) is larger than one epoch "
                         f"({num_items} items): lower the batch size or add prompts")
    return num_items // global_batch


def step_items(plan: np.ndarray, step_in_epoch: int, *, global_batch: int, world_size: int = 1,
               rank: int = 0) -> np.ndarray:
    """This rank's share of one global step: global items [s*G, (s+1)*G) (fewer in a kept last
    partial batch) split into ``world_size`` contiguous, balanced slices (np.array_split: equal
    slices of G / world_size for a full step); the rank then cuts its slice into micro-batches."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
    items = plan[step_in_epoch * global_batch:(step_in_epoch + 1) * global_batch]
    return np.array_split(items, world_size)[rank]


def micro_batches(items: np.ndarray, grad_accum: int) -> list[np.ndarray]:
    """``grad_accum`` consecutive micro-batches of a rank's items: equal ones for a full step, as
    even as possible (some maybe empty) for a kept last partial batch."""
    return np.array_split(items, grad_accum)


def global_num_positions(prompts: Sequence, items: np.ndarray, terminator_len: int = 1) -> int:
    """Trained positions (answer tokens + terminator) of all ``items``: the hard-mode denominator."""
    return int(sum(len(prompts[p].answer_ids[s]) + terminator_len for p, s in items))


# ------------------------------------------------------------------------------------------------
# one micro-batch

# Shorter shared prefixes are not worth a second decoder call.
MIN_SHARED_PREFIX = 8

@dataclass
class Batch:
    """One micro-batch. N = trained positions, B = sequences, T = padded length."""

    input_ids: torch.Tensor       # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T] int64, 1 on real tokens
    gather_index: torch.Tensor    # [N] int64, flat index b*T + t of each trained position
    targets: SparseTargets        # N rows (CSR), probs float32
    weights: torch.Tensor         # [N] float32; sum over rows (all micro-batches, ranks) = step loss
    num_tokens: int               # real (non-pad) tokens, for throughput
    prefix_len: int = 0           # leading tokens shared by every row (run once, see SoftTargetKLLoss)
    # tree batches only (build_tree_batch): prompt + trie nodes per row, with tree attention
    position_ids: torch.Tensor | None = None  # [B, T] int64
    tree_mask: torch.Tensor | None = None     # [B, T, T] bool, True = attend (calft.tree.tree_layout)

    def to(self, device) -> "Batch":
        tree = [None if t is None else t.to(device) for t in (self.position_ids, self.tree_mask)]
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.gather_index.to(device), self.targets.to(device), self.weights.to(device),
                     self.num_tokens, self.prefix_len, *tree)


def build_batch(prompts: Sequence, items: np.ndarray, *, mode: str, pad_id: int, eos_id,
                global_batch: int, global_positions: int | None = None) -> Batch:
    """Collate ``items`` ((prompt index, string index) rows) into a :class:`Batch`.

    ``global_batch`` (G) is the number of sequences in the whole optimizer step and
    ``global_positions`` (hard mode only) its number of trained positions; they fix the weights so
    that summing the weighted KL over every micro-batch of every rank gives the step loss.
    ``eos_id``: the answer's terminator (calft.prompts.terminator_ids), one id or a sequence; a
    multi-token terminator is predicted token by token after the answer (L + K positions).
    """
    if mode not in ("soft", "hard"):
        raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
    if mode == "hard" and not global_positions:
        raise ValueError("hard mode needs global_positions (trained positions in the step)")
    term = np.atleast_1d(np.asarray(eos_id, dtype=np.int64))  # the terminator: usually 1 token
    if term.ndim != 1 or term.size == 0:
        raise ValueError(f"eos_id must be a token id or a non-empty sequence of them, got {eos_id!r}")
    K = term.size
    seqs, gather, row_lens, ids, probs, weights = [], [], [], [], [], []
    T = max(len(prompts[p].prompt_ids) + len(prompts[p].answer_ids[s]) + K - 1 for p, s in items)
    for b, (p, s) in enumerate(items):
        prep = prompts[p]
        answer = np.asarray(prep.answer_ids[s], dtype=np.int64)
        P, L = len(prep.prompt_ids), len(answer)
        predicted = np.concatenate([answer, term])  # the n = L + K tokens predicted
        n = L + K
        # a multi-token terminator's tokens but the last are inputs too (the trie's chain)
        seqs.append(np.concatenate([np.asarray(prep.prompt_ids, dtype=np.int64), predicted[:-1]]))
        gather.extend(b * T + P - 1 + j for j in range(n))
        if mode == "soft":
            trie = prep.trie
            nodes = trie.path_nodes(int(s))
            if len(nodes) != n:
                raise ValueError(f"trie path of prompt {p} string {s} has {len(nodes)} nodes, "
                                 f"expected {n} (answer tokens + {K} terminator token(s))")
            for v in nodes:
                lo, hi = int(trie.row_ptr[v]), int(trie.row_ptr[v + 1])
                ids.append(trie.token_ids[lo:hi])
                probs.append(trie.probs[lo:hi])
                row_lens.append(hi - lo)
            weights.extend([1.0 / (n * global_batch)] * n)
        else:
            ids.append(predicted)
            probs.append(np.ones(n))
            row_lens.extend([1] * n)
            weights.extend([1.0 / global_positions] * n)
    input_ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for b, x in enumerate(seqs):
        input_ids[b, :len(x)] = x
        mask[b, :len(x)] = 1
    # The chat template makes every prompt start alike (system turn, "Generate exactly ONE random
    # number from a"): ~30 of SmolLM2's ~60 tokens. Stop before the first trained position.
    prefix_len = shared_prefix_len(input_ids, min(len(prompts[p].prompt_ids) for p, _ in items))
    row_ptr = np.zeros(len(row_lens) + 1, dtype=np.int64)
    np.cumsum(row_lens, out=row_ptr[1:])
    targets = SparseTargets(torch.from_numpy(row_ptr),
                            torch.from_numpy(np.concatenate(ids).astype(np.int64)),
                            torch.from_numpy(np.concatenate(probs).astype(np.float32)))
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(mask),
                 torch.tensor(gather, dtype=torch.int64), targets,
                 torch.tensor(weights, dtype=torch.float32), int(mask.sum()), prefix_len)


# ------------------------------------------------------------------------------------------------
# trie mode: every trie node of a prompt in one tree-attention forward (calft.tree)

def trie_row_weights(prep) -> np.ndarray:
    """float64[num_nodes]: w(v) = sum over the strings s whose path visits v of p(s) / (L_s + 1).

    The soft path loss of s is the mean of KL_v over the L_s + 1 nodes v of its path, so
    E_{s~p}[path loss] = sum_s p(s)/(L_s+1) sum_{v in path(s)} KL_v = sum_v w(v) KL_v exactly.
    (With equal lengths L, w(v) = mass(v)/(L+1): the visit mass up to a constant.) Leaves (after
    EOS) get 0: they are on no path. A parent's weight is >= each child's.
    """
    p = np.asarray(prep.support.probs, dtype=np.float64)
    trie = prep.trie
    leaf = np.asarray(trie.sequence_leaf, dtype=np.int64)
    # trained positions of each path = depth of its leaf: answer tokens + terminator (L_s + 1 with a
    # 1-token terminator); dropped zero-probability strings (leaf -1) carry no weight anyway
    positions = np.where(leaf >= 0, np.asarray(trie.depth, dtype=np.float64)[np.maximum(leaf, 0)], 1.0)
    w = subtree_sums(trie, leaf, p / p.sum() / positions)
    w[np.diff(np.asarray(trie.row_ptr)) == 0] = 0.0
    return w


def tree_rows(prep, *, max_nodes: int, strings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The trained nodes of one prompt (ascending ids, root first) and their weights (float64).

    max_nodes = -1 (or >= the internal nodes): every internal node v with w(v) (trie_row_weights);
    the exact expected soft loss. Otherwise the max_nodes largest-weight nodes keep w(v) (sorted
    by weight desc, depth asc: closed under ancestors since w(parent) >= w(child)), and each
    other node gets the Monte-Carlo estimate of its w from the k = len(strings) paths s_i ~ p:
    sum_i [v in path(s_i)] / ((L_{s_i} + 1) k), whose expectation is w(v). The loss is then an
    unbiased estimate of the full trie loss. max_nodes = 0: the k paths alone (soft mode with k
    strings sharing one prompt forward).
    """
    trie = prep.trie
    w = trie_row_weights(prep)
    internal = np.nonzero(np.diff(np.asarray(trie.row_ptr)) > 0)[0]
    if max_nodes < 0 or max_nodes >= internal.size:
        return internal, w[internal]
    depth = np.asarray(trie.depth, dtype=np.int64)
    kept = internal[np.lexsort((internal, depth[internal], -w[internal]))[:max_nodes]]
    weight = np.zeros(trie.num_nodes, dtype=np.float64)
    weight[kept] = w[kept]
    is_kept = np.zeros(trie.num_nodes, dtype=bool)
    is_kept[kept] = True
    chosen = is_kept.copy()
    for s in strings:
        path = trie.path_nodes(int(s))
        drop = path[~is_kept[path]]
        weight[drop] += 1.0 / (len(path) * len(strings))  # len(path) = L_s + 1
        chosen[drop] = True
    nodes = np.nonzero(chosen)[0]
    return nodes, weight[nodes]


def tree_strings(prompts: Sequence, prompt_index: int, *, seed: int, epoch: int, num: int,
                 uniform: int = 0) -> np.ndarray:
    """The ``num`` paths s ~ p that cover a prompt's uncapped nodes, then ``uniform`` paths drawn
    uniformly over its strings of positive probability: a pure function of (seed, epoch, prompt),
    so every rank, micro-batch split and resumed run draws the same (and the first ``num`` do not
    depend on ``uniform``)."""
    rng = np.random.default_rng([seed, epoch, int(prompt_index)])
    probs = np.asarray(prompts[prompt_index].support.probs, dtype=np.float64)
    drawn = sample_strings(probs, num, rng)
    if uniform <= 0:
        return drawn
    positive = np.flatnonzero(probs > 0)
    return np.concatenate([drawn, positive[rng.integers(positive.size, size=uniform)]])


def build_tree_batch(prompts: Sequence, items: np.ndarray, *, pad_id: int, global_batch: int,
                     max_nodes: int = -1, samples_per_prompt: int = 1, seed: int = 0,
                     epoch: int = 0, pack: bool = False, uniform_paths: int = 0) -> Batch:
    """Collate the prompts of ``items`` (column 0 = prompt index) into a tree :class:`Batch`.

    Row b is prompt b's P tokens followed by one token per chosen non-root node (tree_rows), with
    calft.tree.tree_layout's positions and mask, right-padded to T (a pad token attends to
    itself only). Trained rows: the prompt's last position (root) and every chosen node, each
    with the trie's soft target q(.|v) and the weight w(v) / G (G = global_batch, in prompts),
    so the sum over a step is (1/G) sum_prompts E_{s~p}[soft path loss of s].

    uniform_paths = k (max_nodes = 0 only: the paths alone): beside the K = samples_per_prompt
    paths s ~ p, k paths s ~ u, uniform over the prompt's strings, every path weighted alike, so
    the step's sum estimates (1/G) sum_prompts (K E_p + k E_u)[soft path loss] / (K + k). The
    conditional targets q(.|v) stay exact at every node; what changes is which nodes are trained:
    paths from p practically never reach a node deep in a tail (the trie node "139" of Cauchy(1,
    0.71), target mass ~1e-5), so nothing there tells the model that only "." may follow.

    pack=True: one row [1, N] instead, with no padding: the prompts' common leading tokens (the
    chat template's system turn) once, then each prompt's remaining tokens and nodes; prompt b's
    tokens see the common prefix and their own block only (its tree_layout mask, relocated). N is
    about sum_b (P_b + C_b) - (B-1) P0, against B x max_b(P_b + C_b) padded, but the attention
    is N x N: meant for small tries and micro-batches (CPU), not for thousands of nodes each.
    """
    if uniform_paths and max_nodes != 0:
        raise ValueError("uniform paths replace the target's own weights w(v): only with max_nodes = 0 (the paths alone)")
    seqs, positions, keeps, gather, row_lens, ids, probs, weights = [], [], [], [], [], [], [], []
    for p in np.asarray(items)[:, 0]:
        prep = prompts[int(p)]
        trie = prep.trie
        strings = tree_strings(prompts, int(p), seed=seed, epoch=epoch, num=samples_per_prompt,
                               uniform=uniform_paths)
        nodes, w = tree_rows(prep, max_nodes=max_nodes, strings=strings)
        tokens = nodes[nodes > 0]  # BFS ids: ascending = parents first; the root is the prompt's end
        P = len(prep.prompt_ids)
        pos, keep = tree_layout(P, tokens, np.asarray(trie.parent), np.asarray(trie.depth))
        seqs.append(np.concatenate([np.asarray(prep.prompt_ids, dtype=np.int64), trie.parent_token[tokens]]))
        positions.append(pos)
        keeps.append(keep)
        row_of = {int(v): P + i for i, v in enumerate(tokens)} | {0: P - 1}
        gather.append([row_of[int(v)] for v in nodes])
        for v in nodes:
            lo, hi = int(trie.row_ptr[v]), int(trie.row_ptr[v + 1])
            ids.append(trie.token_ids[lo:hi])
            probs.append(trie.probs[lo:hi])
            row_lens.append(hi - lo)
        weights.append(w / global_batch)
    B, T = len(seqs), max(len(x) for x in seqs)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    tree_mask = np.zeros((B, T, T), dtype=bool)
    tree_mask[:, np.arange(T), np.arange(T)] = True  # padding attends to itself (no empty rows)
    flat = []
    for b, x in enumerate(seqs):
        n = len(x)
        input_ids[b, :n], mask[b, :n], position_ids[b, :n] = x, 1, positions[b]
        tree_mask[b, :n, :n] = keeps[b]
        flat.extend(b * T + r for r in gather[b])
    prefix_len = shared_prefix_len(input_ids, min(len(prompts[int(p)].prompt_ids) for p in np.asarray(items)[:, 0]))
    if pack:
        input_ids, mask, position_ids, tree_mask, flat = pack_rows(seqs, positions, keeps, gather, prefix_len)
        prefix_len = 0
    row_ptr = np.zeros(len(row_lens) + 1, dtype=np.int64)
    np.cumsum(row_lens, out=row_ptr[1:])
    targets = SparseTargets(torch.from_numpy(row_ptr),
                            torch.from_numpy(np.concatenate(ids).astype(np.int64)),
                            torch.from_numpy(np.concatenate(probs).astype(np.float32)))
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(mask), torch.tensor(flat, dtype=torch.int64),
                 targets, torch.from_numpy(np.concatenate(weights).astype(np.float32)), int(mask.sum()),
                 prefix_len, torch.from_numpy(position_ids), torch.from_numpy(tree_mask))


def pack_rows(seqs, positions, keeps, gather, prefix_len: int):
    """Token lists b (ids, positions, keep [n_b, n_b], trained indices) -> one row [1, N] whose
    first prefix_len tokens are shared; returns (input_ids, attention_mask, position_ids,
    tree_mask [1, N, N], flat trained indices)."""
    P0 = prefix_len
    N = P0 + sum(len(x) - P0 for x in seqs)
    input_ids, position_ids = np.zeros((1, N), dtype=np.int64), np.zeros((1, N), dtype=np.int64)
    tree_mask = np.zeros((1, N, N), dtype=bool)
    flat, offset = [], P0
    for x, pos, keep, rows in zip(seqs, positions, keeps, gather):
        idx = np.concatenate([np.arange(P0), offset + np.arange(len(x) - P0)])  # local -> packed index
        offset += len(x) - P0
        input_ids[0, idx], position_ids[0, idx] = x, pos
        tree_mask[0][np.ix_(idx, idx)] |= keep
        flat.extend(idx[rows].tolist())
    return input_ids, np.ones((1, N), dtype=np.int64), position_ids, tree_mask, flat


def shared_prefix_len(input_ids: np.ndarray, shortest_prompt: int) -> int:
    """Leading tokens identical in every row, stopping before the first trained position; 0 when
    shorter than MIN_SHARED_PREFIX or a single row."""
    differs = np.nonzero((input_ids[:, :shortest_prompt - 1] != input_ids[:1, :shortest_prompt - 1]).any(0))[0]
    prefix_len = int(differs[0]) if differs.size else shortest_prompt - 1
    return prefix_len if len(input_ids) > 1 and prefix_len >= MIN_SHARED_PREFIX else 0
