"""Secondary benchmarks of the paper, at small scale: MCQ answer-position balance and open-ended
random generation. Prompt sets are written for calft and ship in calft/prompt_sets/*.json.

MCQ balance: the model writes N four-option questions (topics cycled) and declares the correct
letter ("Answer: X"). With letter frequencies f over K letters (parsed answers only):
    tv_uniform = 1/2 sum_k |f_k - 1/K|,   chi2 = Pearson chi-square of the counts vs uniform.
A model that always puts the answer in one position has tv_uniform = 1 - 1/K.

Open-ended generation: per prompt ("Think of a random word"), S samples; unique_rate = number of
distinct normalized outputs / S (normalized: stripped, lower-cased, trailing punctuation removed).
first_token_support = the number of most probable first tokens needed to reach mass top_p (0.9):
how many different ways the model is willing to start its answer.
"""
from __future__ import annotations

import json
import re
from importlib import resources

import numpy as np
import torch
from scipy import stats

from calft.sampling import generate_samples

ANSWER_RE = re.compile(r"(?:correct\s+)?answer\s*(?:is)?\s*[:\-]?\s*\**\s*\(?([A-Za-z])\)?(?![A-Za-z])", re.IGNORECASE)
EDGE_RE = re.compile(r"^[\s\"'`*]+|[\s\"'`*.!?,;:]+$")  # quotes/markdown around, punctuation after
FIRST_TOKEN_TOP_P = 0.9  # support size = tokens needed to cover 90% of the first-token mass


def load_prompt_set(name: str) -> dict:
    """Load calft/prompt_sets/<name>.json ("open_ended" or "mcq")."""
    path = resources.files("calft") / "prompt_sets" / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown prompt set {name!r}; available: open_ended, mcq")
    return json.loads(path.read_text(encoding="utf-8"))


# -----------------------------------------------------------------------------
# MCQ answer-position balance


def parse_mcq_answer(text: str, letters: str = "ABCD") -> str | None:
    """The declared correct letter: the last "Answer: X" (case-insensitive) with X in `letters`."""
    found = [m.group(1).upper() for m in ANSWER_RE.finditer(text)]
    found = [x for x in found if x in letters]
    return found[-1] if found else None


def mcq_metrics(answers, letters: str = "ABCD") -> dict:
    """Letter frequencies of the parsed answers vs uniform: TV distance and chi-square."""
    k = len(letters)
    parsed = [a for a in answers if a is not None]
    counts = np.array([sum(a == x for a in parsed) for x in letters], dtype=np.float64)
    n = counts.sum()
    out = {"num_questions": len(answers), "parse_rate": float(n / len(answers)) if answers else float("nan")}
    out.update({f"freq_{x}": (float(c / n) if n else float("nan")) for x, c in zip(letters, counts)})
    if n:
        res = stats.chisquare(counts)  # uniform expected counts
        out.update(tv_uniform=float(0.5 * np.abs(counts / n - 1 / k).sum()),
                   chi2_stat=float(res.statistic), chi2_pvalue=float(res.pvalue))
    else:
        out.update(tv_uniform=float("nan"), chi2_stat=float("nan"), chi2_pvalue=float("nan"))
    return out


def run_mcq(model, tokenizer, *, num_questions: int = 100, seed: int = 0, max_new_tokens: int = 160,
            batch_size: int = 16) -> dict:
    """Generate num_questions MCQs (topics cycled, one sample per request) and score the balance."""
    from tqdm.auto import tqdm

    from calft.prompts import prompt_token_ids

    spec = load_prompt_set("mcq")
    topics, letters = spec["topics"], spec["letters"]
    per_topic = -(-num_questions // len(topics))
    outputs = []
    for i, topic in enumerate(tqdm(topics, desc="mcq", leave=False)):
        n = min(per_topic, num_questions - len(outputs))
        if n <= 0:
            break
        text = spec["instruction"].format(topic=topic)
        outputs += generate_samples(model, tokenizer, prompt_token_ids(tokenizer, text), n, seed=seed,
                                    prompt_key=text, batch_size=batch_size, max_new_tokens=max_new_tokens)
    result = mcq_metrics([parse_mcq_answer(o, letters) for o in outputs], letters)
    result["examples"] = outputs[:3]
    return result


# -----------------------------------------------------------------------------
# open-ended random generation


def normalize_output(text: str) -> str:
    """Compare answers loosely: strip, lower-case, drop surrounding quotes and final punctuation."""
    return EDGE_RE.sub("", text).lower()


def unique_rate(outputs) -> float:
    """Distinct normalized outputs / number of outputs."""
    outs = [normalize_output(o) for o in outputs]
    return len(set(outs)) / len(outs) if outs else float("nan")


def top_p_support_size(probs: torch.Tensor, top_p: float = FIRST_TOKEN_TOP_P) -> int:
    """Smallest number of most probable tokens whose total probability reaches top_p."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    p = torch.sort(probs.double().flatten(), descending=True).values
    c = torch.cumsum(p, 0)
    return int(torch.searchsorted(c, torch.tensor([top_p * float(c[-1])], dtype=c.dtype)).item()) + 1


@torch.no_grad()
def first_token_probs(model, prompt_ids) -> torch.Tensor:
    """The model's next-token distribution after the prompt: float64 [V]."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(prompt_ids), dtype=torch.long, device=device).unsqueeze(0)
    logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
    return torch.softmax(logits.double(), dim=-1)


def run_open_ended(model, tokenizer, *, num_prompts: int | None = None, samples_per_prompt: int = 100,
                   seed: int = 0, max_new_tokens: int = 16, batch_size: int = 50) -> dict:
    """Unique-output rate and first-token top-p support size, per prompt and averaged."""
    from tqdm.auto import tqdm

    from calft.prompts import prompt_token_ids

    prompts = load_prompt_set("open_ended")["prompts"][:num_prompts]
    rows = []
    for text in tqdm(prompts, desc="open-ended", leave=False):
        ids = prompt_token_ids(tokenizer, text)
        outs = generate_samples(model, tokenizer, ids, samples_per_prompt, seed=seed, prompt_key=text,
                                batch_size=batch_size, max_new_tokens=max_new_tokens)
        rows.append({"prompt": text, "unique_rate": unique_rate(outs),
                     "first_token_support": top_p_support_size(first_token_probs(model, ids)),
                     "example": normalize_output(outs[0])})
    return {"num_prompts": len(rows), "samples_per_prompt": samples_per_prompt,
            "unique_rate": float(np.mean([r["unique_rate"] for r in rows])),
            "first_token_support": float(np.mean([r["first_token_support"] for r in rows])),
            "per_prompt": rows}
