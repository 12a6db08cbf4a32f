"""Evaluate how faithfully a model (and fine-tuned adapters of it) samples requested distributions.

    python -m calft.eval                                        # base SmolLM2, test_selected, exact
    python -m calft.eval --adapter runs/soft --metrics all --eval-samples 200
    python -m calft.eval --adapter runs/soft --adapter runs/hard \
        --eval-split test_selected,ood_selected --benchmarks mcq,open_ended --output-dir eval_out

Metrics (docs/method.md, section 'Metrics'): "exact" scores every canonical support string under
the model in one pass over the answer trie; "sampling" runs the paper's protocol. Every model (the
base, then base + each adapter) is evaluated on the same prepared prompts by
calft.scoring.evaluate_models, the code path calft.train's final evaluation uses; the flags share
calft.train's names (--eval-split, --eval-decimals, ...; the old --split, --num-decimals, ...
still work, with a deprecation note). Outputs in --output-dir: summary.json, per_prompt.csv,
report.md, plots/*.png and, with sampling, samples.jsonl (every answer's text, one line per model and
prompt: what the sampled metrics were computed from).

    python -m calft.eval --suite paper --adapter soft=runs/soft --adapter hard=runs/hard   # calft.paper_suite
runs the paper's whole evaluation instead (docs/paper_eval.md).
"""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting collapse throughput 5-10x when the CPU cores are shared
# with other busy processes (measured: exact scoring of one 1001-string prompt on 2 shared cores,
# 5 s with PASSIVE vs 24-47 s with the default). Must be set before torch is imported; an explicit
# user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402

from calft import open_ended  # noqa: E402
from calft.run_dir import RUN_MARKER, is_run  # noqa: E402
from calft.cli import add_flags, comma_list, knob  # noqa: E402
from calft.precision import PRECISIONS, autocast_dtype  # noqa: E402
from calft.precision import describe as describe_precision  # noqa: E402
from calft.data import DataSettings, prepare_prompts  # noqa: E402
from calft.families import get_family  # noqa: E402
from calft.fileio import describe_os_error, format_bytes, machine_memory, write_atomic  # noqa: E402
from calft.models import DEFAULT_MODEL, load_model, load_tokenizer, quiet_peft, same_model  # noqa: E402
from calft.prompts import REASONING_EFFORTS, set_reasoning_effort  # noqa: E402
from calft.plots import plot_overview, plot_prompt, plot_tracking  # noqa: E402
from calft.report import format_split_summary, json_safe, sampled_base, write_csv, write_report  # noqa: E402
from calft.scoring import SUMMARY_METRICS, evaluate_models  # noqa: E402
from calft.splits import SPLITS, get_split  # noqa: E402
from calft.support import MAX_BINS, MAX_DECIMALS  # noqa: E402
from calft.tracking import missed_targets  # noqa: E402

METRIC_CHOICES = ("exact", "sampling", "all")
BENCHMARKS = ("mcq", "open_ended")


@dataclass
class EvalConfig:
    """Every calft.eval flag; the names shared with calft.train's TrainConfig mean the same there."""

    # models
    model: str = knob(DEFAULT_MODEL, "base model: HF id, local dir, or the embedded alias")
    adapter: list = knob((), "PEFT adapter dir (a calft.train run directory) trained on --model; repeat to "
                         "compare several (the base is included unless --no-base)")
    base: bool = knob(True, "evaluate the base model too (--no-base: only the adapters, when given)")
    device: str = knob("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    threads: int = knob(0, "torch CPU threads; 0 = torch's default")
    dtype: str = knob("float32", "model weights dtype (scores are summed in float64 either way)",
                      ("float32", "bfloat16", "float16"))
    # prompts and targets
    precision: str = knob("auto", "autocast of the forward passes, as calft.train's: auto = bf16 on CUDA and on "
                          "CPUs with native bf16 (AVX512-BF16 / AMX), else fp32", PRECISIONS)
    eval_split: str = knob("test_selected", f"comma-separated splits, from: {', '.join(SPLITS)}",
                           aliases=("--split",))
    families: str = knob("", "comma-separated family ids; '' = every family of the split")
    eval_prompts_per_family: int = knob(-1, "prompts per family, evenly subsampled; -1 = the split's own cap",
                                        aliases=("--max-prompts-per-family",))
    eval_decimals: int = knob(2, "decimals of continuous answers", aliases=("--num-decimals",))
    eval_bins: int = knob(1001, "support strings per prompt, at most", aliases=("--max-bins",))
    reasoning_effort: str = knob("low", "what a chat template with a reasoning_effort variable (gpt-oss) renders; "
                                 "use the adapter's (calft.train's default and the paper's: low)", REASONING_EFFORTS)
    # metrics
    metrics: str = knob("exact", "exact trie scoring, sampling, or both", METRIC_CHOICES)
    eval_samples: int = knob(1000, "answers sampled per prompt (sampling metrics)", aliases=("--num-samples",))
    max_new_tokens: int = knob(32, "generation budget per sample, tokens")
    batch_size: int = knob(1024, "samples decoded together, over several prompts (sampling)")
    chunk_size: int = knob(256, "trie nodes per forward (exact scoring)")
    seed: int = knob(0, "base seed of sampling and of the Monte-Carlo logit KL")
    benchmarks: str = knob("", "comma-separated extra benchmarks: mcq, open_ended; '' = none")
    mcq_questions: int = knob(100, "MCQs generated per model (paper: 1000)")
    open_ended_prompts: int = knob(-1, "open-ended prompts used; -1 = all 102")
    open_ended_samples: int = knob(100, "samples per open-ended prompt")
    # output
    output_dir: str = knob("eval_out", "where summary.json, per_prompt.csv, report.md, plots/ and samples.jsonl go")
    plots: bool = knob(True, "draw the PNG plots")
    cache_dir: str = knob("", "prepared-prompt cache; '' = calft.data's default")
    progress: bool = knob(True, "show progress bars and print the report", aliases=(("--quiet", False),))


FLAG_GROUPS = {"model": "models", "eval_split": "prompts and targets", "metrics": "metrics",
               "output_dir": "output"}


def parse_config(argv=None) -> EvalConfig:
    """Flags from EvalConfig's fields (calft.cli); unknown flags and bad values exit with status 2."""
    parser = argparse.ArgumentParser(prog="python -m calft.eval", description=__doc__.split("\n\n")[0],
                                     argument_default=argparse.SUPPRESS,
                                     epilog="--suite paper runs the paper's whole evaluation instead (base, SSoT "
                                            "prompting, each adapter; docs/paper_eval.md): see "
                                            "python -m calft.eval --suite paper --help")
    add_flags(parser, EvalConfig, FLAG_GROUPS)
    cfg = EvalConfig(**vars(parser.parse_args(argv)))
    cfg.adapter = list(cfg.adapter)
    return cfg


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
    out = [] if (not args.base and args.adapter) else [("base", None)]
    names = [Path(a).name or str(a) for a in args.adapter]
    for a, name in zip(args.adapter, names):
        if not Path(a).is_dir():
            raise ValueError(f"--adapter {a!r} is not a directory (expected a saved PEFT adapter)")
        out.append((name if names.count(name) == 1 and name != "base" else str(a), a))
    return out


def check_args(args) -> None:
    """Everything that can be checked before any model runs (ValueError with a clear message)."""
    for fam in comma_list(args.families):
        get_family(fam)  # a typo -> ValueError naming the closest family
    unknown = sorted(set(comma_list(args.benchmarks)) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown --benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    if not comma_list(args.eval_split):
        raise ValueError(f"--eval-split {args.eval_split!r} names no split; known: {', '.join(SPLITS)}")
    for split in comma_list(args.eval_split):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    for flag, value, low in (("--eval-samples", args.eval_samples, 1), ("--eval-bins", args.eval_bins, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1), ("--batch-size", args.batch_size, 1),
                             ("--chunk-size", args.chunk_size, 1), ("--mcq-questions", args.mcq_questions, 1),
                             ("--open-ended-samples", args.open_ended_samples, 1), ("--threads", args.threads, 0),
                             ("--seed", args.seed, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--eval-prompts-per-family", args.eval_prompts_per_family),
                        ("--open-ended-prompts", args.open_ended_prompts)):
        if value < 1 and value != -1:
            raise ValueError(f"{flag} must be >= 1, or -1 (the sentinel), got {value}")
    if not 0 <= args.eval_decimals <= MAX_DECIMALS or args.eval_bins > MAX_BINS:
        raise ValueError(f"need 0 <= --eval-decimals <= {MAX_DECIMALS} and --eval-bins <= {MAX_BINS:,}")
    resolve_device(args.device)
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise ValueError(f"--cache-dir {args.cache_dir} is a file, not a directory")
    if args.metrics in ("sampling", "all"):  # the answers of one prompt are held at once
        need, have = args.eval_samples * (args.max_new_tokens + 8) * 8, machine_memory()
        if need > have:
            raise ValueError(f"--eval-samples {args.eval_samples} needs about {format_bytes(need)} of memory per "
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
        if trained is not None and trained != args.eval_decimals:
            print(f"calft.eval: warning: adapter {adapter} was trained with {trained} decimals but is "
                  f"scored at --eval-decimals {args.eval_decimals}", file=sys.stderr, flush=True)


def check_adapter_fits(model, adapter: str, base_name: str) -> None:
    """PEFT keeps the adapter tensors that have a place in the model and drops the rest without a
    word (an adapter of a deeper model loads on a shallower one): every tensor of the adapter file
    must fit, with its shape (ValueError). A different base model name is a warning (a copy of the
    same model may sit elsewhere)."""
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
    if trained_on and not same_model(str(trained_on), str(base_name)):
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


@contextmanager
def opened(args, adapter: str | None):
    """The model to score (loaded fresh; base + adapter when one is given), freed afterwards."""
    model = load_for_eval(args, adapter)
    yield model
    del model


def load_for_eval(args, adapter: str | None):
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, dtype=dtype, device=resolve_device(args.device))
    if adapter is not None:
        with quiet_peft():
            model = PeftModel.from_pretrained(model, adapter).eval()
    return model


def prepare(args, tokenizer) -> dict:
    """{split: [PreparedPrompt]} with the requested families and data settings."""
    settings = DataSettings(num_decimals=args.eval_decimals, max_bins=args.eval_bins)
    wanted = set(comma_list(args.families)) or None
    out = {}
    for split in comma_list(args.eval_split):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        families = None
        if wanted is not None:
            members = {s.family_id for s in get_split(split)}
            families = sorted(wanted & members)
            if not families:
                raise ValueError(f"none of --families {sorted(wanted)} is in split {split!r}")
        specs = get_split(split, families=families,
                          max_specs=args.eval_prompts_per_family if args.eval_prompts_per_family > 0 else None)
        kwargs = {"cache_dir": args.cache_dir} if args.cache_dir else {}
        out[split] = prepare_prompts(tokenizer, specs, settings, progress=args.progress, **kwargs)
    return out


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--suite" or a.startswith("--suite=") for a in argv):  # the paper's whole evaluation
        from calft.paper_suite import cli

        return cli(argv)
    args = parse_config(argv)
    bench_names = comma_list(args.benchmarks)
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
    progress = args.progress
    benchmarks = {}

    def run_benchmarks(label, model):
        if not bench_names:
            return
        benchmarks[label] = {}
        if "mcq" in bench_names:
            benchmarks[label]["mcq"] = open_ended.run_mcq(model, tokenizer, num_questions=args.mcq_questions,
                                                          seed=args.seed)
        if "open_ended" in bench_names:
            benchmarks[label]["open_ended"] = open_ended.run_open_ended(
                model, tokenizer, num_prompts=args.open_ended_prompts if args.open_ended_prompts > 0 else None,
                samples_per_prompt=args.open_ended_samples, seed=args.seed)

    device_type = resolve_device(args.device).split(":")[0]
    amp = autocast_dtype(device_type, args.precision)  # as calft.train: bf16 where native
    if progress:
        print(describe_precision(device_type, amp))
    result = evaluate_models([(label, functools.partial(opened, args, adapter)) for label, adapter in labels],
                             tokenizer, prepared, exact=args.metrics in ("exact", "all"),
                             num_samples=args.eval_samples if args.metrics in ("sampling", "all") else 0,
                             seed=args.seed, chunk_size=args.chunk_size, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, keep_log_probs=True, after_model=run_benchmarks,
                             autocast=(device_type, amp) if amp else None, progress=progress)
    summaries, tracking, rows_by = result["summaries"], result["tracking"], result["rows"]
    exact_probs, samples, timings = result["probs"], result["samples"], result["seconds"]
    per_prompt = [{"split": split, "model": label, **r} for label, _ in labels for split in prepared
                  for r in rows_by[split, label]]

    overview, tracking_plots = {}, {}
    if args.plots:
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
    if result["outputs"]:
        write_atomic(out_dir / "samples.jsonl", "".join(
            json.dumps({"split": split, "model": label, "family_id": prep.spec.family_id,
                        "params": dict(prep.spec.params_dict), "outputs": result["outputs"][split, label][i]}) + "\n"
            for label, _ in labels for split, preps in prepared.items() if (split, label) in result["outputs"]
            for i, prep in enumerate(preps)))
    summary = {"settings": asdict(args), "models": {lab: ad for lab, ad in labels}, "splits": summaries,
               "tracking": tracking,
               "benchmarks": benchmarks, "seconds": {f"{m}/{s}": t for (m, s), t in timings.items()},
               "metrics_order": [m for m in SUMMARY_METRICS]}
    write_atomic(out_dir / "summary.json", json.dumps(json_safe(summary), indent=1))
    write_report(out_dir / "report.md", args, summaries, tracking, benchmarks,
                 {"overview": overview, "tracking": tracking_plots}, timings)
    if progress:
        print((out_dir / "report.md").read_text())
    non_base = [label for label, adapter in labels if adapter is not None]
    for split, preps in prepared.items() if progress else ():  # the block calft.train prints
        misses = None
        if len(non_base) == 1:
            misses = missed_targets(tracking[split][non_base[0]], sampled_base(tracking[split]), split=split)
        print(format_split_summary(split, len(preps), args.eval_decimals, args.eval_bins, summaries[split],
                                   tracking[split], misses, args.eval_samples if args.metrics != "exact" else 0))
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad settings: a one-line message, not a traceback; 2 = misuse
        print(f"calft.eval: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except OSError as err:  # a full disk or an unwritable --output-dir
        print(f"calft.eval: error: cannot write the results: {describe_os_error(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
