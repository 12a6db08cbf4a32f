"""What a perfect sampler scores on the calibration targets: the noise floor of each sampled metric.

    python -m benchmarks.perfect_sampler                           # 12 prompts per family, 100 samples, 300 repeats
    python -m benchmarks.perfect_sampler --prompts-per-family 3    # the default run's own evaluation
    python -m benchmarks.perfect_sampler --samples 400 --families f_distribution,cauchy

A perfect sampler draws every answer from the discretized target itself (calft.support, as the
model is scored: test_within_range, 1 decimal, 1001 bins). Each repeat draws --samples answers per
prompt, scores them with the code that scores a model (calft.tracking.sample_tracking and
summarize_tracking), and keeps the pooled metrics and every family's sampled location slope. Over
--repeats repeats: mean, sd, 5th percentile, and how often a perfect sampler misses each target
(calft.tracking.TARGETS, FAMILY_SLOPE_TARGET). A family whose slope a perfect sampler misses often
has a target that 100 samples per prompt cannot check: its means move little against its sds over
the grid (F: the mean d2/(d2-2) varies by ~0.4 sd), so the sample means' noise dominates the slope.
Output: a table (stdout) and benchmarks/results/perfect_sampler.json. Pure numpy: seconds.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from calft.cli import comma_list
from calft.splits import get_split
from calft.support import build_support
from calft.tracking import FAMILY_SLOPE_TARGET, TARGETS, sample_tracking, summarize_tracking

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.perfect_sampler", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompts-per-family", type=int, default=12, help="test_within_range prompts per family")
    p.add_argument("--samples", type=int, default=100, help="answers drawn per prompt")
    p.add_argument("--repeats", type=int, default=300, help="independent repeats of the whole evaluation")
    p.add_argument("--families", default="", help="comma-separated families; '' = every training family")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "perfect_sampler.json"))
    args = p.parse_args(argv)
    for name in ("prompts_per_family", "samples", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _spread(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:  # a family whose targets do not move (Student's t: every mean is 0) has no slope
        return {"mean": None, "sd": None, "p05": None, "p95": None}
    return {"mean": float(a.mean()), "sd": float(a.std()), "p05": float(np.percentile(a, 5)),
            "p95": float(np.percentile(a, 95))}


def run(args) -> dict:
    specs = get_split("test_within_range", families=comma_list(args.families) or None,
                      max_specs=args.prompts_per_family)
    supports = [(s.family_id, build_support(s.family_id, dict(s.params), num_decimals=1, max_bins=1001)) for s in specs]
    rng = np.random.default_rng(args.seed)
    pooled = {k: [] for k in TARGETS}
    slopes: dict[str, list[float]] = {f: [] for f, _ in supports}
    clt_sd: dict[str, float] = {}  # calft.tracking's closed form (the same in every repeat: n is fixed)
    for _ in range(args.repeats):
        rows = []
        for family, sup in supports:
            x = np.asarray([float(v) for v in sup.values])
            draws = rng.choice(x, size=args.samples, p=sup.probs / sup.probs.sum())
            rows.append({"family_id": family, "num_samples": args.samples, "num_valid": args.samples,
                         "support_violation_rate": 0.0,
                         **sample_tracking(sup, draws, seed=args.seed, num_answers=args.samples)})
        summary = summarize_tracking(rows)
        for k in pooled:
            pooled[k].append(summary[k])
        for f, m in summary["per_family"].items():
            slopes[f].append(m["sample_location_slope"])
            clt_sd[f] = m["perfect_slope_sd"]

    def miss_rate(values, op, bound):
        a = np.asarray(values, dtype=np.float64)
        a = a[np.isfinite(a)]
        return None if a.size == 0 else float(np.mean(a < bound if op == ">=" else a > bound))

    prompts = {f: sum(g == f for g, _ in supports) for f in slopes}
    return {"settings": {k: v for k, v in vars(args).items() if k != "output"},
            "pooled": {k: {**_spread(v), "target": f"{TARGETS[k][0]} {TARGETS[k][1]}",
                           "miss_rate": miss_rate(v, *TARGETS[k])} for k, v in pooled.items()},
            "family_slope": {f: {"num_prompts": prompts[f], **_spread(v), "perfect_slope_sd": clt_sd[f],
                                 "miss_rate": miss_rate(v, ">=", FAMILY_SLOPE_TARGET)} for f, v in slopes.items()}}


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(f"perfect sampler: test_within_range, {args.prompts_per_family} prompts per family, {args.samples} samples "
          f"per prompt, {args.repeats} repeats\n")
    print("| pooled metric | target | mean | sd | p05 | p95 | perfect sampler misses |\n|---|---|---|---|---|---|---|")
    for k, r in result["pooled"].items():
        print(f"| {k} | {r['target']} | {_fmt(r['mean'])} | {_fmt(r['sd'])} | {_fmt(r['p05'])} | {_fmt(r['p95'])} "
              f"| {_fmt(r['miss_rate'])} |")
    print(f"\n| family | prompts | slope mean | sd | sd by the CLT (perfect_slope_sd) | p05 | perfect sampler below "
          f"{FAMILY_SLOPE_TARGET} |\n|---|---|---|---|---|---|---|")
    for f, r in result["family_slope"].items():
        print(f"| {f} | {r['num_prompts']} | {_fmt(r['mean'])} | {_fmt(r['sd'])} | {_fmt(r['perfect_slope_sd'])} "
              f"| {_fmt(r['p05'])} | {_fmt(r['miss_rate'])} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
