"""The evaluation at the end of `python -m calft.train`: the same code path as `python -m calft.eval`
(calft.scoring.evaluate_models, then calft.report.write_training_eval's printed block and files).

The fine-tuned model is sampled on every --eval-split; the base model, which answers in prose, only
on --eval-exact-split (test_selected), where the calibration target compares the two
(calft.tracking.missed_targets); both are scored exactly there.
"""
from __future__ import annotations

import time
from contextlib import nullcontext

from calft.cli import comma_list
from calft.data import DataSettings, prepare_prompts
from calft.report import write_training_eval
from calft.scoring import evaluate_models, without_adapter
from calft.splits import get_split

RESULT_KEYS = ("base", "finetuned", "base_tracking", "finetuned_tracking", "missed")


def evaluate_after_training(model, tokenizer, cfg, families, *, autocast, out_dir, record, guard) -> dict:
    """Score `model` (a PeftModel in eval mode) and its base on cfg's eval settings (a TrainConfig);
    print and write the results in out_dir. families: the run's --families (None = all): they
    restrict the splits that hold them. record(names): the run marker's list of files written;
    guard(what): a context manager that turns a write error into calft.train's one-line exit.
    Returns {"eval_time_s", "eval": {split: {RESULT_KEYS...}}} for summary.json."""
    t0, prompts = time.time(), {}
    settings = DataSettings(num_decimals=cfg.eval_decimals, max_bins=cfg.eval_bins)
    for split in comma_list(cfg.eval_split):
        members = {s.family_id for s in get_split(split)}
        specs = get_split(split, families=[f for f in families or () if f in members] or None,
                          max_specs=cfg.eval_prompts_per_family if cfg.eval_prompts_per_family > 0 else None)
        with guard("the prepared-data cache"):
            prompts[split] = prepare_prompts(tokenizer, specs, settings, progress=cfg.progress)
    exact_splits = set(comma_list(cfg.eval_exact_split))
    scored = evaluate_models([("base", lambda: without_adapter(model)), ("fine-tuned", lambda: nullcontext(model))],
                             tokenizer, prompts, exact_splits=exact_splits, num_samples=cfg.eval_samples,
                             sample_labels={"fine-tuned", *(("base", split) for split in exact_splits)},
                             seed=cfg.seed, autocast=autocast, progress=cfg.progress)
    with guard(f"the evaluation in {out_dir}"):
        results = write_training_eval(out_dir, scored, prompts, cfg.eval_decimals, cfg.eval_bins,
                                      num_samples=cfg.eval_samples, record=record)
    return {"eval_time_s": time.time() - t0,
            "eval": {split: {k: r[k] for k in RESULT_KEYS} for split, r in results.items()}}
