"""Evaluate how faithfully a model (and fine-tuned adapters of it) samples requested distributions.

    python -m calft.eval                                        # base SmolLM2, test_selected, exact
    python -m calft.eval --adapter runs/soft/adapter --metrics all --num-samples 200
    python -m calft.eval --adapter runs/soft/adapter --adapter runs/hard/adapter \
        --split test_selected,ood_selected --benchmarks mcq,open_ended --output-dir eval_out

Metrics (SPEC.md section 8): "exact" scores every canonical support string under the model in one
pass over the answer trie (calft.evaluate); "sampling" runs the paper's protocol (calft.sampling).
Every model (the base, then base + each adapter) is evaluated on the same prepared prompts.
Outputs in --output-dir: summary.json, per_prompt.csv, report.md, plots/*.png.
"""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting collapse throughput 5-10x when the CPU cores are shared
# with other busy processes (measured: exact scoring of one 1001-string prompt on 2 shared cores,
# 5 s with PASSIVE vs 24-47 s with the default). Must be set before torch is imported; an explicit
# user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from calft.evaluate import SUMMARY_METRICS, evaluate_exact, format_comparison_table, format_number, summarize  # noqa: E402,E501
from calft.models import DEFAULT_MODEL, load_model, load_tokenizer, quiet_peft  # noqa: E402
from calft.prompts import set_reasoning_effort  # noqa: E402
from calft.splits import SPLITS, get_split  # noqa: E402
from calft.tracking import format_tracking_table, sample_tracking, summarize_tracking  # noqa: E402

METRIC_CHOICES = ("exact", "sampling", "all")
BENCHMARKS = ("mcq", "open_ended")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calft.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--model", default=DEFAULT_MODEL, help="base model: HF id, local dir, or the embedded alias")
    g.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="PEFT adapter dir trained on --model; repeat to compare several (the base is included "
                        "unless --no-base)")
    g.add_argument("--no-base", action="store_true", help="skip the base model when adapters are given")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model weights dtype (scores are summed in float64 either way)")
    g = p.add_argument_group("prompts and targets")
    g.add_argument("--split", default="test_selected",
                   help=f"one split or a comma-separated list, from: {', '.join(SPLITS)}")
    g.add_argument("--families", default=None, help="comma-separated family ids (default: all in the split)")
    g.add_argument("--max-prompts-per-family", type=int, default=None,
                   help="cap on prompts per family (evenly subsampled; default: the split's own cap)")
    g.add_argument("--num-decimals", type=int, default=2, help="decimals of continuous answers")
    g.add_argument("--max-bins", type=int, default=1001, help="support strings per prompt, at most")
    g.add_argument("--reasoning-effort", default="low", choices=("low", "medium", "high"),
                   help="what a chat template with a reasoning_effort variable (gpt-oss) renders; use the "
                        "value the adapter was trained with (calft.train's default and the paper's: low)")
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics", default="exact", choices=METRIC_CHOICES, help="exact trie scoring, sampling, or both")
    g.add_argument("--num-samples", type=int, default=1000, help="samples per prompt (sampling metrics)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="generation budget per sample, tokens")
    g.add_argument("--batch-size", type=int, default=64, help="samples generated together (sampling)")
    g.add_argument("--chunk-size", type=int, default=256, help="trie nodes per forward (exact scoring)")
    g.add_argument("--seed", type=int, default=0, help="base seed of sampling and of the Monte-Carlo logit KL")
    g.add_argument("--benchmarks", default="", help="comma-separated extra benchmarks: mcq, open_ended ('' = none)")
    g.add_argument("--mcq-questions", type=int, default=100, help="MCQs generated per model (paper: 1000)")
    g.add_argument("--open-ended-prompts", type=int, default=None, help="open-ended prompts used (default: all 102)")
    g.add_argument("--open-ended-samples", type=int, default=100, help="samples per open-ended prompt")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="eval_out", help="where summary.json, per_prompt.csv, report.md, plots/ go")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--cache-dir", default=None, help="prepared-prompt cache (default: calft.data's)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_device(name: str) -> str:
    """cpu, cuda, cuda:N or auto; ValueError for anything else or a GPU this machine lacks."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if not match:
        raise ValueError(f"--device {name!r}: use cpu, cuda, cuda:N or auto")
    if name != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}, but torch sees no CUDA GPU: use --device cpu or auto")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def model_labels(args) -> list[tuple[str, str | None]]:
    """(label, adapter dir or None) for every model to evaluate, base first."""
    out = [] if (args.no_base and args.adapter) else [("base", None)]
    names = [Path(a).name or str(a) for a in args.adapter]
    for a, name in zip(args.adapter, names):
        if not Path(a).is_dir():
            raise ValueError(f"--adapter {a!r} is not a directory (expected a saved PEFT adapter)")
        out.append((name if names.count(name) == 1 and name != "base" else str(a), a))
    return out


def check_args(args) -> None:
    """Everything that can be checked before any model runs (ValueError with a clear message)."""
    from calft.checkpoint import RUN_MARKER, is_run
    from calft.families import get_family

    from calft.fileio import format_bytes, machine_memory
    from calft.support import _MAX_DECIMALS, MAX_BINS

    if args.families is not None:
        for fam in [f.strip() for f in args.families.split(",") if f.strip()]:
            get_family(fam)  # a typo -> ValueError naming the closest family
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    if not splits:
        raise ValueError(f"--split {args.split!r} names no split; known: {', '.join(SPLITS)}")
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--max-bins", args.max_bins, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1), ("--batch-size", args.batch_size, 1),
                             ("--chunk-size", args.chunk_size, 1), ("--mcq-questions", args.mcq_questions, 1),
                             ("--open-ended-samples", args.open_ended_samples, 1), ("--threads", args.threads, 0),
                             ("--max-prompts-per-family", args.max_prompts_per_family, 1),
                             ("--open-ended-prompts", args.open_ended_prompts, 1), ("--seed", args.seed, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not 0 <= args.num_decimals <= _MAX_DECIMALS or args.max_bins > MAX_BINS:
        raise ValueError(f"need 0 <= --num-decimals <= {_MAX_DECIMALS} and --max-bins <= {MAX_BINS:,}")
    resolve_device(args.device)
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise ValueError(f"--cache-dir {args.cache_dir} is a file, not a directory")
    if args.metrics in ("sampling", "all"):  # the answers of one prompt are held at once
        need, have = args.num_samples * (args.max_new_tokens + 8) * 8, machine_memory()
        if need > have:
            raise ValueError(f"--num-samples {args.num_samples} needs about {format_bytes(need)} of memory per "
                             f"prompt, more than this machine's {format_bytes(have)}")
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output-dir {out_dir} is a file, not a directory")
    if is_run(out_dir) or (out_dir / "adapter_config.json").exists():
        raise ValueError(f"--output-dir {out_dir} holds a training run or an adapter "
                         f"({RUN_MARKER} / adapter_config.json); its summary.json would be overwritten: "
                         "choose another --output-dir")
    model_files = [n for n in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors",
                               "model.safetensors.index.json", "pytorch_model.bin") if (out_dir / n).exists()]
    if model_files:
        raise ValueError(f"--output-dir {out_dir} holds a model ({', '.join(model_files)}): choose another "
                         "--output-dir")


def check_adapters(args, labels) -> None:
    """Load every adapter on the base model once before any evaluation, so a damaged or
    mismatched adapter fails in seconds, not after the base model has been scored. Warn when an
    adapter was trained at other decimals than it is scored at (its run's config.json)."""
    import sys
    import warnings

    from peft import PeftModel

    for _, adapter in labels:
        if adapter is None:
            continue
        try:
            base = load_model(args.model, device="cpu")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with quiet_peft():
                    loaded = PeftModel.from_pretrained(base, adapter)
            check_adapter_fits(loaded, adapter, args.model)
            for w in caught:  # PEFT only warns when the adapter's keys do not fit the model
                text = str(w.message)
                if "peft" in str(w.filename) and ("missing adapter keys" in text or "unexpected" in text.lower()):
                    raise ValueError(text)
        except Exception as err:
            raise ValueError(f"--adapter {adapter} cannot be loaded on {args.model}: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
        trained = adapter_num_decimals(adapter)
        if trained is not None and trained != args.num_decimals:
            print(f"calft.eval: warning: adapter {adapter} was trained with {trained} decimals but is "
                  f"scored at --num-decimals {args.num_decimals}", file=sys.stderr, flush=True)


def check_adapter_fits(model, adapter: str, base_name: str) -> None:
    """PEFT keeps the adapter tensors that have a place in the model and drops the rest without a
    word (an adapter of a deeper model loads on a shallower one): every tensor of the adapter file
    must fit, with its shape (ValueError). A different base model name is a warning (a copy of the
    same model may sit elsewhere)."""
    import sys

    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    path = Path(adapter) / "adapter_model.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        extra, missing = sorted(set(saved) - set(expected)), sorted(set(expected) - set(saved))
        shapes = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
        if extra or missing or shapes:
            what = [f"{len(extra)} tensors with no place in the model (e.g. {extra[0]})" if extra else "",
                    f"{len(missing)} of the model's adapter tensors missing (e.g. {missing[0]})" if missing else "",
                    f"{len(shapes)} of another shape (e.g. {shapes[0]}: {saved[shapes[0]]} vs "
                    f"{expected[shapes[0]]})" if shapes else ""]
            raise ValueError(f"it was not trained on this base model: {'; '.join(w for w in what if w)}")
    trained_on = getattr(model.peft_config.get("default"), "base_model_name_or_path", None)
    if trained_on and str(trained_on) != str(base_name) and Path(str(trained_on)).resolve() != Path(str(base_name)).resolve():
        print(f"calft.eval: warning: adapter {adapter} was trained on {trained_on}, scored on {base_name}",
              file=sys.stderr, flush=True)


def adapter_num_decimals(adapter: str) -> int | None:
    """The --num-decimals an adapter was trained with: from the calft run's config.json (the run
    dir holds the final adapter; checkpoint/ sits one level below), None when unknown."""
    for cfg in (Path(adapter) / "config.json", Path(adapter).parent / "config.json"):
        try:
            value = json.loads(cfg.read_text()).get("num_decimals")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int):
            return value
    return None


def load_for_eval(args, adapter: str | None):
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, dtype=dtype, device=resolve_device(args.device))
    if adapter is not None:
        from peft import PeftModel

        with quiet_peft():
            model = PeftModel.from_pretrained(model, adapter).eval()
    return model


def prepare(args, tokenizer) -> dict:
    """{split: [PreparedPrompt]} with the requested families and data settings."""
    from calft.data import DataSettings, prepare_prompts

    settings = DataSettings(num_decimals=args.num_decimals, max_bins=args.max_bins)
    wanted = None if args.families is None else {f.strip() for f in args.families.split(",") if f.strip()}
    out = {}
    for split in [s.strip() for s in args.split.split(",") if s.strip()]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        families = None
        if wanted is not None:
            members = {s.family_id for s in get_split(split)}
            families = sorted(wanted & members)
            if not families:
                raise ValueError(f"none of --families {sorted(wanted)} is in split {split!r}")
        specs = get_split(split, families=families, max_specs=args.max_prompts_per_family)
        kwargs = {"cache_dir": args.cache_dir} if args.cache_dir else {}
        out[split] = prepare_prompts(tokenizer, specs, settings, progress=not args.quiet, **kwargs)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = ["split", "model", "family_id", "params"]
    for r in rows:
        keys += [k for k in r if k not in keys]
    import io

    from calft.fileio import write_atomic

    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})
    write_atomic(path, f.getvalue())


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
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
    lines = ["Per family:", "", "| family | " + " | ".join(f"{m} ({lab})" for lab, m in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for fam in by_model[labels[0]]["per_family"]:
        cells = [format_number(by_model[lab]["per_family"].get(fam, {}).get(m)) for lab, m in cols]
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(path: Path, args, summaries: dict, tracking: dict, benchmarks: dict, plots: dict,
                 timings: dict) -> None:
    lines = ["# calft evaluation report", "",
             f"Model: `{args.model}`; metrics: {args.metrics}; {args.num_decimals} decimals, "
             f"{args.max_bins} bins" + (f"; {args.num_samples} samples per prompt" if args.metrics != "exact" else ""),
             "", "Per split: mean over prompts within each family, then over families (equal family weight).",
             "support_mass = M, the model's probability of answering a canonical support string; "
             "seq_kl = KL(target || model) over strings; *_renorm = with the model renormalized on the support.", ""]
    for split, by_model in summaries.items():
        first = next(iter(by_model.values()))
        lines += [f"## {split} ({first['num_prompts']} prompts, {first['num_families']} families)", "",
                  "Does the model follow the parameters? (calft/tracking.py: R^2 and slope of model vs "
                  "target mean in target-sd units, within families; scale R^2 on log sd; KS)", "",
                  format_tracking_table(tracking[split]), ""]
        if split in plots["tracking"]:
            lines += [f"![model vs target mean and sd per family]({plots['tracking'][split]})", ""]
        lines += ["Exact metrics (family means):", "", format_comparison_table(by_model), ""]
        lines += per_family_table(by_model)
        if split in plots["overview"]:
            lines += [f"![exact KL per family]({plots['overview'][split]})", ""]
    if benchmarks:
        lines += ["## Other benchmarks", "", "| model | benchmark | metric | value |", "|---|---|---|---|"]
        for label, res in benchmarks.items():
            for bench, r in res.items():
                for k, v in r.items():
                    if isinstance(v, (int, float)):
                        lines.append(f"| {label} | {bench} | {k} | {format_number(v)} |")
        lines.append("")
    lines += ["## Timing", "", "| model | split | seconds |", "|---|---|---|"]
    lines += [f"| {m} | {s} | {t:.1f} |" for (m, s), t in timings.items()]
    from calft.fileio import write_atomic

    write_atomic(path, "\n".join(lines) + "\n")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    bench_names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = sorted(set(bench_names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown --benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    check_args(args)  # every flag before anything is loaded or written
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    labels = model_labels(args)  # checks the adapter dirs before any slow work
    set_reasoning_effort(args.reasoning_effort)
    tokenizer = load_tokenizer(args.model)
    check_adapters(args, labels)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(args, tokenizer)
    progress = not args.quiet
    per_prompt, summaries, tracking, benchmarks, timings = [], {}, {}, {}, {}
    exact_probs: dict = {}  # (split, label) -> list of m(s)/M per prompt
    samples: dict = {}  # (split, label) -> list of valid sampled values per prompt
    rows_by: dict = {}  # (split, label) -> per-prompt metric rows
    for label, adapter in labels:
        model = load_for_eval(args, adapter)
        for split, preps in prepared.items():
            t0 = time.perf_counter()
            rows = [{"family_id": p.spec.family_id, "params": p.spec.params_dict} for p in preps]
            if args.metrics in ("exact", "all"):
                exact = evaluate_exact(model, tokenizer, preps, progress, seed=args.seed,
                                       chunk_size=args.chunk_size, return_log_probs=True)
                exact_probs[split, label] = [np.exp(r.pop("log_m") - r["log_support_mass"]) for r in exact]
                for row, r in zip(rows, exact):
                    row.update({k: v for k, v in r.items() if k not in ("family_id", "params")})
            if args.metrics in ("sampling", "all"):
                from calft.sampling import evaluate_sampling

                sampled = evaluate_sampling(model, tokenizer, preps, num_samples=args.num_samples, seed=args.seed,
                                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                            progress=progress)
                samples[split, label] = [s.values for s in sampled]
                for row, s, prep in zip(rows, sampled, preps):
                    row.update(s.metrics, **sample_tracking(prep.support, s.values))
            timings[label, split] = time.perf_counter() - t0
            summaries.setdefault(split, {})[label] = summarize(rows)
            tracking.setdefault(split, {})[label] = summarize_tracking(rows)
            per_prompt += [{"split": split, "model": label, **r} for r in rows]
            rows_by[split, label] = rows
        if bench_names:
            from calft import open_ended

            benchmarks[label] = {}
            if "mcq" in bench_names:
                benchmarks[label]["mcq"] = open_ended.run_mcq(model, tokenizer, num_questions=args.mcq_questions,
                                                              seed=args.seed)
            if "open_ended" in bench_names:
                benchmarks[label]["open_ended"] = open_ended.run_open_ended(
                    model, tokenizer, num_prompts=args.open_ended_prompts,
                    samples_per_prompt=args.open_ended_samples, seed=args.seed)
        del model

    overview, tracking_plots = {}, {}
    if not args.no_plots:
        from calft.plots import plot_overview, plot_prompt, plot_tracking

        for split, preps in prepared.items():
            if args.metrics in ("exact", "all"):
                per_family = {lab: summaries[split][lab]["per_family"] for lab, _ in labels}
                overview[split] = str(plot_overview(out_dir / "plots" / f"{split}_overview.png", per_family,
                                                    title=f"{split}: exact seq_kl_renorm per family").relative_to(out_dir))
                tracking_plots[split] = str(plot_tracking(
                    out_dir / "plots" / f"{split}_tracking.png", {lab: rows_by[split, lab] for lab, _ in labels},
                    title=f"{split}: model vs target mean (o) and sd (^)").relative_to(out_dir))
            for i, prep in enumerate(preps):
                model_p = {lab: exact_probs[split, lab][i] for lab, _ in labels if (split, lab) in exact_probs}
                samp = {lab: samples[split, lab][i] for lab, _ in labels if (split, lab) in samples}
                mass = {lab: r["support_mass"] for lab, _ in labels for r in [rows_by[split, lab][i]]
                        if "support_mass" in r}
                plot_prompt(out_dir / "plots" / split / f"{i:03d}_{prep.spec.family_id}.png", prep.support.values,
                            prep.support.probs, model_p, title=f"{split}: {prep.spec}",
                            integer=prep.support.integer, samples=samp, support_mass=mass)
    write_csv(out_dir / "per_prompt.csv", per_prompt)
    summary = {"settings": vars(args), "models": {lab: ad for lab, ad in labels}, "splits": summaries,
               "tracking": tracking,
               "benchmarks": benchmarks, "seconds": {f"{m}/{s}": t for (m, s), t in timings.items()},
               "metrics_order": [m for m in SUMMARY_METRICS]}
    from calft.fileio import write_atomic

    write_atomic(out_dir / "summary.json", json.dumps(_json_safe(summary), indent=1))
    write_report(out_dir / "report.md", args, summaries, tracking, benchmarks,
                 {"overview": overview, "tracking": tracking_plots}, timings)
    if progress:
        print((out_dir / "report.md").read_text())
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad settings: a one-line message, not a traceback; 2 = misuse
        print(f"calft.eval: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except OSError as err:  # a full disk or an unwritable --output-dir
        from calft.fileio import describe_os_error

        print(f"calft.eval: error: cannot write the results: {describe_os_error(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
