"""Does the model follow the parameters, as a function of training time? One training run with
adapter snapshots, each snapshot scored like the end of `python -m calft.train`.

    python -m benchmarks.calibration_curve                       # train 960 steps (~30 min, 2 cores), then score
    python -m benchmarks.calibration_curve --run-dir runs/curve  # score the snapshots of a finished run again
    python -m benchmarks.calibration_curve -- --lora-r 64        # flags after -- go to calft.train
    python -m benchmarks.calibration_curve --plot-only --reference quick=runs/quick --reference long=runs/long

Training: the quick recipe on all 1988 training prompts (--max-prompts-per-family -1), with the
cosine schedule spanning --max-steps, and `--snapshot-steps` saving the adapter along the way. A
snapshot before the last step is mid-schedule (its learning rate has not decayed), so it is a
pessimistic stand-in for a run annealed at that length, except the last one, which is the run
annealed at --max-steps; the default job (`python -m calft.train`, 240 steps on 32 prompts per
family, annealed) is a separate point (--reference).

Scoring (calft.eval, the same prompts for every model): test_within_range (unseen parameters
inside the training ranges), --prompts-per-family spread over the parameter grid, 1 decimal,
1001 bins; the exact metrics and tracking for the base model (the baseline, step 0) and every
snapshot, plus --samples answers per prompt for the snapshots (the base answers in prose).
Training minutes per snapshot come from the run's metrics.jsonl (elapsed_s: training only, no
model loading or data preparation). Output: a table (stdout), the JSON in
benchmarks/results/calibration_curve.json, and the figure in --plot.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as calft.eval: shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.common import format_table, machine_info  # noqa: E402
from calft.cli import comma_list  # noqa: E402
from calft.tracking import FAMILY_SLOPE_TARGET, TARGETS, measured, missed_targets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STEPS = "96,160,320,480,640,960"
# (key, where it lives: "tracking" (calft.tracking) or "exact" (calft.scoring.summarize), header)
CURVE_METRICS = [("sample_location_r2", "tracking", "loc R2 (samples)"),
                 ("sample_clipped_location_r2", "tracking", "loc R2 (clipped samples)"),
                 ("beyond_range_rate", "tracking", "beyond range"),
                 ("sample_location_slope", "tracking", "slope (samples)"),
                 ("sample_sd_within_2x", "tracking", "sd 2x (samples)"), ("median_sample_ks", "tracking", "KS (samples)"),
                 ("median_perfect_ks", "tracking", "KS perfect sampler"), ("in_support_rate", "tracking", "in support"),
                 ("location_r2", "tracking", "loc R2 (exact)"), ("location_slope", "tracking", "slope (exact)"),
                 ("sd_within_2x", "tracking", "sd 2x (exact)"), ("median_ks", "tracking", "KS (exact)"),
                 ("support_mass", "exact", "support mass"), ("seq_kl_renorm", "exact", "seq_kl_renorm")]


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.calibration_curve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Flags after -- are passed to python -m calft.train.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model (calft.train --model)")
    p.add_argument("--families", default="", help="comma-separated families to train and score; '' = all")
    p.add_argument("--run-dir", default="runs/curve", help="training run (trained here unless it holds a "
                   "finished run with snapshots)")
    p.add_argument("--max-steps", type=int, default=960, help="steps of the training run (cosine over all)")
    p.add_argument("--snapshot-steps", default=DEFAULT_STEPS, help="steps whose adapters are scored")
    p.add_argument("--prompts-per-family", type=int, default=3, help="test_within_range prompts per family")
    p.add_argument("--samples", type=int, default=100, help="answers sampled per prompt (snapshots only)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for scoring (0 = default)")
    p.add_argument("--reference", action="append", default=[], metavar="LABEL=RUN_DIR",
                   help="a finished `python -m calft.train` run (annealed, evaluated on test_within_range at "
                        "the same settings) drawn as its own point, from its eval.json and summary.json, or the "
                        "--output-dir of `python -m calft.eval --no-base --adapter RUN` on test_within_range at "
                        "the same settings (a run trained with --no-eval); repeatable")
    p.add_argument("--plot-only", action="store_true", help="redraw --plot from the rows in --output (plus any "
                   "--reference) without training or scoring")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "calibration_curve.json"),
                   help="JSON result")
    p.add_argument("--plot", default=str(ROOT / "docs" / "calibration_curve.png"), help="figure (PNG)")
    args = p.parse_args(argv)
    try:
        args.steps = sorted({int(s) for s in comma_list(args.snapshot_steps)})
    except ValueError:
        p.error(f"--snapshot-steps must be comma-separated step numbers, got {args.snapshot_steps!r}")
    if not args.steps or args.steps[0] < 1 or args.steps[-1] > args.max_steps:
        p.error(f"--snapshot-steps must lie in [1, --max-steps={args.max_steps}]")
    args.reference_rows = []  # read now, so a bad --reference fails before the long run
    for ref in args.reference:
        label, sep, run_dir = ref.partition("=")
        row = reference_row(label, Path(run_dir)) if sep and label else None
        if row is None:
            p.error(f"--reference {ref!r}: expected LABEL=RUN_DIR of a calft.train run with eval.json, or "
                    "LABEL=DIR of a calft.eval output with one adapter")
        args.reference_rows.append(row)
    args.run_dir = str(Path(args.run_dir).resolve())  # calft.train runs from the repository root
    args.train_extra = train_extra
    return args


def train(args) -> None:
    cmd = [sys.executable, "-m", "calft.train", "--model", args.model, "--families", args.families,
           "--output-dir", args.run_dir, "--max-prompts-per-family", "-1",
           "--max-steps", str(args.max_steps), "--snapshot-steps", ",".join(map(str, args.steps)),
           "--no-eval", "--resume", *args.train_extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)  # --resume: an interrupted run continues


def score(args, snapshots: dict[int, Path]) -> dict:
    """calft.eval twice on the same prompts: the base model (exact), then every snapshot (all)."""
    from calft import eval as calft_eval

    common = ["--model", args.model, *(["--families", args.families] if args.families else []),
              "--eval-split", "test_within_range", "--eval-prompts-per-family", str(args.prompts_per_family),
              "--eval-decimals", "1", "--eval-bins", "1001", "--threads", str(args.threads), "--no-plots", "--no-progress"]
    out = Path(args.run_dir) / "curve_eval"
    base = calft_eval.main([*common, "--metrics", "exact", "--output-dir", str(out / "base")])
    adapters = [a for step in sorted(snapshots) for a in ("--adapter", str(snapshots[step]))]
    tuned = calft_eval.main([*common, *adapters, "--no-base", "--metrics", "all", "--eval-samples",
                             str(args.samples), "--output-dir", str(out / "snapshots")])
    return {"base": base, "snapshots": tuned}


def curve_rows(args, snapshots: dict[int, Path], scored: dict) -> list[dict]:
    split = "test_within_range"
    elapsed = {}
    for line in (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        elapsed[m["step"]] = m["elapsed_s"]
    base = scored["base"]
    base_label = next(iter(base["splits"][split]))
    base_exact = base["splits"][split][base_label]
    rows = [{"model": "base", "step": 0, "minutes": 0.0, **row_metrics(base["tracking"][split][base_label], base_exact)}]
    labels = {str(path): lab for lab, path in scored["snapshots"]["models"].items()}  # adapter dir -> label
    for step in sorted(snapshots):
        label = labels[str(snapshots[step])]
        rows.append(tuned_row(f"step {step}", step, elapsed[step] / 60, scored["snapshots"]["tracking"][split][label],
                              scored["snapshots"]["splits"][split][label]))
    return rows


def tuned_row(model: str, step: int, minutes: float, tracking: dict, exact: dict) -> dict:
    """One fine-tuned model's row: the curve metrics and the calibration targets it missed."""
    missed = missed_targets(tracking)  # test_within_range: the base model is not sampled (it answers in prose)
    slopes = {f: measured(m, "sample_location_slope")  # not measured: NaN (calft.eval's JSON has null)
              for f, m in tracking.get("per_family", {}).items()}
    slow = sorted(f for f, v in slopes.items() if v < FAMILY_SLOPE_TARGET)  # NaN is not below
    return {"model": model, "step": step, "minutes": minutes, **row_metrics(tracking, exact),
            "families_below_slope": len(slow), "family_slopes": slopes, "missed": missed, "targets_missed": len(missed)}


def _eval_output(path: Path) -> tuple[dict, dict, Path] | None:
    """(tracking, exact, adapter run dir) from calft.eval's summary.json in `path` when it scored one
    adapter (a calft.train run) on test_within_range, else None."""
    split = "test_within_range"
    try:
        ev = json.loads((path / "summary.json").read_text())
        tuned = [lab for lab in ev["models"] if lab != "base"]
        if len(tuned) != 1 or not (Path(ev["models"][tuned[0]]) / "summary.json").is_file():
            return None
        return ev["tracking"][split][tuned[0]], ev["splits"][split][tuned[0]], Path(ev["models"][tuned[0]])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reference_row(label: str, run_dir: Path) -> dict | None:
    """A finished calft.train run as a curve row: its end-of-training evaluation (eval.json), or a
    calft.eval output that scored its adapter; training minutes from the run's summary.json. None
    when `run_dir` is neither."""
    try:
        if (run_dir / "eval.json").is_file():
            ev = json.loads((run_dir / "eval.json").read_text())["splits"]["test_within_range"]
            tracking, exact, train_dir = ev["finetuned_tracking"], ev["finetuned"], run_dir
        elif (scored := _eval_output(run_dir)) is not None:
            tracking, exact, train_dir = scored
        else:
            return None
        summary = json.loads((train_dir / "summary.json").read_text())
        minutes = summary["train_time_s"] / 60
        return {**tuned_row(label, summary["steps"], minutes, tracking, exact), "reference": str(run_dir)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def row_metrics(tracking: dict, exact: dict) -> dict:
    return {k: (tracking if where == "tracking" else exact).get(k) for k, where, _ in CURVE_METRICS}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("sample_location_r2", "location R$^2$ (samples)", ">=", 0.9),
              ("sample_sd_within_2x", "sd within 2x (samples)", ">=", 0.75),
              ("median_sample_ks", "median KS (samples)", "<=", 0.2), ("in_support_rate", "samples in support", ">=", 0.95),
              ("families_below_slope", f"families with sampled slope < {FAMILY_SLOPE_TARGET}", "<=", 0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    curve = [r for r in rows if "reference" not in r]
    for ax, (key, title, _, bound) in zip(axes, panels):
        pts = [(r["minutes"], r[key]) for r in curve if r.get(key) is not None and r[key] == r[key]]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color="C0", label="snapshots of one run")
        if key == "median_sample_ks":
            pts = [(r["minutes"], r["median_perfect_ks"]) for r in curve if r.get("median_perfect_ks") is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], "s--", color="C1", label="a perfect sampler")
        for i, r in enumerate(r for r in rows if "reference" in r):
            if r.get(key) is not None and r[key] == r[key]:
                ax.plot([r["minutes"]], [r[key]], "*", ms=13, color=f"C{i + 2}", label=f"{r['model']} (annealed)")
        ax.axhline(bound, color="k", ls=":", lw=1, label="target")
        ax.set_title(title)
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        result = json.loads(Path(args.output).read_text())
        result["rows"] = [r for r in result["rows"] if "reference" not in r]
        result["rows"] += args.reference_rows
        Path(args.output).write_text(json.dumps(result, indent=1, default=float))
        plot(result["rows"], args.plot)
        print(f"wrote {args.output} and {args.plot}")
        return result
    run = Path(args.run_dir)
    if not (run / "summary.json").is_file():
        train(args)
    snapshots = {s: run / "snapshots" / f"step_{s}" for s in args.steps}
    missing = [str(p) for p in snapshots.values() if not (p / "adapter_config.json").is_file()]
    if missing:
        raise SystemExit(f"calft.calibration_curve: error: no adapter snapshot in {', '.join(missing)} "
                         "(was the run trained with these --snapshot-steps?)")
    scored = score(args, snapshots)
    rows = curve_rows(args, snapshots, scored) + args.reference_rows
    columns = [("model", "model", ""), ("minutes", "train min", ".1f")]
    columns += [(k, h, ".3f") for k, _, h in CURVE_METRICS]
    columns += [("families_below_slope", f"families slope < {FAMILY_SLOPE_TARGET}", ""), ("targets_missed", "targets missed", "")]
    print(format_table(rows, columns))
    result = {"benchmark": "calibration_curve", "machine": machine_info("cpu"),
              "run_dir": str(run), "train_config": json.loads((run / "config.json").read_text()),
              "train_summary": json.loads((run / "summary.json").read_text()),
              "targets": {k: list(v) for k, v in TARGETS.items()}, "rows": rows,
              "seconds": {**scored["base"]["seconds"], **scored["snapshots"]["seconds"]}}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1, default=float))
    plot(rows, args.plot)
    print(f"\nwrote {args.output} and {args.plot}")
    return result


if __name__ == "__main__":
    main()
