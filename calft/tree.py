"""Run the model over the nodes of an answer trie after a shared prompt (tree attention).

Used by exact evaluation (score_trie: log m(t|v) at every node, no gradients) and by trie-mode
training (calft.batching.build_tree_batch + SoftTargetKLLoss: hidden states at the trained nodes,
with gradients). The mask and position construction lives here once.

Tree attention (SpecInfer, Miao et al. 2023, arXiv 2305.09781; Medusa, Cai et al. 2024). A trie
node v is a token prefix of the answer; its next-token distribution is what the model predicts
after reading prompt + prefix(v). Instead of one sequence per prefix, the prompt (P tokens,
positions 0..P-1) is followed by one token per non-root node, in any order:

    input token of v   = the edge into v (trie.parent_token[v])
    position of v      = P + depth(v) - 1            (where that token sits in prompt + prefix(v))
    v attends to       = every prompt token, its ancestors and itself

so the hidden state at v's token equals the last hidden state of the plain forward over
prompt + prefix(v) (causal attention only ever looks at a token's own prefix, and rotary
embeddings only see positions). The root's state is the prompt's last position. Prompt tokens
attend causally to the prompt only. The mask is additive (0 = attend, finfo.min = not) in the
model's dtype, [B, 1, Q, K]; transformers passes a 4D mask through unchanged (masking_utils
`_preprocess_mask_arguments`), which the "eager" and "sdpa" backends honour.

Sliding-window layers (Mistral/Qwen2 `sliding_window`, Gemma-3 / gpt-oss `layer_types` with
"sliding_attention"): such a layer lets the query at position q see the key at position k only
if q - k < W (transformers' `sliding_window_overlay`: kv_idx > q_idx - W), judged on positions,
not on indices in the token list. Every layer's cache keeps all tokens (full_cache), and the
model gets one mask per layer type, {"full_attention": m, "sliding_attention": m & window}
(the dict that hybrid models accept in place of a 2D mask); a model whose layers are all of
one type gets that type's mask as a tensor.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import torch

import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from calft.losses import SparseTargets, linear_soft_target_kl
from calft.models import cache_kwarg, decoder, lm_head_weight, unwrap

TREE_ATTENTION = ("eager", "sdpa")  # attention backends that honour a custom 4D float mask
LOGIT_ROWS = 256  # LM-head rows per step: bounds the [R, V] logits buffer (V=152k -> 150 MB fp32)


# -----------------------------------------------------------------------------
# trie arithmetic

def edge_sources(trie) -> np.ndarray:
    """Node id owning each edge (CSR row of each entry)."""
    return np.repeat(np.arange(trie.num_nodes, dtype=np.int64), np.diff(np.asarray(trie.row_ptr)))


def node_log_mass(trie, edge_logp: np.ndarray) -> np.ndarray:
    """log m(v) for every node: the sum of edge log-probs from the root (root = 0)."""
    src = edge_sources(trie)
    child = np.asarray(trie.child, dtype=np.int64)
    depth = np.asarray(trie.depth, dtype=np.int64)
    out = np.zeros(trie.num_nodes, dtype=np.float64)
    src_depth = depth[src]
    for d in range(int(depth.max(initial=0)) + 1):  # parents are final before their children
        sel = src_depth == d
        out[child[sel]] = out[src[sel]] + edge_logp[sel]
    return out


def subtree_sums(trie, leaf: np.ndarray, values: np.ndarray) -> np.ndarray:
    """float64[num_nodes]: the sum of values[i] over the sequences i whose leaf is in v's subtree.

    With values = p this is the visit mass mass(v); leaf[i] = -1 (a dropped string) counts nowhere.
    """
    out = np.zeros(trie.num_nodes, dtype=np.float64)
    ok = leaf >= 0
    np.add.at(out, leaf[ok], np.asarray(values, dtype=np.float64)[ok])
    parent = np.asarray(trie.parent, dtype=np.int64)
    depth = np.asarray(trie.depth, dtype=np.int64)
    for d in range(int(depth.max(initial=0)), 0, -1):  # children before parents
        nodes = np.nonzero(depth == d)[0]
        np.add.at(out, parent[nodes], out[nodes])
    return out


def dfs_order(row_ptr: np.ndarray, child: np.ndarray) -> np.ndarray:
    """Internal (has children) non-root nodes in depth-first preorder, children in token order."""
    internal = np.diff(row_ptr) > 0
    order, stack = [], [0]
    while stack:
        v = stack.pop()
        if v:
            order.append(v)
        kids = child[row_ptr[v] : row_ptr[v + 1]]
        stack.extend(kids[internal[kids]][::-1].tolist())
    return np.asarray(order, dtype=np.int64)


def ancestor_mask(nodes: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """Boolean [C, C]: token i may attend to token j iff nodes[j] is nodes[i] or its ancestor.

    Every non-root ancestor of a node in `nodes` must itself be in `nodes` (closed under ancestors).
    """
    lpos = np.full(parent.size, -1, dtype=np.int64)
    lpos[nodes] = np.arange(nodes.size)
    allowed = np.zeros((nodes.size, nodes.size), dtype=bool)
    rows = np.arange(nodes.size)
    cur = nodes.copy()
    while True:
        live = cur > 0
        if not live.any():
            return allowed
        if (lpos[cur[live]] < 0).any():
            raise ValueError("tree nodes are not closed under ancestors")
        allowed[rows[live], lpos[cur[live]]] = True
        cur = np.where(live, parent[cur], 0)


def tree_layout(num_prompt: int, nodes: np.ndarray, parent: np.ndarray, depth: np.ndarray, *,
                prompt_rows: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Positions and attention of the token list prompt (P) + one token per node of `nodes` (C).

    Returns positions int64[P + C] (prompt 0..P-1, node v at P + depth(v) - 1) and keep bool
    [Q, P + C] (True = attend): the prompt rows are causal (Q = P + C), or left out
    (prompt_rows=False, Q = C: the prompt is already in a cache); a node row sees the whole
    prompt, its ancestors and itself. `nodes`: non-root, closed under ancestors, any order.
    """
    nodes = np.asarray(nodes, dtype=np.int64)
    P, C = int(num_prompt), nodes.size
    positions = np.concatenate([np.arange(P, dtype=np.int64), P + depth[nodes] - 1])
    node_rows = np.concatenate([np.ones((C, P), dtype=bool), ancestor_mask(nodes, parent)], axis=1)  # [C, P + C]
    if not prompt_rows:
        return positions, node_rows
    prompt = np.concatenate([np.tril(np.ones((P, P), dtype=bool)), np.zeros((P, C), dtype=bool)], axis=1)
    return positions, np.concatenate([prompt, node_rows], axis=0)


# -----------------------------------------------------------------------------
# the forward pass

def check_tree_attention(model) -> None:
    impl = getattr(unwrap(model).config, "_attn_implementation", "eager")
    if impl not in TREE_ATTENTION:
        raise ValueError(
            f"tree attention needs a custom 4D mask; attention backend {impl!r} ignores it. "
            f"Load the model with attn_implementation in {TREE_ATTENTION}"
        )


def attention_windows(model) -> dict[str, int | None]:
    """{layer type: sliding window W or None (full)} over the decoder's layers."""
    config = unwrap(model).config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:  # Mistral: every layer slides when sliding_window is set
        types = ["sliding_attention" if window is not None else "full_attention"] * n
    out = {}
    for kind in set(types[:n]):
        if kind == "full_attention":
            out[kind] = None
        elif kind == "sliding_attention" and window is not None:
            out[kind] = int(window)
        else:
            raise ValueError(f"tree attention supports full and sliding-window attention layers; "
                             f"{type(unwrap(model)).__name__} has {kind!r} layers")
    return out


def full_cache(model):
    """A DynamicCache whose every attention layer keeps all tokens (sliding ones included).

    A sliding-window cache layer drops keys older than W, but tree nodes sit at positions that
    are not the last ones, so the sliding window is applied by the mask instead.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    try:
        cache = DynamicCache(config=unwrap(model).config)
    except TypeError:  # older transformers: no config argument, all layers full
        return DynamicCache()
    cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer
                    for layer in cache.layers]
    return cache


def attention_masks(model, keep: torch.Tensor, query_positions: torch.Tensor,
                    key_positions: torch.Tensor, dtype: torch.dtype):
    """The additive [B, 1, Q, K] mask of `keep` ([B, Q, K] bool), or one per layer type (dict).

    A sliding layer of window W also hides keys with query_position - key_position >= W.
    """
    masks = {}
    for kind, window in attention_windows(model).items():
        allowed = keep
        if window is not None:
            allowed = keep & (query_positions[:, :, None] - key_positions[:, None, :] < window)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=keep.device)  # 0 = attend
        masks[kind] = mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    return masks if len(masks) > 1 else next(iter(masks.values()))


def forward_tree(model, input_ids: torch.Tensor, query_positions: torch.Tensor, keep: torch.Tensor,
                 key_positions: torch.Tensor, cache=None) -> torch.Tensor:
    """Last hidden states [B, Q, H] of the decoder body (LoRA included, no LM head).

    input_ids, query_positions [B, Q]; keep [B, Q, K] bool over the K = (cached + Q) keys whose
    positions are key_positions [B, K]. With a cache (from full_cache) the Q tokens are appended.
    """
    check_tree_attention(model)
    body = decoder(model)
    masks = attention_masks(model, keep, query_positions, key_positions, unwrap(model).dtype)
    kwargs = {cache_kwarg(body): cache, "use_cache": True} if cache is not None else {"use_cache": False}
    return body(input_ids=input_ids, attention_mask=masks, position_ids=query_positions,
                **kwargs).last_hidden_state


def forward_tree_batch(model, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor,
                       prefix_len: int = 0) -> torch.Tensor:
    """Hidden states of B token lists (prompt + nodes, right-padded to T) with their masks.

    input_ids, positions [B, T]; keep [B, T, T]. Returns [B, T - prefix_len, H]: with prefix_len
    P0 > 0 (identical first P0 tokens in every row, e.g. the chat template's system turn) those
    run once (batch 1) into a cache repeated B times, and gradients flow through it.
    """
    B, T = input_ids.shape
    if prefix_len == 0:
        return forward_tree(model, input_ids, positions, keep, positions)
    P0 = prefix_len
    cache = full_cache(model)
    forward_tree(model, input_ids[:1, :P0], positions[:1, :P0], keep[:1, :P0, :P0], positions[:1, :P0], cache)
    cache.batch_repeat_interleave(B)
    return forward_tree(model, input_ids[:, P0:], positions[:, P0:], keep[:, P0:], positions, cache)


# -----------------------------------------------------------------------------
# exact scoring

@torch.no_grad()
def score_trie(model, prompt_ids, trie, *, chunk_size: int = 256) -> np.ndarray:
    """Model log-probabilities of every trie edge: float64[E], aligned with trie.token_ids.

    Edge e of node v carries log m(token_ids[e] | prompt, v). Costs one forward over the prompt,
    then one token per internal non-root node: nodes go in depth-first order, chunk_size at a
    time, each chunk preceded by the (at most depth-many) ancestors of its first node, which it
    recomputes. A chunk is thus closed under ancestors, and its attention is C x (P + C) whatever
    the trie size; the prompt's KV cache is shared by all chunks. Log-softmax is float64.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    row_ptr = np.asarray(trie.row_ptr, dtype=np.int64)
    token_ids = np.asarray(trie.token_ids, dtype=np.int64)
    parent = np.asarray(trie.parent, dtype=np.int64)
    depth = np.asarray(trie.depth, dtype=np.int64)
    parent_token = np.asarray(trie.parent_token, dtype=np.int64)
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("prompt_ids must be a non-empty 1D sequence of token ids")
    device = next(model.parameters()).device
    num_prompt = prompt.size
    degree = np.diff(row_ptr)
    out = np.empty(token_ids.size, dtype=np.float64)
    head = unwrap(model).get_output_embeddings()

    def gather(hidden: torch.Tensor, nodes: np.ndarray) -> None:
        # Edges of `nodes` (hidden[r] is the state at nodes[r]). The LM head runs on LOGIT_ROWS
        # rows at a time, so no [C, V] logits tensor is ever materialized.
        for a in range(0, nodes.size, LOGIT_ROWS):
            nd = nodes[a : a + LOGIT_ROWS]
            cnt = degree[nd]
            first = np.cumsum(cnt) - cnt
            edges = np.repeat(row_ptr[nd], cnt) + np.arange(cnt.sum()) - np.repeat(first, cnt)
            rows = torch.as_tensor(np.repeat(np.arange(nd.size), cnt), device=hidden.device)
            h = hidden[a : a + nd.size]
            # The head runs outside any caller autocast (e.g. training's bf16): its logits feed
            # log-probs summed over whole strings, so they are kept in the weights' precision.
            with torch.autocast(device_type=h.device.type, enabled=False):
                logits = head(h.to(head.weight.dtype))  # [R, V]
            lse = torch.logsumexp(logits.double(), dim=-1)  # [R]; float64 so long sums stay exact
            t = torch.as_tensor(token_ids[edges], device=hidden.device)
            out[edges] = (logits[rows, t].double() - lse[rows]).cpu().numpy()

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, device=device).unsqueeze(0)  # [1, ...]

    prompt_cache = full_cache(model)
    positions, keep = tree_layout(num_prompt, np.zeros(0, dtype=np.int64), parent, depth)
    hidden = forward_tree(model, tensor(prompt), tensor(positions), tensor(keep), tensor(positions),
                          prompt_cache)[0]  # [P, H]
    gather(hidden[-1:], np.zeros(1, dtype=np.int64))
    order = dfs_order(row_ptr, np.asarray(trie.child, dtype=np.int64))
    for start in range(0, order.size, chunk_size):
        nodes = order[start : start + chunk_size]
        anc = []
        v = int(parent[nodes[0]])
        while v > 0:  # ancestors of the chunk's first node: every outside ancestor is one of them
            anc.append(v)
            v = int(parent[v])
        local = np.concatenate([np.asarray(anc[::-1], dtype=np.int64), nodes])  # C tokens
        positions, keep = tree_layout(num_prompt, local, parent, depth, prompt_rows=False)  # [P + C], [C, P + C]
        cache = copy.deepcopy(prompt_cache)  # the prompt's keys/values; this chunk's are dropped after
        hidden = forward_tree(model, tensor(parent_token[local]), tensor(positions[num_prompt:]), tensor(keep),
                              tensor(positions), cache)[0]  # [C, H]
        gather(hidden[len(anc):], nodes)
    return out


# ------------------------------------------------------------------------------------------------
# the training objective on one batch (calft.batching builds the Batch)

class SoftTargetKLLoss(nn.Module):
    """``loss = sum_r w_r KL(q_r || softmax(W h_r))`` over the trained rows of a calft.batching.Batch
    (+ lambda x the off-support term, support_mixed_targets; + gamma x support_log_ratio_loss).

    Wraps the model so that DDP / FSDP2 see one root module whose forward is the whole objective:
    the decoder runs over [B, T], only the N trained rows of its last hidden state reach the fused
    LM-head + sparse-KL op, so no [B, T, V] (or [N, V]) logits tensor is ever materialized.
    """

    def __init__(self, model: nn.Module, *, autocast_dtype: torch.dtype | None = None,
                 share_prefix: bool = True, off_support_weight: float = 0.0, log_ratio_weight: float = 0.0,
                 log_ratio_cap: float = 0.0):
        super().__init__()
        self.model = model
        self.off_support_weight = off_support_weight  # lambda of support_mixed_targets; 0 = plain KL
        self.log_ratio_weight = log_ratio_weight  # gamma of support_log_ratio_loss; 0 = off
        self.log_ratio_cap = log_ratio_cap  # its delta: the largest push on one child's logit; 0 = none
        self.autocast_dtype = autocast_dtype
        # FSDP2 reshards a block after its forward; a block called twice in one forward (prefix,
        # then the rest) loses the gathered weights that the first call's backward needs.
        self.share_prefix = share_prefix

    def hidden_rows(self, batch) -> torch.Tensor:
        """Last hidden state at the N trained positions: [N, H].

        Shared prefix (P0 = batch.prefix_len > 0): the first P0 tokens are identical in every row,
        so they run once (batch 1) into a KV cache that is repeated B times, and only the
        T - P0 remaining tokens of each row run on top of it (positions P0..T-1, the full [B, T]
        attention mask). Causal attention makes this the same computation as the full forward
        (one LoRA-dropout mask for the shared part); gradients flow through the cache into the
        prefix. On SmolLM2 prompts it removes ~(B-1)/B of the prefix, ~45% of the tokens at B = 8.
        """
        body = decoder(self.model)
        B, T = batch.input_ids.shape
        P0 = batch.prefix_len if self.share_prefix else 0
        if batch.tree_mask is not None:  # prompt + trie nodes (calft.tree)
            h = forward_tree_batch(self.model, batch.input_ids, batch.position_ids, batch.tree_mask, P0)
            rows = batch.gather_index - P0 * (batch.gather_index // T + 1)  # b*T + t -> b*(T-P0) + t-P0
        elif P0 == 0:
            h = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False).last_hidden_state  # [B, T, H]
            rows = batch.gather_index
        else:
            # transformers 5.x renamed the cache argument `past_key_values` -> `cache`
            name = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
            cache = DynamicCache()
            body(input_ids=batch.input_ids[:1, :P0], use_cache=True, **{name: cache})
            cache.batch_repeat_interleave(B)
            positions = torch.arange(P0, T, device=batch.input_ids.device).expand(B, -1)
            h = body(input_ids=batch.input_ids[:, P0:], attention_mask=batch.attention_mask,
                     position_ids=positions, use_cache=True, **{name: cache}).last_hidden_state  # [B, T-P0, H]
            # flat index b*T + t  ->  b*(T - P0) + (t - P0)
            rows = batch.gather_index - P0 * (batch.gather_index // T + 1)
        return h.reshape(-1, h.shape[-1]).index_select(0, rows)  # [N, H]

    def forward(self, batch) -> torch.Tensor:
        device_type = batch.input_ids.device.type
        enabled = self.autocast_dtype is not None
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled):
            rows = self.hidden_rows(batch)
        weight, bias = lm_head_weight(self.model)
        rows = rows.to(weight.dtype)
        targets, weights = batch.targets, batch.weights
        extra = 0.0
        support = None
        if self.log_ratio_weight > 0:  # on the plain targets: the mixed ones below are the model's own on S
            # both terms need the model's softmax on each row's support: one [nnz, H] gather-dot for the two
            support = _support_log_probs(rows, weight, bias, targets)
            extra = self.log_ratio_weight * support_log_ratio_loss(rows, weight, bias, targets, weights,
                                                                   support=support, cap=self.log_ratio_cap)
        if self.off_support_weight > 0:
            targets, weights = support_mixed_targets(rows, weight, bias, targets, weights, self.off_support_weight,
                                                     support=support)
        # the loss itself is fp32 (docs/method.md, section 'The loss' fix): the op upcasts bf16 inputs internally
        return linear_soft_target_kl(rows, weight, targets, bias=bias, weights=weights, reduction="sum",
                                     validate=False) + extra


def _support_log_probs(rows, weight, bias, targets: SparseTargets):
    """log p_S at each target entry: the model's softmax at row r restricted to the row's target ids
    S and renormalized there, from the [nnz] logits W_k . h_r (+ b_k) alone. Returns (row_of [nnz],
    log p_S [nnz]) in fp32 at least; differentiable."""
    N = targets.row_ptr.numel() - 1
    dt = torch.float64 if rows.dtype == torch.float64 else torch.float32  # fp32 at least, as the loss
    row_of = torch.repeat_interleave(torch.arange(N, device=rows.device), targets.row_ptr.diff())  # [nnz]
    z = (rows.to(dt)[row_of] * weight.to(dt)[targets.token_ids]).sum(-1)  # logits at S: [nnz]
    if bias is not None:
        z = z + bias.to(dt)[targets.token_ids]
    with torch.no_grad():  # a per-row shift for exp's range: p_S does not depend on it
        zmax = torch.full((N,), -torch.inf, dtype=dt, device=z.device).scatter_reduce(0, row_of, z, "amax")
    z = z - zmax[row_of]
    log_norm = torch.zeros(N, dtype=dt, device=z.device).index_add(0, row_of, z.exp()).log()
    return row_of, z - log_norm[row_of]


LOG_RATIO_FLOOR = 1e-3  # eps of support_log_ratio_loss: below it, a child's mass error stops counting


def support_log_ratio_loss(rows, weight, bias, targets: SparseTargets, weights, eps: float = LOG_RATIO_FLOOR,
                           support: tuple | None = None, cap: float = 0.0):
    """``sum_r w_r mean_{k in S_r} (log(p_S(k) + eps) - log(q_k + eps))^2 / 2``: each child's mass
    error as a ratio, with the same say for every child of a node.

    S_r: row r's target ids (a trie node's children), q their target masses, p_S the model's softmax
    restricted to S and renormalized (_support_log_probs). With e_k = log(p_S(k)+eps) - log(q_k+eps)
    and a_k = p_S(k) / (p_S(k) + eps), d/dz_k = (a_k e_k - p_S(k) sum_j a_j e_j) / |S_r| (times w_r):
    about e_k / |S_r| for a child above eps, whatever its mass, where the KL's is p_k - q_k, at most
    that mass (docs/calibration.md, 'Session 17'). The floor eps keeps children the target barely
    visits (q ~ 1e-6 at a 0.1% window's edge) from dominating: below eps, ratios stop mattering.
    It is 0 exactly where p_S = q, so it moves no optimum of the KL on the support. `support`: the
    (row_of, log p_S) of _support_log_probs when the caller has it already (computed here otherwise).
    `cap` = delta > 0 puts the Huber loss in place of e^2 / 2 (delta (|e| - delta / 2) for |e| > delta):
    one child's push is then at most delta, as the KL's p - q is at most 1 (|e| reaches ln(1/eps) ~ 6.9).
    """
    row_of, log_ps = support or _support_log_probs(rows, weight, bias, targets)
    dt = log_ps.dtype
    N = targets.row_ptr.numel() - 1
    err = (log_ps.exp() + eps).log() - (targets.probs.to(dt) + eps).log()  # [nnz]
    per_child = err * err / 2 if cap <= 0 else F.huber_loss(err, torch.zeros_like(err), reduction="none", delta=cap)
    per_row = torch.zeros(N, dtype=dt, device=err.device).index_add(0, row_of, per_child)
    return (weights.to(dt) * per_row / targets.row_ptr.diff().clamp(min=1).to(dt)).sum()


@torch.no_grad()
def support_mixed_targets(rows, weight, bias, targets: SparseTargets, weights, lam: float,
                          support: tuple | None = None):
    """Targets and weights whose soft-target KL has the gradient of KL(q || p) + lam * (-log P_S).

    P_S = sum_{k in S} p_k is the model's mass on the row's target ids S (the trie's children):
    d/dz [KL + lam (-log P_S)] = (softmax - q) + lam (softmax - p_S) = (1 + lam) softmax - (q + lam p_S),
    with p_S the model's softmax renormalized on S (held fixed: no gradient through it). That is
    (1 + lam) x the KL gradient toward q' = (q + lam p_S) / (1 + lam), a distribution on S: the same
    op with target q' and weight (1 + lam) w. Costs one [nnz, H] gather-dot (nnz = target entries),
    none when the caller passes _support_log_probs's (row_of, log p_S) as `support`.
    """
    log_ps = (support or _support_log_probs(rows, weight, bias, targets))[1].detach()
    q = (targets.probs.to(log_ps.dtype) + lam * log_ps.exp()) / (1.0 + lam)
    return SparseTargets(targets.row_ptr, targets.token_ids, q.to(targets.probs.dtype)), weights * (1.0 + lam)
