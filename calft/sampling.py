"""Structured sampling protocol of docs/method.md, section 'Metrics': draw, parse, validate, score.

Per prompt the model draws N answers (paper: N=1000) at temperature 1, top_p 1, at most 32 new
tokens. Each output is parsed and validated, then the valid values are compared with the true
distribution:

    valid_rate             = #valid / N
    support_violation_rate = #(non_finite | below_support | above_support | non_integer) / N
    mean_error             = |mean(x) - mu|                (NaN when mu is infinite/undefined)
    variance_error         = |var(x) - sigma^2|            (ddof=1; NaN when sigma^2 is infinite)
    wasserstein_1          = (1/n) sum_i |x_(i) - F^-1((i + 0.5)/n)|,  i = 0..n-1 (sorted x)
    ks_stat, ks_pvalue     = scipy.stats.kstest(x, F)      (continuous families)
    chi2_stat, chi2_pvalue = Pearson chi-square over the cells {k} for k = lo..hi plus the tail
                             cells (<lo), (>hi) where the true law has mass (integer families;
                             lo, hi = the 0.1% and 99.9% quantiles, as in docs/method.md, section 'Supports')

Randomness: sample j of a prompt uses its own stream of uniforms, seeded by (seed, prompt key, j)
through numpy's SeedSequence, and draws each token by inverting the float64 CDF of the model's
next-token distribution. So a run is reproducible, and sample j does not depend on the batch it
was generated in (up to float round-off in the logits).
"""
from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from calft.families import get_family
from calft.models import cache_kwarg, new_cache

# docs/method.md, section 'Metrics': the whole output (after stripping think blocks) must be this one number.
# re.ASCII: only 0-9 count as digits (Python's float() would also accept e.g. Arabic-Indic digits).
NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$", flags=re.ASCII)
THINK_RE = re.compile(r"<think>.*?</think>", flags=re.DOTALL)
INTEGER_TOL = 1e-9  # |x - round(x)| above this makes an integer-family answer non_integer
BOUND_TOL = 1e-9  # absolute slack on the support bounds (answers are printed, hence rounded)

PARSE_FAILURES = ("empty", "malformed")
SUPPORT_VIOLATIONS = ("non_finite", "below_support", "above_support", "non_integer")
STATUSES = ("valid",) + PARSE_FAILURES + SUPPORT_VIOLATIONS
QUANTILE_LOW, QUANTILE_HIGH = 0.001, 0.999  # the chi-square integer range, as in docs/method.md, section 'Supports'


# -----------------------------------------------------------------------------
# parser and validators


def parse_output(text: str) -> tuple[str, float | None]:
    """Parse one model output: ("ok", value) or ("empty" | "malformed", None).

    Complete `<think>...</think>` blocks are removed first (each becomes a space); surrounding
    whitespace is ignored.
    The rest must be exactly one number (NUMBER_RE). An unclosed `<think>` is malformed.
    """
    if not isinstance(text, str):
        raise ValueError(f"parse_output expects a str, got {type(text).__name__}")
    body = THINK_RE.sub(" ", text).strip()  # a space, so "3<think>..</think>4" cannot read as "34"
    if not body:
        return "empty", None
    if not NUMBER_RE.match(body):
        return "malformed", None
    return "ok", float(body)  # "1e999" parses to inf: caught by the validator as non_finite


# A superset of every prefix of an answer parse_output accepts when the answer holds no "<" (no
# think block): whitespace, a sign, digits and points, an exponent, whitespace. re's \s is str.strip()'s
# whitespace; U+FFFD is how a multi-byte character cut between two tokens decodes.
_NUMBER_PREFIX_RE = re.compile(r"\s*[+-]?[0-9.]*(?:[eE][+-]?[0-9]*)?\s*")


def can_still_parse(text: str) -> bool:
    """False only when no continuation of `text` can make parse_output return "ok": a sampler may
    stop that answer there, its status (malformed) already decided. Conservative: any "<" (a think
    block may be opening) or a partly decoded character keeps the answer going."""
    return "<" in text or "\ufffd" in text or _NUMBER_PREFIX_RE.fullmatch(text) is not None


def classify_value(x: float, lo: float, hi: float, integer: bool) -> str:
    """Status of a parsed number against a support [lo, hi] (bounds may be infinite)."""
    if not math.isfinite(x):
        return "non_finite"
    if x < lo - BOUND_TOL:
        return "below_support"
    if x > hi + BOUND_TOL:
        return "above_support"
    if integer and abs(x - round(x)) > INTEGER_TOL:
        return "non_integer"
    return "valid"


def classify_outputs(texts, family_id: str, params) -> tuple[list[str], np.ndarray]:
    """Status of every output and the float64 array of the valid values (in output order)."""
    fam = get_family(family_id)
    params = fam.validate(params)
    lo, hi = fam.support_bounds(params)
    statuses, values = [], []
    for text in texts:
        status, x = parse_output(text)
        if status == "ok":
            status = classify_value(x, lo, hi, fam.integer_only)
        statuses.append(status)
        if status == "valid":
            values.append(round(x) if fam.integer_only else x)
    return statuses, np.asarray(values, dtype=np.float64)


# -----------------------------------------------------------------------------
# distribution metrics on valid values


def wasserstein_to_quantiles(values, dist) -> float:
    """W1 between the sample and the true law: (1/n) sum_i |x_(i) - F^-1((i + 0.5)/n)|."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.size
    if n == 0:
        return float("nan")
    q = dist.ppf((np.arange(n) + 0.5) / n)
    return float(np.mean(np.abs(x - q)))


def integer_range(dist) -> tuple[int, int]:
    """The integer cells of the chi-square test: the 0.1% and 99.9% quantiles (inside the support).

    Quantiles, not the support bounds, even for bounded families: a cell like Binomial(25, .5) at
    0 (expected 3e-8 n) would let one sample dominate the statistic; the tail cells hold the rest.
    """
    return int(math.floor(dist.ppf(QUANTILE_LOW))), int(math.ceil(dist.ppf(QUANTILE_HIGH)))


def chi_square_discrete(values, dist, lo: int, hi: int) -> tuple[float, float, int]:
    """Pearson chi-square of integer samples against `dist` over cells lo..hi + tails.

    Expected counts: n*pmf(k) for k in lo..hi, n*cdf(lo-1) for the cell (<lo), n*sf(hi) for (>hi).
    Cells with zero expected mass are dropped (a valid sample cannot fall there: it would be
    a support violation). Returns (statistic, p-value, number of cells); df = cells - 1.
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n == 0:
        return float("nan"), float("nan"), 0
    ks = np.arange(lo, hi + 1)
    probs = np.concatenate([[dist.cdf(lo - 1)], dist.pmf(ks), [dist.sf(hi)]])
    idx = np.clip(np.round(x).astype(np.int64) - lo + 1, 0, len(ks) + 1)  # 0 = (<lo), last = (>hi)
    observed = np.bincount(idx, minlength=len(ks) + 2).astype(np.float64)
    keep = probs > 0
    if observed[~keep].sum() > 0:
        raise ValueError("a sample falls in a cell of zero probability: validate samples first")
    probs = probs[keep] / probs[keep].sum()
    res = stats.chisquare(observed[keep], probs * n)
    return float(res.statistic), float(res.pvalue), int(keep.sum())


def _finite_moment(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("nan")


def sample_metrics(texts, family_id: str, params) -> dict:
    """Every per-prompt metric of docs/method.md, section 'Metrics' for one prompt's outputs."""
    fam = get_family(family_id)
    params = fam.validate(params)
    dist = fam.frozen(params)
    statuses, x = classify_outputs(texts, family_id, params)
    n_total = len(statuses)
    if n_total == 0:
        raise ValueError(f"no outputs to score for {family_id} {params}")
    counts = Counter(statuses)
    row = {
        "num_samples": n_total,
        "num_valid": int(x.size),
        "valid_rate": x.size / n_total,
        "parse_failure_rate": sum(counts[s] for s in PARSE_FAILURES) / n_total,
        "support_violation_rate": sum(counts[s] for s in SUPPORT_VIOLATIONS) / n_total,
    }
    row.update({f"count_{s}": counts[s] for s in STATUSES})
    nan = float("nan")
    mu, var = _finite_moment(dist.mean()), _finite_moment(dist.var())
    row["mean_error"] = abs(float(x.mean()) - mu) if x.size else nan
    row["variance_error"] = abs(float(x.var(ddof=1)) - var) if x.size > 1 else nan
    row["wasserstein_1"] = wasserstein_to_quantiles(x, dist)
    row.update(ks_stat=nan, ks_pvalue=nan, chi2_stat=nan, chi2_pvalue=nan, chi2_cells=0)
    if x.size and fam.integer_only:
        lo, hi = integer_range(dist)
        row["chi2_stat"], row["chi2_pvalue"], row["chi2_cells"] = chi_square_discrete(x, dist, lo, hi)
    elif x.size:
        res = stats.kstest(x, dist.cdf)
        row["ks_stat"], row["ks_pvalue"] = float(res.statistic), float(res.pvalue)
    return row


# -----------------------------------------------------------------------------
# generation


def sample_seeds(seed: int, prompt_key: str, num_samples: int) -> list[np.random.SeedSequence]:
    """One SeedSequence per sample, from (seed, crc32(prompt_key), sample index)."""
    key = zlib.crc32(prompt_key.encode("utf-8"))
    return [np.random.SeedSequence([int(seed), key, j]) for j in range(num_samples)]


def stop_token_ids(model, tokenizer) -> set[int]:
    """Stop ids: the last token of the chat template's answer terminator (calft.prompts.answer_format,
    e.g. Gemma's <end_of_turn>: the one training and scoring use), plus the tokenizer's and the
    generation config's EOS."""
    from calft.prompts import answer_format

    ids = set(answer_format(tokenizer).terminator_ids[-1:])
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id: cannot tell where an answer ends")
    return ids


def token_cdf(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """The float64 CDF over the vocabulary of each row's next-token distribution: [B, V].
    With top_p < 1 only the smallest set of most probable tokens with mass >= top_p is kept."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # keeps the token that crosses top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    return probs.cumsum(dim=-1)


def invert_cdf(cdf: torch.Tensor, uniforms) -> torch.Tensor:
    """token = min{k : cdf(k) > u * cdf(V-1)} for each u: cdf [V] with uniforms [n], or [B, V] with [B]."""
    u = torch.as_tensor(uniforms, dtype=torch.float64, device=cdf.device).unsqueeze(-1) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def draw_tokens(logits: torch.Tensor, uniforms: np.ndarray, *, temperature: float = 1.0, top_p: float = 1.0):
    """Inverse-CDF draw of one token per row: token = min{k : CDF(k) > u * CDF(V-1)}.

    logits [B, V]; uniforms float64 [B] in [0, 1). Softmax and CDF in float64 (token_cdf).
    """
    return invert_cdf(token_cdf(logits, temperature=temperature, top_p=top_p), uniforms)


@torch.no_grad()
def generate_samples(model, tokenizer, prompt_ids, num_samples: int, *, seed: int = 0, prompt_key: str = "",
                     batch_size: int = 64, max_new_tokens: int = 32, temperature: float = 1.0,
                     top_p: float = 1.0) -> list[str]:
    """Draw `num_samples` answers to one prompt (token ids, already chat-formatted).

    The prompt runs once per batch; its KV cache is repeated to the batch, rows that emitted a
    stop token are dropped from the cache, and each row draws its tokens from its own seeded
    uniform stream (see the module docstring). Returns the decoded outputs (special tokens
    skipped), in sample order.
    """
    if num_samples <= 0 or batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError("num_samples, batch_size and max_new_tokens must be positive")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    device = next(model.parameters()).device
    stops = torch.tensor(sorted(stop_token_ids(model, tokenizer)), device=device)
    seeds = sample_seeds(seed, prompt_key, num_samples)
    ckw = cache_kwarg(model)
    prompt = torch.as_tensor(np.asarray(prompt_ids), dtype=torch.long, device=device).unsqueeze(0)
    outputs = []
    for start in range(0, num_samples, batch_size):
        rows = range(start, min(start + batch_size, num_samples))
        uniforms = np.stack([np.random.default_rng(seeds[j]).random(max_new_tokens) for j in rows])
        cache = new_cache(model)
        logits = model(input_ids=prompt, **{ckw: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
        cache.batch_repeat_interleave(len(rows))
        logits = logits.expand(len(rows), -1)
        tokens = [[] for _ in rows]
        alive = torch.arange(len(rows), device=device)  # batch row -> sample index within the batch
        for step in range(max_new_tokens):
            tok = draw_tokens(logits, uniforms[alive.cpu().numpy(), step], temperature=temperature, top_p=top_p)
            done = torch.isin(tok, stops)
            for r, t in zip(alive.tolist(), tok.tolist()):
                tokens[r].append(t)
            if done.all() or step == max_new_tokens - 1:
                break
            if done.any():
                keep = (~done).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                alive, tok = alive[keep], tok[keep]
            logits = model(input_ids=tok.unsqueeze(-1), **{ckw: cache}, use_cache=True).logits[:, -1]
        stop_set = set(stops.tolist())
        for t in tokens:  # drop the stop token itself, then any other special tokens
            outputs.append(tokenizer.decode(t[:-1] if t[-1] in stop_set else t, skip_special_tokens=True))
    return outputs


@dataclass
class SampledPrompt:
    """One prompt's outputs and metrics (kept for plots and the per-prompt CSV)."""

    family_id: str
    params: dict
    outputs: list[str]
    values: np.ndarray
    metrics: dict


def evaluate_sampling(model, tokenizer, prepared_list, *, num_samples: int = 1000, seed: int = 0,
                      batch_size: int = 1024, max_new_tokens: int = 32, progress: bool = True) -> list[SampledPrompt]:
    """Run the sampling protocol on prepared prompts (calft.data.PreparedPrompt): the answers of
    several prompts decoded together, `batch_size` rows at a time (calft.batch_sampling; the
    same answers as generate_samples draws one prompt at a time). An answer is cut where no
    continuation could parse as a number (can_still_parse: the base model's prose stops at its
    first letter): its text is shorter, its status the same."""
    from tqdm.auto import tqdm

    from calft.batch_sampling import sample_prompts

    model.eval()
    with tqdm(total=len(prepared_list), desc="sampling", disable=not progress) as bar:
        outputs = sample_prompts(model, tokenizer, [p.prompt_ids for p in prepared_list], num_samples, seed=seed,
                                 prompt_keys=[p.text for p in prepared_list], max_rows=batch_size,
                                 max_new_tokens=max_new_tokens, progress=bar.update, stop_unparseable=True)
    results = []
    for prep, outs in zip(prepared_list, outputs):
        family_id, params = prep.spec.family_id, prep.spec.params_dict
        _, values = classify_outputs(outs, family_id, params)
        results.append(SampledPrompt(family_id, dict(params), outs, values, sample_metrics(outs, family_id, params)))
    return results
