"""Reports: the one number formatter for tables, the one markdown-table builder, the tables of
exact and tracking metrics, the block calft.train and calft.eval print per split, and the
report / CSV / JSON writers of calft.eval.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from calft.fileio import write_atomic
from calft.plots import plot_tracking
from calft.scoring import SUMMARY_METRICS
from calft.tracking import SUMMARY_KEYS, missed_targets, targets_verdict


def format_number(x) -> str:
    """Compact table cell: 4 significant digits, scientific below 1e-3."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    x = float(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.3g}"
    return f"{x:.4g}"


def markdown_table(header, rows) -> str:
    """A markdown table: `header` cells, then one line per row of cells (strings)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_comparison_table(summaries: dict[str, dict], metrics=None) -> str:
    """Markdown table: one row per model label, one column per metric (summaries from summarize)."""
    if not summaries:
        raise ValueError("no summaries to compare")
    if metrics is None:
        metrics = [m for m in SUMMARY_METRICS if any(m in s for s in summaries.values())]
    return markdown_table(["model", *metrics], [[label, *(format_number(s.get(m)) for m in metrics)]
                                                for label, s in summaries.items()])


def format_tracking_table(summaries: dict[str, dict], keys=SUMMARY_KEYS) -> str:
    """Markdown: one row per model label, one column per pooled tracking metric present."""
    keys = [k for k in keys if any(k in s for s in summaries.values())]
    return markdown_table(["model", *keys], [[label, *(format_number(s.get(k)) for k in keys)]
                                             for label, s in summaries.items()])


# the exact metrics calft.train prints per split (family means)
HEADLINE_METRICS = ("support_mass", "seq_kl", "seq_kl_renorm", "tv_renorm")
# the sampled columns per family (calft.tracking): what a user of the model gets
FAMILY_KEYS = ("num_prompts", "sample_location_slope", "perfect_location_slope", "perfect_slope_sd", "sample_location_r2",
               "sample_clipped_location_r2", "sample_sd_within_2x", "median_sample_ks", "median_perfect_ks",
               "in_support_rate", "support_violation_rate", "beyond_range_rate")


def format_family_table(tracking: dict, keys=FAMILY_KEYS) -> str:
    """Markdown: one row per family of one model's summarize_tracking, its sampled columns."""
    fams = tracking.get("per_family", {})
    keys = [k for k in keys if any(k in m for m in fams.values())]
    return markdown_table(["family", *keys], [[f, *(format_number(m.get(k)) for k in keys)] for f, m in fams.items()])


def sampled_base(tracking: dict) -> dict | None:
    """The base model's tracking on a split where it was sampled (what missed_targets compares with)."""
    base = tracking.get("base")
    return base if base is not None and "median_sample_ks_all" in base else None


def exact_worse_than_base(summaries: dict) -> list[str]:
    """Families whose exact seq_kl_renorm (renormalized on the support) is above the base model's,
    for each fine-tuned model: printed beside the targets, which are all measured from samples."""
    base = summaries.get("base", {}).get("per_family")
    if not base:
        return []
    tuned = {label: s for label, s in summaries.items() if label != "base"}
    return [f if len(tuned) == 1 else f"{label}: {f}" for label, s in tuned.items()
            for f, m in s.get("per_family", {}).items()
            if m.get("seq_kl_renorm", float("nan")) > base.get(f, {}).get("seq_kl_renorm", float("inf"))]


def format_split_summary(split: str, num_prompts: int, num_decimals: int, max_bins: int, summaries: dict,
                         tracking: dict, misses=None, num_samples: int = 0) -> str:
    """What calft.train prints after training for one split, and calft.eval for each split: the
    tracking table (sampled columns first), each sampled model's per-family table, the headline
    exact metrics (where measured), and the calibration targets missed."""
    text = (f"\n{split}: {num_prompts} prompts ({num_decimals} decimals, {max_bins} bins"
            + (f", {num_samples} samples per prompt" if num_samples else "") + ")\n"
            "does the model follow the parameters? (pooled over families; sample_* from the samples, "
            "the others exact on the renormalized support; see calft/tracking.py)\n"
            f"{format_tracking_table(tracking)}\n")
    for label, tr in tracking.items():
        if "median_sample_ks" in tr:
            text += (f"sampled, per family ({label}; perfect_*: a perfect sampler's slope and KS at this "
                     f"sample size):\n{format_family_table(tr)}\n")
    exact = {label: s for label, s in summaries.items() if "support_mass" in s}
    if exact:
        text += f"exact metrics (family means):\n{format_comparison_table(exact, metrics=list(HEADLINE_METRICS))}\n"
        worse = exact_worse_than_base(exact)
        if worse:  # information, not a target: the base model puts most of its mass off the support
            text += f"exact seq_kl_renorm (renormalized on the support) above the base model's: {', '.join(worse)}\n"
    return text + ("" if misses is None else targets_verdict(misses, split))


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = ["split", "model", "family_id", "params"]
    for r in rows:
        keys += [k for k in r if k not in keys]
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})
    write_atomic(path, f.getvalue())


def json_safe(x):
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def per_family_table(by_model: dict, metrics=("support_mass", "seq_kl_renorm", "tv_renorm", "valid_rate")) -> list[str]:
    """Markdown lines: one row per family, one column per (model, metric)."""
    labels = list(by_model)
    metrics = [m for m in metrics if m in by_model[labels[0]]]
    if not metrics:
        return []
    cols = [(lab, m) for m in metrics for lab in labels]
    rows = [[fam, *(format_number(by_model[lab]["per_family"].get(fam, {}).get(m)) for lab, m in cols)]
            for fam in by_model[labels[0]]["per_family"]]
    return ["Per family:", "", markdown_table(["family", *(f"{m} ({lab})" for lab, m in cols)], rows), ""]


def write_report(path: Path, args, summaries: dict, tracking: dict, benchmarks: dict, plots: dict,
                 timings: dict) -> None:
    lines = ["# calft evaluation report", "",
             f"Model: `{args.model}`; metrics: {args.metrics}; {args.eval_decimals} decimals, "
             f"{args.eval_bins} bins" + (f"; {args.eval_samples} samples per prompt" if args.metrics != "exact" else ""),
             "", "Per split: mean over prompts within each family, then over families (equal family weight).",
             "support_mass = M, the model's probability of answering a canonical support string; "
             "seq_kl = KL(target || model) over strings; *_renorm = with the model renormalized on the support.", ""]
    for split, by_model in summaries.items():
        first = next(iter(by_model.values()))
        lines += [f"## {split} ({first['num_prompts']} prompts, {first['num_families']} families)", "",
                  "Does the model follow the parameters? (calft/tracking.py: R^2 and slope of model vs "
                  "target mean in target-sd units, within families; scale R^2 on log sd; KS)", "",
                  format_tracking_table(tracking[split]), ""]
        base_tr = sampled_base(tracking[split])
        for label, tr in tracking[split].items():
            if "median_sample_ks" in tr:
                misses = missed_targets(tr, base_tr if label != "base" else None, split=split)
                lines += [f"Sampled, per family ({label}, {args.eval_samples} samples per prompt; perfect_*: "
                          "a perfect sampler's slope and KS at that sample size):", "", format_family_table(tr), "",
                          targets_verdict(misses, split), ""]
        if split in plots["tracking"]:
            lines += [f"![model vs target mean and sd per family]({plots['tracking'][split]})", ""]
        if any("support_mass" in m for m in by_model.values()):
            lines += ["Exact metrics (family means):", "", format_comparison_table(by_model), ""]
        lines += per_family_table(by_model)
        if split in plots["overview"]:
            lines += [f"![exact KL per family]({plots['overview'][split]})", ""]
    if benchmarks:
        rows = [[label, bench, k, format_number(v)] for label, res in benchmarks.items() for bench, r in res.items()
                for k, v in r.items() if isinstance(v, (int, float))]
        lines += ["## Other benchmarks", "", markdown_table(["model", "benchmark", "metric", "value"], rows), ""]
    lines += ["## Timing", "", markdown_table(["model", "split", "seconds"],
                                              [[m, s, f"{t:.1f}"] for (m, s), t in timings.items()])]
    write_atomic(path, "\n".join(lines) + "\n")


def write_training_eval(out_dir: Path, scored: dict, prompts: dict, num_decimals: int, max_bins: int, *,
                        num_samples: int = 0, record=lambda names: None) -> dict:
    """calft.train's outputs of evaluate_models over base and fine-tuned: print each split's block,
    write eval_table_<split>.md, tracking_<split>.png (where the base was scored) and eval.json
    (each name passed to `record` first: the run marker's list); returns {split: summaries and rows}."""
    results = {}
    for split, preps in prompts.items():
        if split not in scored["summaries"]:
            continue  # nothing measured on this split
        summaries, tracking = scored["summaries"][split], scored["tracking"][split]
        base_summary, tuned_summary = summaries.get("base"), summaries["fine-tuned"]
        base_rows, tuned_rows = scored["rows"].get((split, "base")), scored["rows"][split, "fine-tuned"]
        misses = missed_targets(tracking["fine-tuned"], sampled_base(tracking), split=split)
        text = format_split_summary(split, len(preps), num_decimals, max_bins, summaries, tracking, misses, num_samples)
        print(text, flush=True)
        if base_rows is not None:
            record([f"tracking_{split}.png"])
            plot_tracking(out_dir / f"tracking_{split}.png", {"base": base_rows, "fine-tuned": tuned_rows},
                          title=f"{split}: model vs target mean and sd")
        results[split] = {"base": base_summary, "finetuned": tuned_summary, "base_tracking": tracking.get("base"),
                          "finetuned_tracking": tracking["fine-tuned"], "base_rows": base_rows,
                          "finetuned_rows": tuned_rows, "missed": misses}
        record([f"eval_table_{split}.md"])
        write_atomic(out_dir / f"eval_table_{split}.md", text.lstrip("\n") + "\n", root=out_dir)
    record(["eval.json"])
    write_atomic(out_dir / "eval.json", json.dumps(
        {"num_decimals": num_decimals, "max_bins": max_bins, "splits": results}, indent=2, default=float), root=out_dir)
    return results
