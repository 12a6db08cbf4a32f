"""NoveltyBench, offline: how many meaningfully different answers a model gives to one prompt.

NoveltyBench (Zhang et al., 2025; github.com/novelty-bench/novelty-bench) asks each of its 100
curated prompts ("Tell me a story in five sentences about a girl and her dog.") k = 10 times at
temperature 1, partitions the k answers into equivalence classes, and reports
    distinct = number of classes (1..k; higher = more diverse).
The prompts ship with calft (calft/benchmark_data/noveltybench/, MIT licence, (c) 2025 Yiming Zhang).

Partition (greedy, as upstream): answer i opens a class unless it was already placed; every later
unplaced answer j joins it when equivalent(i, j) against the class's FIRST answer. Equivalence is
upstream's model-free rule, applied in this order:
  1. short answers: when both answers have at most 5 whitespace words (lower-cased), they are
     equivalent iff 2 * |shared distinct words| >= the longer one's word count;
  2. otherwise ROUGE-1 F-measure > 0.458 (upstream's `--alg unigram` threshold; the rouge-score
     package, no stemming, as upstream).
Upstream's default (and the paper's artifact) runs step 1 and then, instead of step 2, a DeBERTa
similarity classifier (threshold 0.102), a model that is not available offline. Upstream's
model-free option (`--alg unigram`) is the ROUGE-1 test alone; calft keeps step 1 in front of it,
so short answers ("Paris" vs "paris") are judged as in the paper's pipeline. calft's `distinct` is
therefore NoveltyBench's model-free variant, not the classifier's number.

Utility (upstream's other number) scores the class representatives with a 27B reward model
(Skywork-Reward-Gemma-2-27B). It is NOT computed here: no reward model is available offline, and a
smaller stand-in would be a different metric under the same name.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np

ROUGE1_THRESHOLD = 0.458  # upstream's unigram equivalence threshold (ROUGE-1 F)
SHORT_WORDS = 5  # the short-answer rule applies when both answers have at most this many words
PAPER_GENERATIONS = 10  # upstream's k
PAPER_MAX_NEW_TOKENS = 512  # the artifact's generation budget


def load_prompts(num_prompts: int | None = None) -> list[dict]:
    """The curated prompts, in file order: [{"id", "category", "prompt", ...}]."""
    path = resources.files("calft") / "benchmark_data" / "noveltybench" / "curated.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:num_prompts]


@lru_cache(maxsize=1)
def _scorer():
    from calft.optional import require

    rouge_scorer = require("rouge_score.rouge_scorer", "rouge-score", "NoveltyBench's partition")
    return rouge_scorer.RougeScorer(["rouge1"])


def short_answer_rule(a: str, b: str) -> bool | None:
    """Step 1 of the module docstring: True/False for two short answers, None otherwise."""
    wa, wb = a.strip().lower().split(), b.strip().lower().split()
    longest = max(len(wa), len(wb))
    if longest > SHORT_WORDS:
        return None
    return 2 * len(set(wa) & set(wb)) >= longest


def rouge1_f(a: str, b: str) -> float:
    """ROUGE-1 F-measure of two answers (rouge-score's tokenizer: lower-cased alphanumeric words)."""
    return float(_scorer().score(a, b)["rouge1"].fmeasure)


def equivalent(a: str, b: str) -> bool:
    """The model-free equivalence of the module docstring."""
    short = short_answer_rule(a, b)
    return short if short is not None else rouge1_f(a, b) > ROUGE1_THRESHOLD


def partition(responses) -> list[int]:
    """Class index of every response (greedy against each class's first member)."""
    labels = [-1] * len(responses)
    classes = 0
    for i, first in enumerate(responses):
        if labels[i] >= 0:
            continue
        labels[i] = classes
        for j in range(i + 1, len(responses)):
            if labels[j] < 0 and equivalent(first, responses[j]):
                labels[j] = classes
        classes += 1
    return labels


def distinct(responses) -> int:
    """Number of equivalence classes (0 for no responses)."""
    labels = partition(responses)
    return max(labels) + 1 if labels else 0


def run_noveltybench(model, tokenizer, *, num_prompts: int | None = None, generations: int = PAPER_GENERATIONS,
                     max_new_tokens: int = PAPER_MAX_NEW_TOKENS, seed: int = 0, progress: bool = False) -> dict:
    """Generate `generations` answers per curated prompt (temperature 1, calft.sampling) and partition.

    Returns {"distinct": mean over prompts, "distinct_per_category": {...}, "per_prompt": [...]}.
    """
    from tqdm.auto import tqdm

    from calft.prompts import prompt_token_ids
    from calft.sampling import generate_samples

    _scorer()  # a missing rouge-score fails before any generation
    rows = []
    for item in tqdm(load_prompts(num_prompts), desc="noveltybench", disable=not progress, leave=False):
        ids = prompt_token_ids(tokenizer, item["prompt"])
        outs = [o.strip() for o in generate_samples(model, tokenizer, ids, generations, seed=seed,
                                                    prompt_key=item["id"], batch_size=generations,
                                                    max_new_tokens=max_new_tokens)]
        labels = partition(outs)
        rows.append({"id": item["id"], "category": item["category"], "distinct": max(labels) + 1,
                     "partition": labels, "example": outs[0][:200]})
    by_cat: dict[str, list[int]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r["distinct"])
    return {"num_prompts": len(rows), "generations": generations, "max_new_tokens": max_new_tokens,
            "distinct": float(np.mean([r["distinct"] for r in rows])) if rows else float("nan"),
            "distinct_per_category": {c: float(np.mean(v)) for c, v in by_cat.items()},
            "utility": None, "per_prompt": rows}
