"""benchmarks/calibration_curve.py on the tiny model: snapshots trained, scored, and mapped to
the right training minutes; its last row equals an independent calft.eval of the final adapter."""
import json
import math

import pytest



from calft.tracking import missed_targets


def test_curve_rows_match_an_independent_eval(tiny_model_dir, tmp_path, monkeypatch):
    from benchmarks import calibration_curve
    from calft import eval as calft_eval

    monkeypatch.setenv("CALFT_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    train_flags = ["--num-decimals", "1", "--max-bins", "40", "--batch-size", "4", "--micro-batch-size", "2",
                   "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--no-progress"]
    result = calibration_curve.main(
        ["--model", str(tiny_model_dir), "--families", "gaussian,binomial", "--run-dir", str(run),
         "--max-steps", "4", "--snapshot-steps", "2,4", "--prompts-per-family", "2", "--samples", "3",
         "--output", str(tmp_path / "curve.json"), "--plot", str(tmp_path / "curve.png"), "--", *train_flags])
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert json.loads((tmp_path / "curve.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    rows = result["rows"]
    assert [r["step"] for r in rows] == [0, 2, 4]
    metrics = {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert [r["minutes"] for r in rows[1:]] == [metrics[2]["elapsed_s"] / 60, metrics[4]["elapsed_s"] / 60]
    # the final snapshot is the run's final adapter: scored on its own, the numbers agree
    alone = calft_eval.main(["--model", str(tiny_model_dir), "--adapter", str(run), "--families", "gaussian,binomial",
                             "--split", "test_within_range", "--max-prompts-per-family", "2", "--num-decimals", "1",
                             "--metrics", "all", "--num-samples", "3", "--no-plots", "--quiet",
                             "--output-dir", str(tmp_path / "alone")])
    exact, tracking = alone["splits"]["test_within_range"]["run"], alone["tracking"]["test_within_range"]["run"]
    base_exact = alone["splits"]["test_within_range"]["base"]
    for key in ("location_r2", "sd_within_2x", "median_ks", "median_sample_ks"):
        assert rows[-1][key] == pytest.approx(tracking[key], rel=1e-6, abs=1e-9, nan_ok=True), key  # tiny: NaN KS
    assert math.isclose(rows[-1]["support_mass"], exact["support_mass"], rel_tol=1e-6)
    assert math.isclose(rows[0]["support_mass"], base_exact["support_mass"], rel_tol=1e-6)
    assert rows[-1]["missed"] == missed_targets(tracking)
    slopes = {f: m["sample_location_slope"] for f, m in tracking["per_family"].items()}
    assert rows[-1]["family_slopes"] == pytest.approx(slopes, nan_ok=True)
    assert rows[-1]["families_below_slope"] == sum(v < 0.7 for v in slopes.values())  # NaN: not below


def test_reference_runs_are_drawn_from_their_own_evaluation(tiny_model_dir, tmp_path, monkeypatch):
    """--plot-only --reference LABEL=RUN: a finished calft.train run becomes a row with the numbers
    its end-of-training evaluation printed (eval.json), at its training minutes (summary.json)."""
    import subprocess
    import sys

    from benchmarks import calibration_curve

    monkeypatch.setenv("CALFT_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "calft.train", "--model", str(tiny_model_dir), "--output-dir", str(run),
                    "--families", "gaussian,binomial", "--max-prompts-per-family", "4", "--num-decimals", "1",
                    "--max-bins", "40", "--batch-size", "4", "--lora-r", "4", "--max-steps", "2", "--no-progress",
                    "--eval-split", "test_within_range", "--eval-exact-split", "test_within_range",
                    "--eval-prompts-per-family", "2", "--eval-bins", "40", "--eval-samples", "2"], check=True, capture_output=True)
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps({"rows": [{"model": "base", "step": 0, "minutes": 0.0, "location_r2": 0.1}]}))
    result = calibration_curve.main(["--plot-only", "--reference", f"tiny={run}", "--output", str(curve),
                                     "--plot", str(tmp_path / "curve.png")])
    ev = json.loads((run / "eval.json").read_text())["splits"]["test_within_range"]
    summary = json.loads((run / "summary.json").read_text())
    rows = json.loads(curve.read_text())["rows"]
    assert [r["model"] for r in rows] == ["base", "tiny"] and rows == json.loads(json.dumps(result["rows"]))
    ref = rows[1]
    assert ref["step"] == 2 and ref["minutes"] == summary["train_time_s"] / 60
    assert ref["support_mass"] == ev["finetuned"]["support_mass"]
    assert ref["location_r2"] == pytest.approx(ev["finetuned_tracking"]["location_r2"], nan_ok=True)
    assert ref["missed"] == missed_targets(ev["finetuned_tracking"])
    assert (tmp_path / "curve.png").stat().st_size > 0
    with pytest.raises(SystemExit):  # not LABEL=RUN_DIR of a finished run: an argparse error
        calibration_curve.main(["--plot-only", "--reference", str(run), "--output", str(curve)])
    # the same adapter scored by calft.eval (a run trained with --no-eval): the same row
    from calft import eval as calft_eval

    calft_eval.main(["--model", str(tiny_model_dir), "--adapter", str(run), "--no-base", "--families", "gaussian,binomial",
                     "--eval-split", "test_within_range", "--eval-prompts-per-family", "2", "--eval-decimals", "1",
                     "--eval-bins", "40", "--metrics", "exact", "--no-plots", "--no-progress",
                     "--output-dir", str(tmp_path / "scored")])
    result = calibration_curve.main(["--plot-only", "--reference", f"tiny={tmp_path / 'scored'}", "--output", str(curve),
                                     "--plot", str(tmp_path / "curve.png")])
    again = result["rows"][1]
    assert again["step"] == 2 and again["minutes"] == ref["minutes"]
    assert again["support_mass"] == pytest.approx(ref["support_mass"], rel=1e-6)
    assert again["location_r2"] == pytest.approx(ref["location_r2"], rel=1e-6, nan_ok=True)
