"""Evaluation plots (matplotlib, Agg backend: files only, no display needed).

- plot_prompt: one prompt, target p(s) vs each model's exact m(s)/M over the support (and the
  histogram of valid samples when the prompt was sampled). Continuous supports with many bins are
  grouped into at most `max_groups` groups of equal numbers of consecutive bins, so curves stay
  readable; the grouped probability is the sum over the group (target, model and samples are
  grouped alike; a partial last group is scaled to a full group's width).
- plot_overview: exact KL per family, one bar per model (base vs fine-tuned), log scale.
"""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from calft.fileio import write_atomic  # noqa: E402

MAX_GROUPS = 120  # grouped bins per prompt plot: ~1 per 5 px at the default width
LOG_SCALE_RATIO = 30.0  # overview bars switch to a log axis when values span more than this



def _save(fig, path, rect=None) -> Path:
    """Lay out (within `rect` of the figure, if given), write `fig` to `path` (parents created), free it."""
    fig.tight_layout(rect=rect)
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())  # never a half-written figure, never through a link
    return path

def group_bins(x: np.ndarray, probs_list, max_groups: int = MAX_GROUPS):
    """Merge consecutive bins into <= max_groups groups: (group centers, [grouped probs...])."""
    n = x.size
    if n <= max_groups:
        return x, [np.asarray(p, dtype=np.float64) for p in probs_list]
    size = -(-n // max_groups)  # equal group sizes (unequal ones would draw a comb)
    starts = np.arange(0, n, size)
    centers = np.add.reduceat(x, starts) / np.diff(np.r_[starts, n])
    grouped = [np.add.reduceat(np.asarray(p, dtype=np.float64), starts) for p in probs_list]
    if n % size:  # the last, partial group: scale to a full group's width
        grouped = [np.r_[g[:-1], g[-1] * size / (n % size)] for g in grouped]
    return centers, grouped


def sample_histogram(x: np.ndarray, samples) -> np.ndarray:
    """Fraction of the valid samples nearest each support value (bins split at midpoints)."""
    s = np.asarray(samples, dtype=np.float64)
    if s.size == 0:
        return np.zeros_like(x)
    mids = (x[1:] + x[:-1]) / 2
    counts = np.bincount(np.searchsorted(mids, s), minlength=x.size)[: x.size]
    return counts / s.size


def plot_prompt(path, values, target, model_probs: dict, *, title: str = "", integer: bool = False,
                samples: dict | None = None, support_mass: dict | None = None,
                max_groups: int = MAX_GROUPS) -> Path:
    """Save the target vs model plot of one prompt; returns the path.

    values: support strings; target: p over them; model_probs: {label: m(s)/M} (renormalized);
    samples: {label: valid sampled values} (optional); support_mass: {label: M} for the legend.
    """
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    order = np.argsort(x, kind="stable")
    x = x[order]
    labels = list(model_probs)
    series = [np.asarray(target)[order]] + [np.asarray(model_probs[k])[order] for k in labels]
    sampled = [k for k in (samples or {}) if samples[k] is not None]
    series += [sample_histogram(x, samples[k]) for k in sampled]
    xs, grouped = group_bins(x, series, 10**9 if integer else max_groups)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    if integer:
        ax.bar(xs, grouped[0], width=0.8, color="0.8", label="target", zorder=1)
    else:
        ax.fill_between(xs, grouped[0], step="mid", color="0.8", label="target", zorder=1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, k in enumerate(labels):
        ax.plot(xs, grouped[1 + i], drawstyle="steps-mid", color=colors[i % len(colors)], lw=1.4,
                label=f"{k}: exact m(s)/M" + (f" (M={support_mass[k]:.2g})" if k in (support_mass or {}) else ""),
                zorder=3)
    for i, k in enumerate(sampled):
        h = grouped[1 + len(labels) + i]
        nz = h > 0  # only bins that received samples
        ax.plot(xs[nz], h[nz], ls="none", marker=".", ms=4,
                color=colors[labels.index(k) % len(colors)] if k in labels else "k",
                label=f"{k}: samples (n={len(samples[k])})", zorder=4)
    # Scale to the exact curves: a histogram of few valid samples would otherwise set the axis.
    top = max(float(np.max(g)) for g in grouped[: 1 + len(labels)])
    if sampled and top > 0:
        ax.set_ylim(0, 1.15 * top)
    ax.set_xlabel("value")
    ax.set_ylabel("probability" + ("" if integer or x.size <= max_groups else " (grouped bins)"))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    return _save(fig, path)


def plot_overview(path, per_family: dict, *, metric: str = "seq_kl_renorm", title: str = "") -> Path:
    """Grouped bars of `metric` per family, one bar per model.

    per_family: {model label: {family_id: {metric: value}}} (summarize(...)["per_family"]).
    """
    labels = list(per_family)
    if not labels:
        raise ValueError("plot_overview needs at least one model")
    families = sorted({f for pf in per_family.values() for f in pf})
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(families) + 2), 3.8), dpi=110)
    idx = np.arange(len(families))
    for i, k in enumerate(labels):
        vals = [per_family[k].get(f, {}).get(metric, np.nan) for f in families]
        ax.bar(idx + (i - (len(labels) - 1) / 2) * width, vals, width, label=k)
    ax.set_xticks(idx, families, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(metric + " (nats)")
    vals = np.array([d.get(metric, np.nan) for pf in per_family.values() for d in pf.values()], dtype=float)
    vals = vals[np.isfinite(vals)]
    if vals.size and vals.min() > 0 and vals.max() / vals.min() > LOG_SCALE_RATIO:
        ax.set_yscale("log")  # base vs fine-tuned KLs often differ by orders of magnitude
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_title(title or f"exact {metric} per family", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    return _save(fig, path)


def plot_tracking(path, rows_by_model: dict, *, title: str = "") -> Path:
    """One panel per family: model vs target mean (circles) and sd (triangles), one colour per
    model, with the identity line; points on it = the model follows the prompt's parameters.

    rows_by_model: {model label: per-prompt rows holding calft.tracking's exact_tracking keys}.
    """
    labels = list(rows_by_model)
    if not labels:
        raise ValueError("plot_tracking needs at least one model")
    families = list(dict.fromkeys(r["family_id"] for rows in rows_by_model.values() for r in rows))
    cols = min(6, len(families))
    nrows = -(-len(families) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.2 * cols, 2.1 * nrows + 0.4), dpi=100, squeeze=False)
    for ax, fam in zip(axes.flat, families):
        lo, hi = np.inf, -np.inf
        for i, label in enumerate(labels):
            rows = [r for r in rows_by_model[label] if r["family_id"] == fam and "model_mean" in r]
            for key, marker in (("mean", "o"), ("sd", "^")):
                t = np.array([r[f"target_{key}"] for r in rows], dtype=float)
                m = np.array([r[f"model_{key}"] for r in rows], dtype=float)
                ax.scatter(t, m, s=14, marker=marker, color=f"C{i}", alpha=0.8,
                           label=f"{label} {key}" if fam == families[0] else None)
                both = np.concatenate([t, m])
                both = both[np.isfinite(both)]
                if both.size:
                    lo, hi = min(lo, both.min()), max(hi, both.max())
        if np.isfinite(lo):
            pad = 0.05 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=0.8, zorder=0)
        ax.set_title(fam, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    fig.legend(loc="lower center", ncol=2 * len(labels), fontsize=7, frameon=False)
    fig.suptitle(title or "model vs target mean (o) and sd (^)", fontsize=9)
    return _save(fig, path, rect=(0, 0.04, 1, 0.97))
