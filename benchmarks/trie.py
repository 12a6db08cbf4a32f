"""Trie builder benchmark: C++ (calft.trie) vs the pure-Python reference, same token sequences.

    python -m benchmarks.trie            # full: train split + 16384-bin supports + prepare_split (~3 min)
    python -m benchmarks.trie --quick    # 5 prompts per family, 2 prompts at 16384 bins (~20 s)
    python benchmarks/trie.py --help

Cases (SmolLM2 tokenizer, 5 decimals, every support string tokenized alone + EOS):
  (a) train-1001   the supports of the whole train split at 1001 bins (~1988 prompts, ~1.65M strings)
  (b) bins-16384   four selected prompts at 16384 bins (the hard-target recipe's supports)
Methods: "cpp-batch" = calft.trie.build_tries on flat arrays + offsets (GIL released, one
std::thread per core; what calft.data uses), "cpp-batch-1t" = the same on one thread,
"cpp-lists" = calft.trie.build_trie per prompt from Python lists (includes the list -> array
conversion), "reference" = calft.trie.reference_build_trie per prompt (pure-Python dict trie), "dict-tuples"
= `dict_prefix_trie` below, the plain builder a user would write (prefix tuple -> mass, then BFS);
"vs dict" is its time over each method's (the list-input bar: cpp-lists >= 30x on bins-16384,
4 supports x 16384 strings of ~8 tokens).
Every C++ trie is checked equal to the reference's before timing. Reported: median seconds
(reference: one run), nodes, CSR bytes per edge (row_ptr + token_ids + probs; the child of edge e
is node e + 1, so no child array is stored) and all stored bytes per node (+ node_mass,
sequence_leaf), and the reference's time over each method's. Also calft.data.prepare_split of
the train split from a cold (fresh) and a warm cache. JSON: benchmarks/results/trie[_quick].json.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # `python benchmarks/trie.py`: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import format_table, machine_info, write_json  # noqa: E402
from calft.data import DataSettings, prepare_split  # noqa: E402
from calft.fast_tokenization import tokenize_values  # noqa: E402
from calft.splits import get_split  # noqa: E402
from calft.support import build_support  # noqa: E402
from calft.trie import build_trie, build_tries, reference_build_trie  # noqa: E402

SELECTED_16384 = ("gaussian", "cauchy", "lognormal", "exponential")


def make_case(tokenizer, specs, settings: DataSettings) -> dict:
    """Token sequences of every support string of `specs`, flat and as per-prompt lists."""
    supports = [build_support(s.family_id, s.params_dict, num_decimals=settings.num_decimals,
                              max_bins=settings.max_bins) for s in specs]
    values = [v for s in supports for v in s.values]
    flat, offsets = tokenize_values(tokenizer, values)
    groups = np.zeros(len(specs) + 1, dtype=np.int64)
    np.cumsum([len(s.values) for s in supports], out=groups[1:])
    lists = [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    return {"flat": flat, "offsets": offsets, "probs": np.concatenate([s.probs for s in supports]),
            "groups": groups, "lists": [lists[groups[g]:groups[g + 1]] for g in range(len(specs))],
            "prompt_probs": [s.probs for s in supports], "eos": tokenizer.eos_token_id}


def dict_prefix_trie(seqs, probs, eos):
    """A plain dict-of-prefix-tuples builder: (row_ptr, token_ids, q(t|v)) in BFS order."""
    total = sum(probs)
    mass = {(): 1.0}
    for seq, w in zip(seqs, probs):
        if w <= 0:
            continue
        path = tuple(seq) + (eos,)
        for i in range(1, len(path) + 1):
            mass[path[:i]] = mass.get(path[:i], 0.0) + w / total
    children = {}
    for prefix in mass:
        if prefix:
            children.setdefault(prefix[:-1], []).append(prefix[-1])
    row_ptr, token_ids, cond, queue = [0], [], [], [()]
    for prefix in queue:  # grows while we walk it: BFS, children ascending
        for t in sorted(children.get(prefix, ())):
            queue.append(prefix + (t,))
            token_ids.append(t)
            cond.append(mass[prefix + (t,)] / mass[prefix])
        row_ptr.append(len(token_ids))
    return row_ptr, token_ids, cond


def median_time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def run_case(name: str, case: dict, repeats: int) -> list[dict]:
    eos = case["eos"]
    methods = {
        "cpp-batch": lambda: build_tries(case["flat"], case["offsets"], case["probs"], case["groups"], eos),
        "cpp-batch-1t": lambda: build_tries(case["flat"], case["offsets"], case["probs"], case["groups"], eos,
                                            num_threads=1),
        "cpp-lists": lambda: [build_trie(s, p, eos) for s, p in zip(case["lists"], case["prompt_probs"])],
    }
    t0 = time.perf_counter()
    ref = [reference_build_trie(s, p, eos) for s, p in zip(case["lists"], case["prompt_probs"])]
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = [dict_prefix_trie(s, p, eos) for s, p in zip(case["lists"], case["prompt_probs"])]
    dict_s = time.perf_counter() - t0
    tries = methods["cpp-batch"]()
    assert all(a == b for a, b in zip(tries, ref)) and len(tries) == len(ref), "C++ and reference differ"
    for t, (row_ptr, token_ids, cond) in zip(tries, plain):
        assert t.row_ptr.tolist() == row_ptr and t.token_ids.tolist() == token_ids, "dict-tuples differs"
        np.testing.assert_allclose(t.probs, cond, rtol=1e-12)
    lists = methods["cpp-lists"]()
    assert all(a == b for a, b in zip(lists, ref)), "list-input C++ and reference differ"
    nodes = sum(t.num_nodes for t in tries)
    edges = sum(t.num_edges for t in tries)
    common = {
        "case": name, "prompts": len(tries), "sequences": int(case["offsets"].shape[0] - 1),
        "tokens": int(case["flat"].shape[0]), "nodes": nodes, "max_nodes": max(t.num_nodes for t in tries),
        "csr_bytes_per_edge": sum(t.csr_nbytes for t in tries) / edges,
        "stored_bytes_per_node": sum(t.nbytes for t in tries) / nodes,
    }
    rows = [dict(common, method="reference", seconds=ref_s, speedup=1.0, vs_dict=dict_s / ref_s),
            dict(common, method="dict-tuples", seconds=dict_s, speedup=ref_s / dict_s, vs_dict=1.0)]
    for method, fn in methods.items():
        fn()  # warm-up
        s = median_time(fn, repeats)
        rows.append(dict(common, method=method, seconds=s, speedup=ref_s / s, vs_dict=dict_s / s))
    return rows


def time_prepare(tokenizer, settings, families, max_specs) -> list[dict]:
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        cold = prepare_split(tokenizer, "train", settings, families=families, max_specs=max_specs,
                             cache_dir=cache, progress=False)
        cold_s = time.perf_counter() - t0
        warm_s = median_time(lambda: prepare_split(tokenizer, "train", settings, families=families,
                                                   max_specs=max_specs, cache_dir=cache, progress=False), 3)
        size = sum(p.stat().st_size for p in Path(cache).iterdir())
    return [{"case": "prepare_split(train)", "prompts": len(cold), "cold_s": cold_s, "warm_s": warm_s,
             "cache_mb": size / 2**20}]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="small run: 5 prompts per family, 2 at 16384 bins")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per C++ method (median)")
    parser.add_argument("--no-prepare", action="store_true", help="skip the prepare_split cold/warm timing")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="tokenizer (alias, HF id or dir)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/trie.json, trie_quick.json with --quick)")
    args = parser.parse_args(argv)

    from calft.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    max_specs = 5 if args.quick else None
    soft = DataSettings(num_decimals=5, max_bins=1001)
    hard = DataSettings(num_decimals=5, max_bins=16384)
    selected = [s for s in get_split("test_selected") if s.family_id in SELECTED_16384]
    cases = [("train-1001", get_split("train", max_specs=max_specs), soft),
             ("bins-16384", selected[:2] if args.quick else selected, hard)]
    rows = []
    for name, specs, settings in cases:
        print(f"[{name}] {len(specs)} prompts ...", flush=True)
        rows += run_case(name, make_case(tokenizer, specs, settings), args.repeats)
    print()
    print(format_table(rows, [("case", "case", ""), ("method", "method", ""), ("prompts", "prompts", "d"),
                              ("sequences", "seqs", "d"), ("nodes", "nodes", "d"), ("seconds", "seconds", ".4f"),
                              ("speedup", "ref/x", ".1f"), ("vs_dict", "dict/x", ".1f"), ("csr_bytes_per_edge", "CSR B/edge", ".2f"),
                              ("stored_bytes_per_node", "B/node", ".1f")]))
    prep = []
    if not args.no_prepare:
        print("\n[prepare_split] train split, cold then warm cache ...", flush=True)
        prep = time_prepare(tokenizer, soft, None, max_specs)
        print(format_table(prep, [("case", "case", ""), ("prompts", "prompts", "d"), ("cold_s", "cold s", ".2f"),
                                  ("warm_s", "warm s", ".3f"), ("cache_mb", "cache MiB", ".0f")]))
    out = args.out or ROOT / "benchmarks" / "results" / ("trie_quick.json" if args.quick else "trie.json")
    machine = dict(machine_info("cpu"), load_average_1_5_15=os.getloadavg())  # shared 2-core machines
    write_json(out, {"benchmark": "trie", "quick": args.quick, "machine": machine,
                     "settings": {"tokenizer": args.model, "repeats": args.repeats}, "builders": rows,
                     "prepare": prep})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
