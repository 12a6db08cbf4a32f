"""report.md and figures of the paper suite (calft.paper_suite): one table per benchmark, a summary.

Every table has one row per model row (base, SSoT, adapters). Column headers carry the better
direction: (up) higher is better, (down) lower is better. In the summary the best value of each
column is in bold. "not run" marks a cell the suite does not measure for that row (SSoT outside
structured sampling and open generation); "n/a" a number that is not defined (e.g. no valid sample).
"""
from __future__ import annotations

import math
from pathlib import Path

UP, DOWN = "\u2191", "\u2193"

# (column title, benchmark, path inside the benchmark's result, better direction)
HEADLINES = (
    ("unseen params: valid rate", "structured", ("test_selected", "valid_rate"), UP),
    ("unseen params: W1 / sd", "structured", ("test_selected", "w1_over_sd"), DOWN),
    ("held-out families: valid rate", "structured", ("ood_selected", "valid_rate"), UP),
    ("held-out families: W1 / sd", "structured", ("ood_selected", "w1_over_sd"), DOWN),
    ("open generation: distinct / prompt", "open_generation", ("distinct",), UP),
    ("MCQ: TV from uniform", "mcq", ("tv_uniform",), DOWN),
    ("NoveltyBench: distinct", "noveltybench", ("distinct",), UP),
    ("retention: arithmetic (flexible)", "retention", ("arith_flexible",), UP),
)

STRUCTURED_COLUMNS = (("valid_rate", UP), ("support_violation_rate", DOWN), ("mean_error", DOWN),
                      ("variance_error_ddof0", DOWN), ("wasserstein_1", DOWN), ("w1_over_sd", DOWN),
                      ("ks_stat", DOWN), ("anderson_known", DOWN), ("anderson_fitted", DOWN), ("chi2_pvalue", UP))
MCQ_COLUMNS = (("parse_rate", UP), ("valid_correct_answer_rate", UP), ("unique_options_rate", UP),
               ("freq_A", None), ("freq_B", None), ("freq_C", None), ("freq_D", None), ("chi2_pvalue", UP),
               ("tv_uniform", DOWN), ("max_abs_deviation", DOWN))


def fmt(x) -> str:
    """4 significant digits; "n/a" for None/NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, str):
        return x
    x = float(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.3g}"
    return f"{x:.4g}"


def _get(d, path):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def _titled(name: str, direction) -> str:
    return f"{name} {direction}" if direction else name


def summary_table(summary: dict) -> list[str]:
    results = summary["results"]
    cols = [h for h in HEADLINES if h[1] in summary["benchmarks"]]
    values = {label: [(_get(res.get(bench), path) if bench in res else "not run") for _, bench, path, _ in cols]
              for label, res in results.items()}
    best = []
    for j, (_, _, _, direction) in enumerate(cols):
        nums = [v[j] for v in values.values() if isinstance(v[j], (int, float)) and not math.isnan(v[j])]
        # no bold when every row ties (nothing to single out)
        best.append((max(nums) if direction == UP else min(nums)) if nums and min(nums) != max(nums) else None)
    rows = []
    for label, vals in values.items():
        cells = [f"**{fmt(v)}**" if best[j] is not None and v == best[j] and len(values) > 1 else fmt(v)
                 for j, v in enumerate(vals)]
        rows.append([label] + cells)
    return _table(["model"] + [_titled(title, d) for title, _, _, d in cols], rows)


def structured_tables(summary: dict) -> list[str]:
    lines = []
    for split, what in (("test_selected", "unseen parameters of the training families"),
                        ("ood_selected", "held-out families")):
        present = {lab: r["structured"][split] for lab, r in summary["results"].items() if "structured" in r}
        if not present:
            continue
        first = next(iter(present.values()))
        lines += [f"### Structured sampling: {split} ({what}; {first['num_prompts']} prompts, "
                  f"{first['num_families']} families)", ""]
        cols = list(STRUCTURED_COLUMNS) + ([("answer_tag_rate", UP)] if any("answer_tag_rate" in v for v in present.values()) else [])
        lines += _table(["model"] + [_titled(c, d) for c, d in cols],
                        [[lab] + [fmt(v.get(c, "not run" if c == "answer_tag_rate" else None)) for c, _ in cols]
                         for lab, v in present.items()])
    return lines


def open_generation_table(summary: dict) -> list[str]:
    present = {lab: r["open_generation"] for lab, r in summary["results"].items() if "open_generation" in r}
    if not present:
        return []
    first = next(iter(present.values()))
    lines = [f"### Open random generation ({first['num_prompts']} prompts x {first['samples_per_prompt']} samples)", ""]
    cols = ["distinct " + UP, "distinct / samples " + UP] + [f"support at top-p {t} {UP}" for t in ("0.5", "0.9", "0.99")]
    rows = [[lab, fmt(v["distinct"]), fmt(v["distinct_fraction"])]
            + [fmt(v["support"][t]) if "support" in v else "not run" for t in ("0.5", "0.9", "0.99")]
            for lab, v in present.items()]
    return lines + _table(["model"] + cols, rows)


def mcq_table(summary: dict) -> list[str]:
    present = {lab: r["mcq"] for lab, r in summary["results"].items() if "mcq" in r}
    if not present:
        return []
    n = next(iter(present.values()))["num_questions"]
    return [f"### MCQ answer-position balance ({n} generated questions, strict parser)", ""] + _table(
        ["model"] + [_titled(c, d) for c, d in MCQ_COLUMNS],
        [[lab] + [fmt(v.get(c)) for c, _ in MCQ_COLUMNS] for lab, v in present.items()])


def novelty_table(summary: dict) -> list[str]:
    present = {lab: r["noveltybench"] for lab, r in summary["results"].items() if "noveltybench" in r}
    if not present:
        return []
    first = next(iter(present.values()))
    cats = sorted({c for v in present.values() for c in v["distinct_per_category"]})
    lines = [f"### NoveltyBench ({first['num_prompts']} curated prompts x {first['generations']} generations, "
             f"at most {first['max_new_tokens']} tokens)", "",
             "`distinct` = equivalence classes among a prompt's generations (model-free partition: short-answer "
             "word rule, else ROUGE-1 F > 0.458; calft/novelty.py). Utility is not computed: it needs "
             "NoveltyBench's 27B reward model, which is not available offline.", ""]
    return lines + _table(["model", "distinct " + UP] + [f"{c} {UP}" for c in cats] + ["utility"],
                          [[lab, fmt(v["distinct"])] + [fmt(v["distinct_per_category"].get(c)) for c in cats]
                           + ["not computed (needs a reward model)"] for lab, v in present.items()])


def retention_table(summary: dict) -> list[str]:
    from calft.retention import TASKS

    present = {lab: r["retention"] for lab, r in summary["results"].items() if "retention" in r}
    if not present:
        return []
    tasks = [t for t in next(iter(present.values())) if t in TASKS]
    lines = ["### Retention (reasoning-gym items, greedy; strict = the number after ####, flexible = the last "
             "number)", "", "Tasks: " + "; ".join(f"`{t}`: {TASKS[t].description}, "
                                                  f"{next(iter(present.values()))[t]['num_items']} items" for t in tasks), ""]
    head = ["model"] + [f"{t} {k} {UP}" for t in tasks for k in ("flexible", "strict")]
    rows = [[lab] + [fmt(v[t][k]) for t in tasks for k in ("flexible", "strict")] for lab, v in present.items()]
    return lines + _table(head, rows)


def timing_table(summary: dict) -> list[str]:
    secs = summary["seconds"]
    return ["### Time", "", f"Total: {secs['total'] / 60:.1f} min ({summary['threads']} torch threads).", ""] + _table(
        ["model / benchmark", "seconds"], [[k, f"{v:.0f}"] for k, v in secs.items() if k != "total"])


def plot_summary(path: Path, summary: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [h for h in HEADLINES if h[1] in summary["benchmarks"]]
    labels = list(summary["results"])
    fig, axes = plt.subplots(1, len(cols), figsize=(2.6 * len(cols), 3.2), squeeze=False)
    for ax, (title, bench, p, direction) in zip(axes[0], cols):
        vals = [_get(summary["results"][lab].get(bench), p) for lab in labels]
        vals = [v if isinstance(v, (int, float)) and v is not None and not math.isnan(v) else 0.0 for v in vals]
        ax.bar(range(len(labels)), vals, color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{title} {direction}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_open_support(path: Path, summary: dict) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = {lab: r["open_generation"]["support"] for lab, r in summary["results"].items()
               if "open_generation" in r and "support" in r["open_generation"]}
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for lab, sup in present.items():
        ts = sorted(sup, key=float)
        ax.plot([float(t) for t in ts], [sup[t] for t in ts], marker="o", ms=3, label=lab)
    ax.set_yscale("log")
    ax.set_xlabel("top-p threshold")
    ax.set_ylabel("first-token support size (mean over prompts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: Path, summary: dict) -> str:
    """Write out_dir/report.md (+ plots/) and return its text."""
    size = summary["size_settings"]
    lines = ["# calft paper suite", "",
             f"Model `{summary['model']}`, size `{summary['size']}` (seeds {', '.join(map(str, size['seeds']))}); rows: "
             + ", ".join(f"`{lab}`" + (f" ({p})" if p else "") for lab, p in summary["rows"].items()) + ".", "",
             "`ssot` = the base model with the String Seed of Thought system prompt (calft/ssot.py), run on "
             "structured sampling and open generation as in the paper's artifact. Structured metrics are the "
             "artifact's (calft/artifact_metrics.py): on the valid parsed samples of each prompt, averaged over "
             "seeds, then over prompts within a family, then over families (equal weight); variance error uses "
             "ddof=0; W1 / sd = W1 against the target quantiles at (i+0.5)/n divided by the target's sd; "
             "Anderson-Darling for gaussian, exponential, logistic and weibull (known = against the prompt's own "
             "law, fitted = scipy's, parameters estimated from the sample as in the artifact). Read W1, KS and AD "
             "together with the valid rate: they describe only the valid samples.", "",
             "## Summary", ""] + summary_table(summary)
    plots = out_dir / "plots"
    lines += [f"![headline metrics]({plot_summary(plots / 'summary.png', summary).relative_to(out_dir)})", ""]
    lines += ["## Benchmarks", ""] + structured_tables(summary) + open_generation_table(summary)
    support_plot = plot_open_support(plots / "open_generation_support.png", summary)
    if support_plot is not None:
        lines += [f"![first-token support size at 21 top-p thresholds]({support_plot.relative_to(out_dir)})", ""]
    lines += mcq_table(summary) + novelty_table(summary) + retention_table(summary) + timing_table(summary)
    text = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(text)
    return text
