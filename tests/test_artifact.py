"""Regression tests: calft reproduces the paper artifact's targets (chandar-lab/calibration-finetuning).

The oracle below re-implements, independently of calft.support, the artifact's
`_continuous_grid` (calibrate_sft/data.py): k from ceil(lower / step) to floor(upper / step)
with the float step 10.0**-d, centers k * step, subsampled at np.linspace(0, n-1, max_bins,
dtype=int) when there are more than max_bins, formatted with f"{x:.{d}f}". The named facts
(U1, U2, U3 of issue 12) were checked against it.
"""
import math

import numpy as np
import pytest

from calft.families import get_family
from calft.splits import get_split
from calft.support import build_support


def artifact_grid(fid, params, d, max_bins):
    """The artifact's continuous support strings (computed at the kept indices only)."""
    dist = get_family(fid).frozen(params)
    s_lo, s_hi = dist.support()
    lower, upper = float(dist.ppf(0.001)), float(dist.ppf(0.999))
    if np.isfinite(s_lo):
        lower = max(lower, float(s_lo))
    if np.isfinite(s_hi):
        upper = min(upper, float(s_hi))
    step = 10.0 ** (-d)
    start, end = math.ceil(lower / step), math.floor(upper / step)
    n = end - start + 1
    idx = np.linspace(0, n - 1, num=max_bins, dtype=int) if n > max_bins else np.arange(n)
    return tuple(f"{v:.{d}f}" for v in (start + idx).astype(float) * step)


def test_u1_subsampling_rounds_down_like_linspace():
    # Gaussian(mu=3.5, sigma=3) at 2 decimals / 1001 bins: 1856 grid points -> 1001
    values = build_support("gaussian", {"mu": 3.5, "sigma": 3}, num_decimals=2, max_bins=1001).values
    assert values[:5] == ("-5.77", "-5.76", "-5.74", "-5.72", "-5.70")  # round-half-up gave -5.75, -5.73, -5.71
    assert len(values) == 1001 and values == artifact_grid("gaussian", {"mu": 3.5, "sigma": 3}, 2, 1001)


def test_u2_point_on_the_quantile():
    # triangular a=-2, c=-1.6, b=2: ppf(.999) = 1.88 analytically, 1.8799999999999999 in float64
    values = build_support("triangular", {"a": -2, "c": -1.6, "b": 2}, num_decimals=2).values
    assert values[-1] == "1.87" and values[0] == "-1.96"
    assert values == artifact_grid("triangular", {"a": -2, "c": -1.6, "b": 2}, 2, 1001)


def test_u3_train_split_has_1988_prompts():
    train = get_split("train")
    assert len(train) == 1988
    assert sum(s.family_id == "triangular" for s in train) == 125


# Prompts where the rules are easy to get wrong: subsampled grids (n > 1001), quantiles that are
# exact decimals (uniform, triangular), the 16384-bin hard recipe, a wide Cauchy at 5 decimals.
ORACLE_CASES = [
    ("gaussian", {"mu": 3.5, "sigma": 3}, 5, 1001),
    ("uniform", {"a": 3.5, "b": 10.5}, 5, 1001),
    ("uniform", {"a": 4.5, "b": 12.5}, 3, 1001),
    ("triangular", {"a": 2.5, "c": 3.3, "b": 10.5}, 2, 1001),
    ("triangular", {"a": 1.5, "c": 2.05, "b": 7}, 3, 1001),
    ("lognormal", {"mu": 2.5, "sigma": 2}, 2, 1001),
    ("cauchy", {"x0": 3.5, "gamma": 3}, 5, 1001),
    ("beta", {"alpha": 7, "beta": 7}, 5, 1001),
    ("exponential", {"lambda": 7}, 5, 16384),
    ("inverse_gaussian", {"mu": 5, "lambda": 7}, 1, 1001),
]


@pytest.mark.parametrize("fid,params,d,max_bins", ORACLE_CASES)
def test_support_strings_equal_the_artifacts(fid, params, d, max_bins):
    got = build_support(fid, params, num_decimals=d, max_bins=max_bins).values
    assert got == artifact_grid(fid, params, d, max_bins)


def test_selected_and_sampled_split_prompts_equal_the_artifacts():
    specs = get_split("test_selected") + get_split("test_unseen_params")[::5] + get_split("train")[::41]
    checked = 0
    for s in specs:
        if get_family(s.family_id).integer_only:
            continue  # integer supports follow docs/method.md's fixes (both tails, window at the mode)
        for d in (2, 5):
            assert build_support(s.family_id, s.params_dict, num_decimals=d).values == \
                artifact_grid(s.family_id, s.params_dict, d, 1001), (str(s), d)
            checked += 1
    assert checked > 100


def test_paper_recipe_loop_keeps_last_batch_hf_warmup_no_clipping(tiny_model_dir, tmp_path, monkeypatch):
    """--recipe paper-soft on the tiny model: 8 prompts, batch 3 -> ceil(8/3) = 3 steps per epoch
    (the last of 2 sequences, one of its 3 micro-batches empty), and transformers' own
    get_cosine_schedule_with_warmup gives the learning rates."""
    import json
    import os
    import runpy
    import sys

    import torch
    from transformers import get_cosine_schedule_with_warmup

    out = tmp_path / "run"
    args = ["--recipe", "paper-soft", "--model", str(tiny_model_dir), "--output-dir", str(out),
            "--families", "gaussian,binomial", "--max-prompts-per-family", "4", "--num-decimals", "1",
            "--max-bins", "40", "--batch-size", "3", "--micro-batch-size", "1", "--epochs", "2",
            "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--warmup-frac", "0.34",
            "--no-progress", "--no-eval"]
    monkeypatch.setattr(sys, "argv", ["calft.train", *args])
    if "CALFT_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("CALFT_CACHE_DIR", str(tmp_path / "cache"))
    try:
        runpy.run_module("calft.train", run_name="__main__")
    except SystemExit as exc:
        assert exc.code in (0, None)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6  # 2 epochs x 3 steps; dropping the last partial batch gave 2 x 2
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, int(6 * 0.34), 6)
    want = []
    for _ in range(6):
        want.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert [m["lr"] for m in metrics] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert want[0] == 0.0 and all(np.isfinite(m["loss"]) for m in metrics)
    config = json.loads((out / "config.json").read_text())
    assert (config["keep_last_batch"], config["warmup_rule"], config["grad_clip"]) == (True, "hf", 0.0)
