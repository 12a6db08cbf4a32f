"""The paper artifact's metric definitions, where they differ from calft's own.

The paper's numbers come from its artifact (chandar-lab/calibration-finetuning). calft's sampling
metrics (calft.sampling) and small benchmarks (calft.open_ended) measure the same things with a few
different choices; the paper suite (calft.paper_suite) reports the artifact's, defined here:

Structured sampling, per prompt, on the valid parsed values x (n of them; calft.sampling parses):
    variance_error_ddof0 = |var(x, ddof=0) - sigma^2|      (calft.sampling uses ddof=1)
    wasserstein_1        = (1/n) sum_i |x_(i) - F^-1((i + 0.5)/n)|      (same as calft.sampling)
    support_violation_rate = #(non_finite | below | above support | non_integer) / #samples
    anderson_fitted      = scipy.stats.anderson(x, dist).statistic for the four families scipy
                           tests (norm, expon, logistic, weibull_min); scipy estimates the
                           parameters from x, so this tests the SHAPE only (the artifact's choice)
    anderson_known       = A^2 against the prompt's own law F (no fitting; case 0 of the test):
        A^2 = -n - (1/n) sum_{i=1..n} (2i - 1) [ln F(x_(i)) + ln(1 - F(x_(n+1-i)))]

Open random generation (artifact `open_random_gen/metrics.py`):
    normalize     = first non-empty line (think tags removed), whitespace runs -> one space, one
                    pair of matching surrounding quotes removed; no lower-casing
    distinct      = number of different non-empty normalized outputs of a prompt
    support size  = smallest k whose k most probable first tokens hold >= t of the mass, at the 21
                    thresholds TOP_P_THRESHOLDS

MCQ balance (artifact `mcq_gen/parser.py` and `metrics.py`): a strict line parser. An output is
parseable when its non-empty lines are exactly one "Question:", one each of "A." .. "D.", one
"Correct Answer:" whose value is one of A-D, one "Explanation:", all non-empty, and nothing else.
Over N outputs: parse_rate = #parseable / N, valid_correct_answer_rate = #(answer in A-D) / N,
unique_options_rate = #(four different non-empty options) / N; letter frequencies over the
parseable ones, their chi-square p-value against uniform, TV = 1/2 sum |f - 1/4| and the largest
|f - 1/4|.
"""
from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import torch
from scipy import stats

# calft family id -> the scipy name the artifact passes to scipy.stats.anderson
ANDERSON_FAMILIES = {"gaussian": "norm", "exponential": "expon", "logistic": "logistic", "weibull": "weibull_min"}
MIN_ANDERSON_SAMPLES = 5  # the artifact skips the test below 5 values
TOP_P_THRESHOLDS = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7,
                    0.75, 0.8, 0.85, 0.9, 0.95, 0.99)
MCQ_LETTERS = ("A", "B", "C", "D")

THINK_BLOCK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
THINK_TAG_RE = re.compile(r"</?think>", re.IGNORECASE)
SPACES_RE = re.compile(r"\s+")


# -----------------------------------------------------------------------------
# structured sampling


def variance_error_ddof0(values, true_var: float) -> float:
    """|population variance of the sample - the law's variance| (NaN: no sample, infinite variance)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0 or not math.isfinite(true_var):
        return float("nan")
    return abs(float(x.var(ddof=0)) - float(true_var))


def anderson_known(values, dist) -> float:
    """Anderson-Darling A^2 of the sample against the fully specified law `dist` (module docstring)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.size
    if n == 0:
        return float("nan")
    # logcdf / logsf keep the far tails finite where cdf would round to 0 or 1
    log_f, log_s = dist.logcdf(x), dist.logsf(x)
    i = np.arange(1, n + 1)
    return float(-n - np.sum((2 * i - 1) * (log_f + log_s[::-1])) / n)


def scipy_anderson(x: np.ndarray, name: str) -> float:
    """scipy.stats.anderson(x, name).statistic; SciPy >= 1.17 wants a p-value `method` (the
    statistic does not depend on it), older versions do not know the argument."""
    import warnings

    with np.errstate(all="ignore"), warnings.catch_warnings():  # the logistic/weibull fits overflow
        warnings.simplefilter("ignore", RuntimeWarning)  # and warn about slow progress on the way
        try:
            return float(stats.anderson(x, dist=name, method="interpolate").statistic)
        except TypeError:
            return float(stats.anderson(x, dist=name).statistic)


def anderson_fitted(values, family_id: str) -> float:
    """scipy.stats.anderson's statistic (parameters fitted to the sample), NaN where not defined."""
    name = ANDERSON_FAMILIES.get(family_id)
    x = np.asarray(values, dtype=np.float64)
    if name is None or x.size < MIN_ANDERSON_SAMPLES or np.ptp(x) == 0:
        return float("nan")
    try:
        return scipy_anderson(x, name)
    except (FloatingPointError, ValueError, RuntimeError):  # e.g. a weibull fit that does not converge
        return float("nan")


def structured_metrics(texts, family_id: str, params) -> dict:
    """calft.sampling.sample_metrics plus the artifact's variance error and Anderson-Darling."""
    from calft.families import get_family
    from calft.sampling import classify_outputs, sample_metrics

    fam = get_family(family_id)
    params = fam.validate(params)
    dist = fam.frozen(params)
    row = sample_metrics(texts, family_id, params)
    _, x = classify_outputs(texts, family_id, params)
    true_var = float(dist.var())
    sd = math.sqrt(true_var) if math.isfinite(true_var) and true_var > 0 else float("nan")
    row["variance_error_ddof0"] = variance_error_ddof0(x, true_var)
    row["w1_over_sd"] = row["wasserstein_1"] / sd if x.size else float("nan")
    row["anderson_fitted"] = anderson_fitted(x, family_id)
    row["anderson_known"] = anderson_known(x, dist) if family_id in ANDERSON_FAMILIES else float("nan")
    return row


# -----------------------------------------------------------------------------
# open random generation


def normalize_first_line(text: str) -> str:
    """The artifact's open-generation normalization (module docstring)."""
    body = THINK_TAG_RE.sub("", THINK_BLOCK_RE.sub("", text)).strip()
    line = next((ln.strip() for ln in body.splitlines() if ln.strip()), "")
    line = SPACES_RE.sub(" ", line)
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "'\"":
        line = line[1:-1].strip()
    return line


def distinct_outputs(outputs) -> int:
    """Number of different non-empty normalized outputs."""
    return len({o for o in (normalize_first_line(t) for t in outputs) if o})


def top_p_support_sizes(probs: torch.Tensor, thresholds=TOP_P_THRESHOLDS) -> dict[float, int]:
    """{t: smallest k with sum of the k largest probabilities >= t} (all of them when none is)."""
    p = torch.sort(probs.double().flatten(), descending=True).values
    c = torch.cumsum(p, 0)
    out = {}
    for t in thresholds:
        if not 0 < t <= 1:
            raise ValueError(f"top-p threshold must be in (0, 1], got {t}")
        k = int(torch.searchsorted(c, torch.tensor([float(t)], dtype=c.dtype)).item()) + 1
        out[float(t)] = min(k, p.numel())
    return out


# -----------------------------------------------------------------------------
# MCQ strict parser


def parse_mcq_strict(text: str) -> dict:
    """{"parseable", "answer" (letter or ""), "valid_answer", "unique_options", "errors"}."""
    body = THINK_TAG_RE.sub("", THINK_BLOCK_RE.sub("", text)).strip()
    fields: dict[str, list[str]] = {}
    errors = []
    prefixes = [("question", "Question:")] + [(x, f"{x}.") for x in MCQ_LETTERS] + [
        ("answer", "Correct Answer:"), ("explanation", "Explanation:")]
    for line in (ln.strip() for ln in body.splitlines()):
        if not line:
            continue
        key = next((k for k, pre in prefixes if line.startswith(pre)), None)
        if key is None:
            errors.append("unexpected_line")
            continue
        value = SPACES_RE.sub(" ", line[len(dict(prefixes)[key]):].strip())
        fields.setdefault(key, []).append(value)
    for key, _ in prefixes:
        found = fields.get(key, [])
        if len(found) != 1:
            errors.append(f"{'missing' if not found else 'duplicate'}_{key}")
        elif not found[0]:
            errors.append(f"empty_{key}")
    first = {k: v[0] for k, v in fields.items() if v}
    answer = first.get("answer", "")
    options = [first.get(x, "") for x in MCQ_LETTERS]
    if answer not in MCQ_LETTERS:
        errors.append("invalid_answer")
    return {"parseable": not errors, "answer": answer, "valid_answer": answer in MCQ_LETTERS,
            "unique_options": len({o for o in options if o}) == len(MCQ_LETTERS), "errors": errors}


def mcq_strict_metrics(parsed: list[dict]) -> dict:
    """The artifact's MCQ summary over parse_mcq_strict results (module docstring)."""
    n = len(parsed)
    ok = [p for p in parsed if p["parseable"]]
    counts = Counter(p["answer"] for p in ok)
    out = {"num_questions": n,
           "parse_rate": len(ok) / n if n else float("nan"),
           "valid_correct_answer_rate": sum(p["valid_answer"] for p in parsed) / n if n else float("nan"),
           "unique_options_rate": sum(p["unique_options"] for p in parsed) / n if n else float("nan")}
    if ok:
        freqs = np.array([counts[x] / len(ok) for x in MCQ_LETTERS])
        out.update({f"freq_{x}": float(f) for x, f in zip(MCQ_LETTERS, freqs)})
        out["chi2_pvalue"] = float(stats.chisquare([counts[x] for x in MCQ_LETTERS]).pvalue)
        out["tv_uniform"] = float(0.5 * np.abs(freqs - 0.25).sum())
        out["max_abs_deviation"] = float(np.abs(freqs - 0.25).max())
    else:  # nothing parsed: no balance to measure (the artifact writes 0 here; NaN is honest)
        out.update({f"freq_{x}": float("nan") for x in MCQ_LETTERS},
                   chi2_pvalue=float("nan"), tv_uniform=float("nan"), max_abs_deviation=float("nan"))
    return out
