"""The paper's whole evaluation in one command: base, SSoT prompting and each adapter, side by side.

    python -m calft.eval --suite paper --adapter soft=runs/soft --adapter hard=runs/hard
    python -m calft.eval --suite paper --adapter soft=runs/soft --size full    # the paper's sizes

Rows: the base model, the base model with the String Seed of Thought system prompt (calft.ssot),
and base + each adapter. Benchmarks (each row runs the same prompts, items and seeds):
  structured       numeric sampling on test_selected (unseen parameters) and ood_selected
                   (held-out families): the artifact's metrics (calft.artifact_metrics)
  open_generation  open random generation (calft's 102 prompts): distinct outputs per prompt and the
                   first-token top-p support size at 21 thresholds
  mcq              MCQ answer-position balance: N generated questions, the artifact's strict parser
  noveltybench     NoveltyBench curated prompts, model-free partition (calft.novelty)
  retention        arithmetic retention on reasoning-gym items (calft.retention)
SSoT is run where the artifact runs it (structured sampling and open generation); its other cells
are "not run".

Outputs in --output-dir: summary.json (every number), report.md (one table per benchmark, then a
summary table with each benchmark's headline metric and its better direction), plots/*.png.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from calft.models import DEFAULT_MODEL, quiet_peft

SUITES = ("paper",)
BENCHMARKS = ("structured", "open_generation", "mcq", "noveltybench", "retention")
SSOT_BENCHMARKS = ("structured", "open_generation")  # where the artifact applies SSoT
STRUCTURED_SPLITS = ("test_selected", "ood_selected")
SSOT_LABEL = "ssot"

# The MCQ request, written for calft in the layout the artifact's strict parser reads (one prompt
# for every question, as in the artifact).
MCQ_PROMPT = """Write one multiple-choice question for medical students, of moderate difficulty, with exactly one correct answer among four options. Use exactly this format and nothing else:
Question: <the question>
A. <option A>
B. <option B>
C. <option C>
D. <option D>
Correct Answer: <A, B, C or D>
Explanation: <a short explanation>
Across questions, the correct answer should be A, B, C and D equally often."""


@dataclass(frozen=True)
class Size:
    """How much of each benchmark runs. `full` is the paper artifact's configuration."""

    structured_families: tuple[str, ...] | None  # None = every family of each split
    structured_prompts_per_family: int | None  # None = the split's own (selected: 1 / 3)
    structured_samples: int
    seeds: tuple[int, ...]
    max_new_tokens: int  # structured sampling (the artifact: 32)
    ssot_max_new_tokens: int  # SSoT writes a seed and its reasoning first
    open_prompts: int | None
    open_samples: int
    open_max_new_tokens: int
    mcq_questions: int
    mcq_max_new_tokens: int
    novelty_prompts: int | None
    novelty_generations: int
    novelty_max_new_tokens: int
    retention: dict = field(default_factory=dict)  # task -> items


SIZES = {
    # about 10 minutes for base + SSoT + two adapters of SmolLM2-135M on 2 quiet CPU cores
    "quick": Size(structured_families=("gaussian", "exponential", "logistic", "binomial", "uniform", "geometric",
                                       "weibull", "poisson", "bernoulli", "chi"),
                  structured_prompts_per_family=1, structured_samples=32, seeds=(11,), max_new_tokens=32,
                  ssot_max_new_tokens=96, open_prompts=12, open_samples=16, open_max_new_tokens=16,
                  mcq_questions=12, mcq_max_new_tokens=128, novelty_prompts=8, novelty_generations=5,
                  novelty_max_new_tokens=48, retention={"arith_add1": 40, "arith_addsub2": 40}),
    # the paper artifact's sizes (SSoT budget: 512 tokens, the artifact's open-generation SSoT uses 4096)
    "full": Size(structured_families=None, structured_prompts_per_family=None, structured_samples=1000,
                 seeds=(11, 29, 47), max_new_tokens=32, ssot_max_new_tokens=512, open_prompts=None,
                 open_samples=100, open_max_new_tokens=16, mcq_questions=1000, mcq_max_new_tokens=256,
                 novelty_prompts=None, novelty_generations=10, novelty_max_new_tokens=512,
                 retention={"arith_add1": 200, "arith_addsub2": 200, "gsm_symbolic": 100}),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calft.eval --suite paper", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", required=True, help=f"the evaluation suite: {', '.join(SUITES)}")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model: HF id, local dir, or the embedded alias")
    p.add_argument("--adapter", action="append", default=[], metavar="LABEL=DIR",
                   help="a PEFT adapter trained on --model (calft.train's run dir), with its row label; repeat")
    p.add_argument("--size", default="quick", choices=tuple(SIZES),
                   help="quick: ~10 min on 2 CPU cores for SmolLM2; full: the paper's sample counts and seeds")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    p.add_argument("--no-ssot", action="store_true", help="skip the SSoT prompting row")
    p.add_argument("--output-dir", default="paper_eval", help="where report.md, summary.json and plots/ go")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--batch-size", type=int, default=64, help="samples generated together")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# -----------------------------------------------------------------------------
# checks (everything that can fail before a model runs)


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """[(label, dir)] from LABEL=DIR (or DIR: the label is the directory's name)."""
    out = []
    for spec in specs:
        label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        label = label or Path(path).name
        if not Path(path).is_dir() or not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {spec!r}: {path!r} is not a saved PEFT adapter (no adapter_config.json)")
        if label in ("base", SSOT_LABEL) or label in [lab for lab, _ in out]:
            raise ValueError(f"--adapter {spec!r}: the label {label!r} is taken; give another as LABEL=DIR")
        out.append((label, path))
    return out


def check_adapter(model_name: str, label: str, path: str) -> None:
    """Refuse an adapter trained on another base model: the run's recorded model, then a test load."""
    import warnings

    from peft import PeftModel

    from calft.models import load_model, same_model

    for cfg in (Path(path) / "config.json", Path(path).parent / "config.json"):
        try:
            trained_on = json.loads(cfg.read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(trained_on, str) and not same_model(trained_on, model_name):
            raise ValueError(f"--adapter {label}={path} was trained on {trained_on!r}, not on --model {model_name!r}")
        break
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a check prints nothing but its one-line error
    problem = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_peft():
                PeftModel.from_pretrained(load_model(model_name, device="cpu"), path)
        for w in caught:  # PEFT only warns when the adapter's keys do not fit the model
            text = str(w.message)
            if "peft" in str(w.filename) and ("missing adapter keys" in text or "unexpected" in text.lower()):
                problem = text.strip().splitlines()[0]
    except Exception as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        # torch's load error names the problem on a later line ("size mismatch for ...")
        problem = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(err).__name__)
    finally:
        hf_logging.enable_progress_bar()
    if problem is not None:
        raise ValueError(f"--adapter {label}={path} does not fit --model {model_name!r}: {problem[:300]}")


def load_row_model(model_name: str, adapter: str | None, device: str):
    """The base model (float32), with the adapter applied when given."""
    from calft.models import load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_name, device=device)
    if adapter is not None:
        from peft import PeftModel

        with quiet_peft():
            model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def check_dependencies(benchmarks) -> None:
    from calft.optional import require

    if "noveltybench" in benchmarks:
        require("rouge_score.rouge_scorer", "rouge-score", "the noveltybench benchmark")
    if "retention" in benchmarks:
        require("reasoning_gym", "reasoning-gym", "the retention benchmark")


# -----------------------------------------------------------------------------
# benchmarks: each takes (model, tokenizer, size, ssot) and returns a JSON-able dict


def _equal_family_mean(rows: list[dict], key: str) -> float:
    by_family: dict[str, list[float]] = {}
    for r in rows:
        v = r.get(key)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            by_family.setdefault(r["family_id"], []).append(float(v))
    return float(np.mean([np.mean(v) for v in by_family.values()])) if by_family else float("nan")


STRUCTURED_KEYS = ("valid_rate", "support_violation_rate", "mean_error", "variance_error_ddof0", "wasserstein_1",
                   "w1_over_sd", "ks_stat", "anderson_fitted", "anderson_known", "chi2_pvalue")


def structured_specs(size: Size) -> dict[str, list]:
    from calft.splits import get_split

    out = {}
    for split in STRUCTURED_SPLITS:
        specs = get_split(split, max_specs=size.structured_prompts_per_family)
        if size.structured_families is not None:
            specs = [s for s in specs if s.family_id in size.structured_families]
        out[split] = specs
    return out


def run_structured(model, tokenizer, size: Size, ssot: bool, batch_size: int, progress: bool) -> dict:
    """Per split: artifact metrics per prompt (mean over seeds), then equal family weight."""
    from tqdm.auto import tqdm

    from calft.artifact_metrics import structured_metrics
    from calft.prompts import prompt_text, prompt_token_ids
    from calft.sampling import generate_samples
    from calft.ssot import extract_answer, ssot_prompt_ids

    out = {}
    for split, specs in structured_specs(size).items():
        rows = []
        for spec in tqdm(specs, desc=f"structured {split}", disable=not progress, leave=False):
            text = prompt_text(spec.family_id, spec.params_dict)
            ids = ssot_prompt_ids(tokenizer, text, "numeric") if ssot else prompt_token_ids(tokenizer, text)
            per_seed = []
            for seed in size.seeds:
                outs = generate_samples(model, tokenizer, ids, size.structured_samples, seed=seed, prompt_key=text,
                                        batch_size=batch_size,
                                        max_new_tokens=size.ssot_max_new_tokens if ssot else size.max_new_tokens)
                raw = outs
                if ssot:
                    outs = [extract_answer(o) for o in raw]
                m = structured_metrics(outs, spec.family_id, spec.params_dict)
                if ssot:
                    m["answer_tag_rate"] = float(np.mean([bool(o) for o in outs]))
                per_seed.append(m)
            row = {"family_id": spec.family_id, "params": spec.params_dict, "example": raw[0][:200]}
            for k in per_seed[0]:
                vals = [m[k] for m in per_seed if isinstance(m[k], (int, float))]
                if vals:
                    row[k] = float(np.nanmean(vals)) if not all(math.isnan(v) for v in vals) else float("nan")
            rows.append(row)
        keys = STRUCTURED_KEYS + (("answer_tag_rate",) if ssot else ())
        out[split] = {"num_prompts": len(rows), "num_families": len({r["family_id"] for r in rows}),
                      **{k: _equal_family_mean(rows, k) for k in keys}, "per_prompt": rows}
    return out


def run_open_generation(model, tokenizer, size: Size, ssot: bool, batch_size: int, progress: bool) -> dict:
    """Distinct normalized outputs per prompt, and (not for SSoT) first-token support sizes."""
    from tqdm.auto import tqdm

    from calft.artifact_metrics import TOP_P_THRESHOLDS, distinct_outputs, top_p_support_sizes
    from calft.open_ended import first_token_probs, load_prompt_set
    from calft.prompts import prompt_token_ids
    from calft.sampling import generate_samples
    from calft.ssot import extract_answer, ssot_prompt_ids

    rows = []
    for text in tqdm(load_prompt_set("open_ended")["prompts"][:size.open_prompts], desc="open generation",
                     disable=not progress, leave=False):
        ids = ssot_prompt_ids(tokenizer, text, "open") if ssot else prompt_token_ids(tokenizer, text)
        outs = generate_samples(model, tokenizer, ids, size.open_samples, seed=size.seeds[0], prompt_key=text,
                                batch_size=batch_size,
                                max_new_tokens=size.ssot_max_new_tokens if ssot else size.open_max_new_tokens)
        answers = [extract_answer(o) for o in outs] if ssot else outs
        row = {"prompt": text, "distinct": distinct_outputs(answers), "example": outs[0][:200]}
        if not ssot:  # an SSoT answer always starts with its tag: the first token says nothing (artifact: off)
            row["support"] = {str(t): k for t, k in top_p_support_sizes(first_token_probs(model, ids)).items()}
        rows.append(row)
    out = {"num_prompts": len(rows), "samples_per_prompt": size.open_samples,
           "distinct": float(np.mean([r["distinct"] for r in rows])),
           "distinct_fraction": float(np.mean([r["distinct"] for r in rows])) / size.open_samples, "per_prompt": rows}
    if not ssot:
        out["support"] = {str(t): float(np.mean([r["support"][str(t)] for r in rows])) for t in TOP_P_THRESHOLDS}
        out["support_at_0.9"] = out["support"]["0.9"]
    return out


def run_mcq(model, tokenizer, size: Size, ssot: bool, batch_size: int, progress: bool) -> dict:
    from calft.artifact_metrics import mcq_strict_metrics, parse_mcq_strict
    from calft.prompts import prompt_token_ids
    from calft.sampling import generate_samples

    outs = generate_samples(model, tokenizer, prompt_token_ids(tokenizer, MCQ_PROMPT), size.mcq_questions,
                            seed=size.seeds[0], prompt_key="mcq", batch_size=batch_size,
                            max_new_tokens=size.mcq_max_new_tokens)
    return mcq_strict_metrics([parse_mcq_strict(o) for o in outs]) | {"example": outs[0][:300]}


def run_noveltybench(model, tokenizer, size: Size, ssot: bool, batch_size: int, progress: bool) -> dict:
    from calft.novelty import run_noveltybench as run

    return run(model, tokenizer, num_prompts=size.novelty_prompts, generations=size.novelty_generations,
               max_new_tokens=size.novelty_max_new_tokens, seed=size.seeds[0], progress=progress)


def run_retention(model, tokenizer, size: Size, ssot: bool, batch_size: int, progress: bool) -> dict:
    from calft.retention import run_retention as run

    out = run(model, tokenizer, size.retention, batch_size=min(batch_size, 16), progress=progress)
    arith = [v["flexible"] for k, v in out.items() if k.startswith("arith")]
    return out | {"arith_flexible": float(np.mean(arith)) if arith else float("nan")}


RUNNERS = {"structured": run_structured, "open_generation": run_open_generation, "mcq": run_mcq,
           "noveltybench": run_noveltybench, "retention": run_retention}


# -----------------------------------------------------------------------------
# main


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.suite not in SUITES:
        raise ValueError(f"unknown --suite {args.suite!r}; known: {', '.join(SUITES)}")
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown or not benchmarks:
        raise ValueError(f"unknown --benchmarks {unknown or benchmarks}; choose from {', '.join(BENCHMARKS)}")
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output-dir {out_dir} is a file, not a directory")
    adapters = parse_adapters(args.adapter)
    check_dependencies(benchmarks)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from calft.models import load_tokenizer

    t_start = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    for label, path in adapters:
        check_adapter(args.model, label, path)
    size = SIZES[args.size]
    rows = [("base", None, False)] + ([] if args.no_ssot else [(SSOT_LABEL, None, True)])
    rows += [(label, path, False) for label, path in adapters]
    progress = not args.quiet
    results: dict = {}
    seconds: dict = {}
    base_model = None
    for label, path, ssot in rows:
        if path is None and base_model is not None:
            model = base_model
        else:
            model = load_row_model(args.model, path, args.device)
            if path is None:
                base_model = model
        model.eval()
        results[label] = {}
        for bench in benchmarks:
            if ssot and bench not in SSOT_BENCHMARKS:
                continue
            t0 = time.perf_counter()
            if progress:
                print(f"[paper suite] {label}: {bench}", file=sys.stderr, flush=True)
            results[label][bench] = RUNNERS[bench](model, tokenizer, size, ssot, args.batch_size, progress)
            seconds[f"{label}/{bench}"] = time.perf_counter() - t0
        if path is not None:
            del model
    seconds["total"] = time.perf_counter() - t_start
    summary = {"suite": args.suite, "model": args.model, "size": args.size, "size_settings": asdict(size),
               "rows": {label: path for label, path, _ in rows}, "benchmarks": benchmarks,
               "results": results, "seconds": seconds, "threads": torch.get_num_threads()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1))
    from calft.paper_report import write_report

    report = write_report(out_dir, summary)
    if progress:
        print(report)
    return summary


def cli(argv=None) -> None:
    """`python -m calft.eval --suite ...`: bad input is one line on stderr and exit status 2."""
    try:
        main(argv)
    except ValueError as err:
        print(f"calft.eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
