"""Does the model follow the parameters? Moments of the model's answers next to the target's.

Support mass and KL say whether answers look right; they cannot tell a sampler whose mean and
spread move with the prompt's parameters from one that emits plausible numbers whatever it is
asked. These metrics can. Per prompt, with x_s the numeric value of support string s, target p
and the model's exact string probabilities m renormalized on the support (m / M, calft.scoring):

    target_mean, target_sd = mean and sd of x under p      (the discretized target)
    model_mean, model_sd   = mean and sd of x under m / M  (exact, no sampling)
    mean_error_sd          = |model_mean - target_mean| / target_sd
    ks_exact               = max_x |F_m(x) - F_p(x)|       (CDFs over the support's values)
and, from samples (calft.sampling), the same for the empirical distribution of the valid
samples: sample_mean, sample_sd, sample_mean_error_sd, sample_ks.

Over a set of prompts (a family, or a split pooled over families), in target-sd units so that
families and parameters of different scales weigh alike (t_i = target mean, m_i = model mean,
s_i = target sd, c = a family's mean over its prompts, computed within each family so a model
that knows each family's typical range but ignores the parameters scores ~0, not ~1):

    location_r2    = 1 - sum ((m_i - t_i) / s_i)^2 / sum ((t_i - c(t)) / s_i)^2
    location_slope = sum w (t - c_w(t)) (m - c_w(m)) / sum w (t - c_w(t))^2,  w = 1/s^2
                     (1: the model's mean moves with the target's; 0: it ignores the parameters)
    scale_r2       = the location_r2 formula on log sd (no extra scaling)
    sd_within_2x   = fraction of prompts with model_sd within a factor 2 of target_sd
    median_ks      = median of ks_exact (and median_sample_ks of sample_ks)
R^2 is against the identity (model = target), not a fitted line, so an offset or a wrong slope
lowers it; it is negative when the model is further from the targets than their own spread.
"""
from __future__ import annotations

import math

import numpy as np

VARIES = 1e-12  # mean squared spread (in target-sd units) below which targets count as constant
PROMPT_KEYS = ("target_mean", "target_sd", "model_mean", "model_sd", "mean_error_sd", "ks_exact")
SAMPLE_KEYS = ("sample_mean", "sample_sd", "sample_mean_error_sd", "sample_ks", "num_valid_samples")
SUMMARY_KEYS = ("location_r2", "location_slope", "scale_r2", "sd_within_2x", "median_ks",
                "mean_error_sd", "median_sample_ks", "sample_mean_error_sd", "sample_sd_within_2x")


def _moments(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    w = w / w.sum()
    mean = float(np.dot(w, x))
    return mean, float(math.sqrt(max(float(np.dot(w, (x - mean) ** 2)), 0.0)))


def _max_cdf_gap(cdf_a: np.ndarray, cdf_b: np.ndarray) -> float:
    return float(np.max(np.abs(cdf_a - cdf_b))) if cdf_a.size else float("nan")


def exact_tracking(support, log_m_renorm: np.ndarray) -> dict:
    """Per-prompt moments of target and model on the support (log_m_renorm = log(m/M) per string)."""
    x = np.asarray([float(v) for v in support.values], dtype=np.float64)
    p = np.asarray(support.probs, dtype=np.float64)
    m = np.exp(np.asarray(log_m_renorm, dtype=np.float64))
    t_mean, t_sd = _moments(x, p)
    m_mean, m_sd = _moments(x, m)
    order = np.argsort(x, kind="stable")
    gap = _max_cdf_gap(np.cumsum(p[order]) / p.sum(), np.cumsum(m[order]) / m.sum())
    return {"target_mean": t_mean, "target_sd": t_sd, "model_mean": m_mean, "model_sd": m_sd,
            "mean_error_sd": abs(m_mean - t_mean) / t_sd if t_sd > 0 else float("nan"),
            "ks_exact": gap}


def sample_tracking(support, values) -> dict:
    """The same from sampled values (the valid, parsed numbers; NaN metrics when there are none).

    The KS statistic compares the samples' empirical CDF with the discretized target's CDF at
    every support value and every sampled value (both are step functions: the largest gap is at
    one of those points).
    """
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    x = np.asarray([float(v) for v in support.values], dtype=np.float64)
    p = np.asarray(support.probs, dtype=np.float64)
    t_mean, t_sd = _moments(x, p)
    if vals.size == 0:
        return {"target_mean": t_mean, "target_sd": t_sd, "sample_mean": float("nan"), "sample_sd": float("nan"), "sample_mean_error_sd": float("nan"),
                "sample_ks": float("nan"), "num_valid_samples": 0}
    order = np.argsort(x, kind="stable")
    xs, cdf_p = x[order], np.cumsum(p[order]) / p.sum()
    grid = np.union1d(xs, vals)
    f_p = np.concatenate([[0.0], cdf_p])[np.searchsorted(xs, grid, side="right")]
    f_s = np.searchsorted(np.sort(vals), grid, side="right") / vals.size
    s_mean, s_sd = float(vals.mean()), float(vals.std())
    return {"target_mean": t_mean, "target_sd": t_sd, "sample_mean": s_mean, "sample_sd": s_sd,
            "sample_mean_error_sd": abs(s_mean - t_mean) / t_sd if t_sd > 0 else float("nan"),
            "sample_ks": _max_cdf_gap(f_s, f_p), "num_valid_samples": int(vals.size)}


def _r2(pred: np.ndarray, target: np.ndarray, groups: np.ndarray, scale: np.ndarray) -> float:
    """1 - SS_res / SS_tot against the identity, with SS_tot centred within each group."""
    centred = target.copy()
    for g in np.unique(groups):
        sel = groups == g
        centred[sel] = target[sel] - target[sel].mean()
    ss_tot = float(np.sum((centred / scale) ** 2))
    ss_res = float(np.sum(((pred - target) / scale) ** 2))
    # targets that do not vary (Student's t: every mean is 0) leave only float noise in SS_tot
    return 1.0 - ss_res / ss_tot if ss_tot > VARIES * target.size else float("nan")


def _slope(pred: np.ndarray, target: np.ndarray, groups: np.ndarray, w: np.ndarray) -> float:
    num = den = 0.0
    for g in np.unique(groups):
        sel = groups == g
        ww, t, m = w[sel], target[sel], pred[sel]
        tc, mc = t - np.dot(ww, t) / ww.sum(), m - np.dot(ww, m) / ww.sum()
        num += float(np.sum(ww * tc * mc))
        den += float(np.sum(ww * tc * tc))
    return num / den if den > VARIES * np.sum(w) else float("nan")


def _group_summary(rows: list[dict]) -> dict:
    fam = np.asarray([r["family_id"] for r in rows])
    t_mean = np.asarray([r["target_mean"] for r in rows], dtype=np.float64)
    t_sd = np.asarray([r["target_sd"] for r in rows], dtype=np.float64)
    out = {"num_prompts": len(rows)}
    if "model_mean" in rows[0]:
        m_mean = np.asarray([r["model_mean"] for r in rows], dtype=np.float64)
        m_sd = np.asarray([r["model_sd"] for r in rows], dtype=np.float64)
        ok = (t_sd > 0) & (m_sd > 0)
        out.update(
            location_r2=_r2(m_mean[ok], t_mean[ok], fam[ok], t_sd[ok]),
            location_slope=_slope(m_mean[ok], t_mean[ok], fam[ok], 1.0 / t_sd[ok] ** 2),
            scale_r2=_r2(np.log(m_sd[ok]), np.log(t_sd[ok]), fam[ok], np.ones(int(ok.sum()))),
            sd_within_2x=float(np.mean(np.abs(np.log(m_sd[ok] / t_sd[ok])) <= math.log(2))) if ok.any() else float("nan"),
            median_ks=float(np.nanmedian([r["ks_exact"] for r in rows])),
            mean_error_sd=float(np.nanmean([r["mean_error_sd"] for r in rows])),
        )
    if "sample_ks" in rows[0]:
        s_sd = np.asarray([r["sample_sd"] for r in rows], dtype=np.float64)
        ok = (t_sd > 0) & (s_sd > 0)
        with np.errstate(all="ignore"):
            out.update(
                median_sample_ks=float(np.nanmedian([r["sample_ks"] for r in rows])),
                sample_mean_error_sd=float(np.nanmean([r["sample_mean_error_sd"] for r in rows])),
                sample_sd_within_2x=float(np.mean(np.abs(np.log(s_sd[ok] / t_sd[ok])) <= math.log(2)))
                if ok.any() else float("nan"),
            )
    return out


def summarize_tracking(rows) -> dict:
    """Pooled over all rows (SS summed over families) plus "per_family": {family: summary}.

    rows: dicts with "family_id" and the keys of exact_tracking (and/or sample_tracking).
    """
    rows = [r for r in rows if "target_mean" in r]
    if not rows:
        raise ValueError("no rows with tracking metrics")
    by_family: dict[str, list[dict]] = {}
    for r in rows:
        by_family.setdefault(r["family_id"], []).append(r)
    out = _group_summary(rows)
    out["per_family"] = {f: _group_summary(rs) for f, rs in by_family.items()}
    return out


# The calibration targets for the quick recipe, on unseen parameters inside the training
# ranges: tracking metrics (pooled) and exact metrics (family means, calft.scoring.summarize).
TARGETS = {"location_r2": (">=", 0.9), "sd_within_2x": (">=", 0.75), "median_sample_ks": ("<=", 0.2),
           "support_mass": (">=", 0.9)}


def missed_targets(tracking: dict, exact: dict, base_exact: dict | None = None) -> list[str]:
    """One line per missed target: TARGETS on `tracking` (summarize_tracking) and `exact`
    (summarize), and every family whose seq_kl_renorm is worse than the base model's."""
    missed = []
    for key, (op, bound) in TARGETS.items():
        value = tracking.get(key, exact.get(key))
        if value is None or value != value:
            continue  # not measured (e.g. no sampling)
        if not (value >= bound if op == ">=" else value <= bound):
            missed.append(f"{key} {value:.3g} (target {op} {bound})")
    if base_exact is not None:
        worse = [f for f, m in exact.get("per_family", {}).items()
                 if m.get("seq_kl_renorm", 0.0) > base_exact["per_family"].get(f, {}).get("seq_kl_renorm", float("inf"))]
        if worse:
            missed.append(f"seq_kl_renorm worse than the base model's for {', '.join(worse)}")
    return missed
