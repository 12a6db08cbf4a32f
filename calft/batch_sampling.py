"""Sampling many prompts at once: the answers of several prompts in one decoding batch.

calft.sampling.generate_samples draws one prompt's answers (its KV cache repeated to a batch of
at most 64). Evaluation draws N answers for each of many prompts, and answers are short (a number
and the terminator: ~3-8 tokens), so a decoding step of one prompt's batch is small and the
per-step overheads dominate. sample_prompts packs the samples of several prompts into one batch
of up to `max_rows` rows:

1. the prompts' common leading tokens (the chat template's system turn) run once, [1, P0];
2. each prompt's remaining tokens run on that cache, right-padded, [U, S] (U prompts), with a
   [U, P0 + S] attention mask that hides the padding and explicit positions P0..P_u - 1;
3. decoding runs over distinct prefixes, not samples: samples of a prompt that drew the same
   tokens so far share one node (one cache row, one forward of their last token), and each
   sample draws its next token from its node's CDF with its own uniform. At step t the batch holds
   the distinct live prefixes of length t (a sample that draws a stop token leaves), so 100
   answers of ~5 tokens cost a few dozen token forwards instead of ~500: numbers share their
   leading digits;
4. the loop ends when no sample is left (or after max_new_tokens); with stop_unparseable, an
   answer also leaves once no continuation could parse as a number (the base model's prose).
So every prompt token and every distinct answer prefix is computed once, and the padding is
attended by nobody.

Randomness is exactly calft.sampling's: sample j of a prompt inverts the float64 CDF of the
model's next-token distribution with its own uniform stream seeded by (seed, prompt key, j), so
the answers are the ones generate_samples draws, up to float round-off in the logits (the batch
composition changes the matmul blocking), whatever the batch they are drawn in.
"""
from __future__ import annotations

import numpy as np
import torch

from calft.models import cache_kwarg, new_cache
from calft.sampling import can_still_parse, invert_cdf, sample_seeds, stop_token_ids, token_cdf


def common_prefix_len(seqs) -> int:
    """Length of the longest common prefix of the token sequences."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for other in seqs[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
    return n


def plan_chunks(num_prompts: int, num_samples: int, max_rows: int) -> list[list[tuple[int, int, int]]]:
    """Chunks of (prompt, first sample, end sample) pieces with at most max_rows rows each,
    in prompt and sample order (a prompt with more samples than max_rows spans chunks)."""
    chunks, cur, rows = [], [], 0
    for p in range(num_prompts):
        start = 0
        while start < num_samples:
            take = min(num_samples - start, max_rows - rows)
            cur.append((p, start, start + take))
            rows, start = rows + take, start + take
            if rows == max_rows:
                chunks.append(cur)
                cur, rows = [], 0
    if cur:
        chunks.append(cur)
    return chunks


@torch.no_grad()
def sample_prompts(model, tokenizer, prompts, num_samples: int, *, seed: int = 0, prompt_keys=None,
                   max_rows: int = 1024, max_new_tokens: int = 32, temperature: float = 1.0,
                   top_p: float = 1.0, progress=None, stop_unparseable: bool = False) -> list[list[str]]:
    """`num_samples` decoded answers for each prompt (token ids, chat-formatted), in sample order.

    prompt_keys: one string per prompt for the seeds (calft.sampling.sample_seeds; default: the
    decoded prompt). max_rows: samples decoded together (memory ~ their distinct prefixes, at
    most max_rows, x prompt length x the model's KV size). progress: an optional callable(number of prompts finished).
    stop_unparseable: end an answer as soon as no continuation of it could parse as a number
    (calft.sampling.can_still_parse; its status is then known: malformed); the others are unchanged.
    """
    if num_samples <= 0 or max_rows <= 0 or max_new_tokens <= 0:
        raise ValueError("num_samples, max_rows and max_new_tokens must be positive")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    prompts = [np.asarray(p, dtype=np.int64) for p in prompts]
    if prompt_keys is None:
        prompt_keys = [tokenizer.decode(p) for p in prompts]
    device = next(model.parameters()).device
    stop_set = stop_token_ids(model, tokenizer)
    stop_list = np.asarray(sorted(stop_set))
    ckw = cache_kwarg(model)
    outputs = [[None] * num_samples for _ in prompts]
    for chunk in plan_chunks(len(prompts), num_samples, max_rows):
        users = sorted({p for p, _, _ in chunk})
        seqs = [prompts[p] for p in users]
        lens = torch.tensor([len(s) for s in seqs], device=device)
        # every prompt keeps at least its last token out of the shared part (its logits come from there)
        P0 = min(common_prefix_len(seqs), int(lens.min()) - 1)
        S = int(lens.max()) - P0
        U = len(users)
        suffix = torch.full((U, S), int(tokenizer.pad_token_id or 0), dtype=torch.long, device=device)
        mask = torch.zeros((U, P0 + S), dtype=torch.long, device=device)
        mask[:, :P0] = 1
        for u, s in enumerate(seqs):
            suffix[u, :len(s) - P0] = torch.as_tensor(s[P0:], device=device)
            mask[u, P0:len(s)] = 1
        cache = new_cache(model)
        if P0 > 0:  # 1. the shared prefix once
            model(input_ids=torch.as_tensor(seqs[0][:P0], device=device).unsqueeze(0), **{ckw: cache},
                  use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(U)
        # 2. the prompts' own tokens, right-padded; logits at each prompt's last real token
        positions = torch.arange(P0, P0 + S, device=device).expand(U, -1)
        logits = model(input_ids=suffix, attention_mask=mask, position_ids=positions, **{ckw: cache},
                       use_cache=True).logits  # [U, S, V]
        last = logits[torch.arange(U, device=device), lens - P0 - 1]  # [U, V]
        del logits
        # 3. one row per sample (which prompt, which output slot (p, j), its uniforms), decoded
        row_node, row_out, uniforms = [], [], []
        for p, a, b in chunk:
            seeds = sample_seeds(seed, prompt_keys[p], num_samples)[a:b]
            row_node += [users.index(p)] * (b - a)
            row_out += [(p, j) for j in range(a, b)]
            uniforms += [np.random.default_rng(sd).random(max_new_tokens) for sd in seeds]
        row_node = np.asarray(row_node)
        uniforms = np.stack(uniforms)
        pos = lens.clone()  # per node: where its next token goes
        alive = np.arange(len(row_out))
        tokens = [[] for _ in row_out]
        # over distinct prefixes: rows that drew the same tokens so far share one node
        # (one cache row, one forward); each row draws from its node's CDF with its own uniform
        for step in range(max_new_tokens):
            cdf = token_cdf(last, temperature=temperature, top_p=top_p)  # [nodes, V]
            tok = np.empty(len(alive), dtype=np.int64)
            for k in np.unique(row_node):
                sel = np.nonzero(row_node == k)[0]
                tok[sel] = invert_cdf(cdf[k], uniforms[alive[sel], step]).cpu().numpy()
            for r, t in zip(alive, tok):
                tokens[r].append(int(t))
            live = ~np.isin(tok, stop_list)
            if stop_unparseable:  # prose: one decode per live answer and step, ~10 us each
                live &= np.array([can_still_parse(tokenizer.decode(tokens[r], skip_special_tokens=True)) for r in alive])
            if not live.any() or step == max_new_tokens - 1:
                break
            alive, row_node, tok = alive[live], row_node[live], tok[live]
            pairs, row_node = np.unique(np.stack([row_node, tok], axis=1), axis=0, return_inverse=True)
            row_node = row_node.reshape(-1)
            parents = torch.as_tensor(pairs[:, 0], device=device)
            cache.batch_select_indices(parents)
            mask = torch.cat([mask[parents], mask.new_ones((len(pairs), 1))], dim=1)
            pos = pos[parents]
            last = model(input_ids=torch.as_tensor(pairs[:, 1:], device=device), attention_mask=mask,
                         position_ids=pos.unsqueeze(-1), **{ckw: cache}, use_cache=True).logits[:, -1]
            pos = pos + 1
        for (p, j), t in zip(row_out, tokens):  # drop the stop token itself, then other special tokens
            outputs[p][j] = tokenizer.decode(t[:-1] if t[-1] in stop_set else t, skip_special_tokens=True)
        if progress is not None:  # prompts whose last sample was drawn in this chunk
            progress(sum(1 for _, _, b in chunk if b == num_samples))
    return outputs
