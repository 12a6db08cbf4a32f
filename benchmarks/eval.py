"""Exact evaluation speed: trie scoring (one pass over the trie's nodes) vs scoring strings one by one.

    python -m benchmarks.eval                         # SmolLM2, Gaussian(3.5, 3), 2 decimals, 1001 strings
    python -m benchmarks.eval --brute-subset 100      # per-string baseline on 100 strings, extrapolated
    python -m benchmarks.eval --device cuda --repeats 5

Methods, all returning log m(s + EOS | prompt) for every support string s:
- calft_tree:      calft.tree.score_trie: the prompt once, then every internal trie node once
                   (tree attention over the prompt's KV cache); forward tokens = P + internal nodes.
- shared_prompt:   the prompt once, its KV cache repeated to a batch of strings, each string's
                   tokens fed in full (right-padded); forward tokens = P + sum_s (|s| + 1).
- brute_batched:   padded batches of prompt + string + EOS, no cache (a typical HF scorer);
                   forward tokens = sum_s (P + |s| + 1).
- brute_loop:      calft.scoring.sequence_log_probs_ref (the tests' oracle): one full forward per
                   string; same tokens as brute_batched, no padding.
Every method is checked against brute_loop (max |diff| of log m), timed (median of --repeats after
one warm-up for the fast methods), and written to benchmarks/results/eval_<device>.json.
"""
from __future__ import annotations

import os

# Spinning OpenMP workers collapse throughput on shared cores (see calft/eval.py); set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from calft.scoring import sequence_log_probs_ref  # noqa: E402
from calft.models import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402
from calft.cli import comma_list  # noqa: E402
from calft.prompts import prompt_text, prompt_token_ids  # noqa: E402
from calft.tokenization import answer_token_ids  # noqa: E402
from calft.support import build_support  # noqa: E402
from calft.tree import node_log_mass, score_trie  # noqa: E402
from calft.trie import build_trie  # noqa: E402

RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------- setup factory


def make_case(model_name: str, family: str, params: dict, decimals: int, bins: int, device: str):
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, device=device)
    support = build_support(family, params, num_decimals=decimals, max_bins=bins)
    prompt = prompt_token_ids(tokenizer, prompt_text(family, params))
    answers = answer_token_ids(tokenizer, support.values)
    trie = build_trie(answers, np.ones(len(answers)), eos_id=tokenizer.eos_token_id)
    return model, tokenizer, prompt, answers, trie


# ----------------------------------------------------------------------------- methods


def calft_tree(model, prompt, answers, trie, eos, *, chunk_size: int, **_):
    return node_log_mass(trie, score_trie(model, prompt, trie, chunk_size=chunk_size))[trie.sequence_leaf]


@torch.no_grad()
def shared_prompt(model, prompt, answers, trie, eos, *, batch_size: int, **_):
    """Prompt KV cache repeated to B rows; each row feeds its whole answer + EOS (right-padded)."""
    from calft.models import cache_kwarg, new_cache

    device = next(model.parameters()).device
    ckw = cache_kwarg(model)
    out = np.empty(len(answers))
    P = len(prompt)
    for a in range(0, len(answers), batch_size):
        seqs = [list(s) + [eos] for s in answers[a : a + batch_size]]
        B, L = len(seqs), max(map(len, seqs))
        cache = new_cache(model)
        first = model(input_ids=torch.tensor([prompt], device=device), **{ckw: cache}, use_cache=True).logits[0, -1]
        cache.batch_repeat_interleave(B)
        ids = torch.tensor([s + [eos] * (L - len(s)) for s in seqs], device=device)  # [B, L]
        att = torch.ones(B, P + L, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            att[i, P + len(s):] = 0
        logits = model(input_ids=ids, attention_mask=att, **{ckw: cache}, use_cache=True).logits  # [B, L, V]
        # position j predicts token j+1; the first token comes from the prompt's last position
        logp = torch.log_softmax(torch.cat([first.expand(B, 1, -1), logits[:, :-1]], 1).double(), -1)
        tok_lp = logp.gather(2, ids[:, :, None])[..., 0]  # [B, L]
        for i, s in enumerate(seqs):
            out[a + i] = tok_lp[i, : len(s)].sum().item()
    return out


@torch.no_grad()
def brute_batched(model, prompt, answers, trie, eos, *, batch_size: int, **_):
    device = next(model.parameters()).device
    out = np.empty(len(answers))
    P = len(prompt)
    for a in range(0, len(answers), batch_size):
        seqs = [list(prompt) + list(s) + [eos] for s in answers[a : a + batch_size]]
        L = max(map(len, seqs))
        ids = torch.tensor([s + [eos] * (L - len(s)) for s in seqs], device=device)
        att = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs], device=device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, P - 1 : -1].double(), -1)
        tok_lp = logp.gather(2, ids[:, P:, None])[..., 0]  # [B, L-P]
        for i, s in enumerate(seqs):
            out[a + i] = tok_lp[i, : len(s) - P].sum().item()
    return out


def brute_loop(model, prompt, answers, trie, eos, **_):
    return sequence_log_probs_ref(model, prompt, answers, eos)


# ----------------------------------------------------------------------------- harness


def timed(fn, repeats: int, warmup: int, device: str, **kw):
    for _ in range(warmup):
        fn(**kw)
    times, out = [], None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(**kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return out, times, peak


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model id, dir, or the embedded alias")
    p.add_argument("--family", default="gaussian", help="distribution family id")
    p.add_argument("--params", default='{"mu": 3.5, "sigma": 3}', help="family parameters, JSON")
    p.add_argument("--num-decimals", type=int, default=2, help="decimals of the support strings")
    p.add_argument("--max-bins", type=int, default=1001, help="support strings, at most")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the fast methods (median reported)")
    p.add_argument("--baseline-repeats", type=int, default=1, help="timed runs of the slow baselines")
    p.add_argument("--brute-subset", type=int, default=0,
                   help="score only the first K strings with the baselines and extrapolate (0 = all strings)")
    p.add_argument("--methods", default="calft_tree,shared_prompt,brute_batched,brute_loop",
                   help="comma-separated subset of the methods")
    p.add_argument("--chunk-size", type=int, default=256, help="trie nodes per forward (calft_tree)")
    p.add_argument("--batch-size", type=int, default=64, help="strings per batch (shared_prompt, brute_batched)")
    p.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/eval_<device>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = {"calft_tree": calft_tree, "shared_prompt": shared_prompt, "brute_batched": brute_batched,
               "brute_loop": brute_loop}
    chosen = comma_list(args.methods)
    unknown = sorted(set(chosen) - set(methods))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(methods)}")
    params = json.loads(args.params)
    model, tok, prompt, answers, trie = make_case(args.model, args.family, params, args.num_decimals,
                                                  args.max_bins, args.device)
    n = len(answers)
    k = args.brute_subset if 0 < args.brute_subset < n else n
    internal = int((np.diff(trie.row_ptr) > 0).sum())
    case = {"model": args.model, "family": args.family, "params": params, "num_decimals": args.num_decimals,
            "num_strings": n, "trie_nodes": int(trie.num_nodes), "internal_nodes": internal,
            "prompt_tokens": len(prompt), "answer_tokens_total": int(sum(len(a) + 1 for a in answers)),
            "device": args.device, "dtype": "float32", "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    print(f"case: {n} strings, {trie.num_nodes} trie nodes ({internal} internal), prompt {len(prompt)} tokens, "
          f"{case['threads']} threads, device {args.device}")
    reference, runs = None, {}
    if "brute_loop" in chosen:  # the oracle first, on the strings every baseline scores
        runs["brute_loop"] = timed(brute_loop, args.baseline_repeats, 0, args.device, model=model, prompt=prompt,
                                   answers=answers[:k], trie=trie, eos=tok.eos_token_id)
        reference = runs["brute_loop"][0]
    results = {}
    for name in chosen:
        fast = name == "calft_tree"
        subset = answers if fast else answers[:k]
        kw = dict(model=model, prompt=prompt, answers=subset, trie=trie, eos=tok.eos_token_id,
                  chunk_size=args.chunk_size, batch_size=args.batch_size)
        reps = args.repeats if fast else args.baseline_repeats
        if name not in runs:
            runs[name] = timed(methods[name], reps, 1 if fast else 0, args.device, **kw)
        out, times, peak = runs[name]
        med = statistics.median(times)
        scale = 1.0 if fast else n / k
        err = float(np.abs(np.asarray(out)[:k] - reference).max()) if reference is not None else None
        results[name] = {"median_s": med * scale, "times_s": times, "strings_scored": len(subset),
                         "extrapolated": scale != 1.0, "max_abs_diff_vs_brute_loop": err, "peak_cuda_mb": peak}
        print(f"  {name:14s} {med * scale:9.2f} s{' (extrapolated)' if scale != 1 else ''}   max|diff| {err}")
    base = results.get("calft_tree", {}).get("median_s")
    lines = [f"| method | seconds ({n} strings) | speedup of calft_tree | max abs diff vs brute_loop |",
             "|---|---|---|---|"]
    for name, r in results.items():
        if base:
            r["calft_tree_speedup"] = r["median_s"] / base
        diff = "n/a" if r["max_abs_diff_vs_brute_loop"] is None else f"{r['max_abs_diff_vs_brute_loop']:.2e}"
        lines.append(f"| {name} | {r['median_s']:.2f}{'*' if r['extrapolated'] else ''} | "
                     f"{r.get('calft_tree_speedup', float('nan')):.1f}x | {diff} |")
    print("\n".join(lines))
    if any(r["extrapolated"] for r in results.values()):
        print(f"* measured on the first {k} strings, scaled by {n}/{k}")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out_path = Path(args.output) if args.output else RESULTS / f"eval_{args.device.split(':')[0]}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"case": case, "results": results, "process_peak_rss_mb": peak_rss,
                                    "table": lines}, indent=1))
    print(f"wrote {out_path}")
    return results


if __name__ == "__main__":
    main()
