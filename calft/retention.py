"""Retention, offline: does calibration fine-tuning cost arithmetic ability?

The paper measures retention with tinyBenchmarks (tinyGSM8k and four multiple-choice sets) loaded
from a model hub. Offline there is no GSM8K; `reasoning-gym` (Apache-2.0, PyPI) generates
GSM-style word problems (`gsm_symbolic`, templates derived from GSM8K, answers after "####") and
plain arithmetic (`basic_arithmetic`) locally and deterministically from a seed. No package ships
real licensed multiple-choice data (MMLU, HellaSwag, TruthfulQA, Winogrande), so there is no
multiple-choice retention task here.

Items: TASKS fixes each task's reasoning-gym dataset, configuration and seed, so every model is
scored on the same items. An item is one user turn: the bare question when the task has no shots,
else `shots` worked examples (from another seed) and the question, in tinyGSM8k's layout:
    Question: <q>\nAnswer: <worked answer> #### <number>\n\n ... Question: <q>\nAnswer:
Greedy decoding (the artifact: temperature 0), at most `max_new_tokens`, cut at the next
"Question:". Scoring, the artifact's two ways (numbers lose thousands commas and trailing zeros):
    strict   = the text after the first "####" up to the line end holds exactly one number, equal
               to the gold answer
    flexible = the last number anywhere in the output equals the gold answer
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import numpy as np
import torch

NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
STRICT_RE = re.compile(r"####\s*([^\n\r]+)")
STOP_TEXT = "Question:"


@dataclass(frozen=True)
class RetentionTask:
    """One fixed item set: reasoning-gym dataset + config, item seed, few-shot seed and budget."""

    dataset: str
    config: dict
    seed: int
    shots: int
    max_new_tokens: int
    description: str


# Sizes chosen so the base SmolLM2-135M-Instruct scores well above zero (measured on 30 items:
# 1-digit sums zero-shot, flexible 0.67; with "Question:/Answer: ... ####" examples in the prompt
# it drops to 0.13, so the arithmetic tasks ask the bare question). GSM-style word problems stay at
# its floor (0 of 12, strict and flexible) and are run at the full size only, as a reference.
ARITH = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "allow_parentheses": False, "allow_negation": False}
TASKS = {
    "arith_add1": RetentionTask("basic_arithmetic", ARITH | {"max_digits": 1, "operators": ("+",)}, seed=1234,
                                shots=0, max_new_tokens=48, description="a + b, one-digit operands, zero-shot"),
    "arith_addsub2": RetentionTask("basic_arithmetic", ARITH | {"max_digits": 2, "operators": ("+", "-")}, seed=1234,
                                   shots=0, max_new_tokens=48,
                                   description="a + b or a - b, 1-2 digit operands, zero-shot"),
    "gsm_symbolic": RetentionTask("gsm_symbolic", {}, seed=1234, shots=2, max_new_tokens=192,
                                  description="GSM8K-template word problems, 2 worked examples in the prompt"),
}


def normalize_number(text: str) -> str | None:
    """Canonical decimal string ("1,200.50" -> "1200.5"), None when not a number."""
    candidate = text.strip().replace(",", "")
    try:
        d = Decimal(candidate).normalize()
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    return str(int(d)) if d == d.to_integral() else format(d, "f").rstrip("0").rstrip(".")


def strict_answer(text: str) -> str | None:
    """The number after the first "####", when that line holds exactly one."""
    m = STRICT_RE.search(text)
    if m is None:
        return None
    nums = NUMBER_RE.findall(m.group(1))
    return normalize_number(nums[0]) if len(nums) == 1 else None


def flexible_answer(text: str) -> str | None:
    """The last number anywhere in the text."""
    nums = NUMBER_RE.findall(text)
    return normalize_number(nums[-1]) if nums else None


def _dataset(task: RetentionTask, seed: int, size: int):
    from calft.optional import require

    rg = require("reasoning_gym", "reasoning-gym", "the retention benchmark")
    return rg.create_dataset(task.dataset, seed=seed, size=size, **task.config)


def _worked_answer(item) -> str:
    """A few-shot answer: reasoning-gym's worked solution ending in "#### n", or just "#### n"."""
    cot = (item.get("metadata") or {}).get("answer_cot") or ""
    cot = cot.split("####")[0].strip()
    return f"{cot}\n#### {item['answer']}" if cot else f"#### {item['answer']}"


def build_items(name: str, num_items: int) -> list[dict]:
    """[{"prompt", "gold"}] of a task: fixed seeded items, each with its few-shot block."""
    if name not in TASKS:
        raise ValueError(f"unknown retention task {name!r}; known: {', '.join(TASKS)}")
    task = TASKS[name]
    shots = list(_dataset(task, task.seed + 1, max(task.shots, 1)))[:task.shots]
    head = "".join(f"Question: {s['question']}\nAnswer: {_worked_answer(s)}\n\n" for s in shots)
    # zero-shot: the bare question, as a user would ask it (see TASKS)
    return [{"prompt": f"{head}Question: {it['question']}\nAnswer:" if shots else it["question"],
             "gold": normalize_number(str(it["answer"]))} for it in _dataset(task, task.seed, num_items)]


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations of chat-rendered prompts (left-padded batches), special tokens dropped."""
    from calft.prompts import prompt_token_ids
    from calft.sampling import stop_token_ids

    device = next(model.parameters()).device
    stops = sorted(stop_token_ids(model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    outs = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_token_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        for row in gen[:, width:].tolist():
            outs.append(tokenizer.decode(row, skip_special_tokens=True).split(STOP_TEXT)[0])
    return outs


def score_outputs(outputs: list[str], golds: list[str]) -> dict:
    """Strict and flexible accuracy, and how often the strict format was followed at all."""
    strict = [strict_answer(o) for o in outputs]
    flex = [flexible_answer(o) for o in outputs]
    n = len(outputs)
    return {"num_items": n,
            "strict": float(np.mean([s is not None and s == g for s, g in zip(strict, golds)])) if n else float("nan"),
            "flexible": float(np.mean([f is not None and f == g for f, g in zip(flex, golds)])) if n else float("nan"),
            "strict_format_rate": float(np.mean([s is not None for s in strict])) if n else float("nan")}


def run_retention(model, tokenizer, sizes: dict[str, int], *, batch_size: int = 16, progress: bool = False) -> dict:
    """{task: score_outputs(...) + an example} for the tasks and item counts in `sizes`."""
    from tqdm.auto import tqdm

    out = {}
    for name in tqdm(list(sizes), desc="retention", disable=not progress, leave=False):
        items = build_items(name, sizes[name])
        outputs = greedy_generate(model, tokenizer, [it["prompt"] for it in items],
                                  max_new_tokens=TASKS[name].max_new_tokens, batch_size=batch_size)
        out[name] = score_outputs(outputs, [it["gold"] for it in items]) | {"example": outputs[0][:200]}
    return out
