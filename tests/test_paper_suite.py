"""`python -m calft.eval --suite paper` end to end on the tiny model (every benchmark, base + SSoT +
an adapter), and its one-line errors: unknown suite, an adapter from another base model, a missing
optional dependency."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from calft import paper_suite
from calft.ssot import SYSTEM_PROMPTS, extract_answer, ssot_prompt_ids

ROOT = Path(__file__).resolve().parents[1]

TINY_SIZE = paper_suite.Size(
    structured_families=("gaussian", "binomial", "weibull"), structured_prompts_per_family=1, structured_samples=6,
    seeds=(11, 29), max_new_tokens=4, ssot_max_new_tokens=6, open_prompts=2, open_samples=4, open_max_new_tokens=3,
    mcq_questions=4, mcq_max_new_tokens=5, novelty_prompts=2, novelty_generations=3, novelty_max_new_tokens=5,
    retention={"arith_add1": 3})


def save_tiny_adapter(model_dir, out_dir, seed=0):
    """A LoRA adapter on the tiny model (random B so it changes the outputs), saved like calft.train."""
    import torch
    from peft import LoraConfig, get_peft_model

    from calft.models import load_model, quiet_peft

    torch.manual_seed(seed)
    with quiet_peft():
        model = get_peft_model(load_model(str(model_dir)), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(str(out_dir))
    (Path(out_dir) / "config.json").write_text(json.dumps({"model": str(model_dir)}))
    return out_dir


@pytest.fixture
def tiny_size(monkeypatch):
    monkeypatch.setitem(paper_suite.SIZES, "quick", TINY_SIZE)


def test_ssot_prompt_and_extraction(tiny_tokenizer):
    ids = ssot_prompt_ids(tiny_tokenizer, "Pick a number.", "numeric")
    text = tiny_tokenizer.decode(ids)
    assert "<random_string>" in text and text.index("system") < text.index("Pick a number.")
    assert ids != ssot_prompt_ids(tiny_tokenizer, "Pick a number.", "open") and set(SYSTEM_PROMPTS) == {"numeric", "open"}
    assert extract_answer("<random_string>x</random_string><thinking>t</thinking><answer> 4.2 </answer>") == "4.2"
    assert extract_answer("<answer>4.2") == ""  # not closed: strict extraction gives nothing
    assert extract_answer("<ANSWER>a</ANSWER> <answer>b</answer>") == "a"
    with pytest.raises(ValueError, match="unknown SSoT mode"):
        ssot_prompt_ids(tiny_tokenizer, "x", "poetry")


def test_suite_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path, tiny_size):
    adapter = save_tiny_adapter(tiny_model_dir, tmp_path / "soft")
    out = tmp_path / "out"
    summary = paper_suite.main(["--suite", "paper", "--model", str(tiny_model_dir), "--adapter", f"soft={adapter}",
                                "--output-dir", str(out), "--quiet", "--batch-size", "4"])
    res = summary["results"]
    assert list(res) == ["base", "ssot", "soft"]
    assert set(res["base"]) == set(paper_suite.BENCHMARKS) == set(res["soft"])
    assert set(res["ssot"]) == set(paper_suite.SSOT_BENCHMARKS)  # SSoT only where the artifact runs it
    for label in res:
        for split in ("test_selected", "ood_selected"):
            s = res[label]["structured"][split]
            assert 0 <= s["valid_rate"] <= 1 and s["num_prompts"] == (2 if split == "test_selected" else 1)
            assert all(len(r) > 3 for r in s["per_prompt"])
        og = res[label]["open_generation"]
        assert og["num_prompts"] == 2 and 0 <= og["distinct"] <= 4
    assert len(res["base"]["open_generation"]["support"]) == 21 and "support" not in res["ssot"]["open_generation"]
    assert 1 <= res["base"]["noveltybench"]["distinct"] <= 3 and res["base"]["noveltybench"]["utility"] is None
    assert res["base"]["mcq"]["num_questions"] == 4 and res["base"]["retention"]["arith_add1"]["num_items"] == 3
    # the adapter changes the model: its samples differ from the base model's
    assert res["soft"]["structured"]["test_selected"]["per_prompt"][0]["example"] != \
        res["base"]["structured"]["test_selected"]["per_prompt"][0]["example"]
    # reproducible: the same seeds give the same numbers
    again = paper_suite.main(["--suite", "paper", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "b"),
                              "--quiet", "--batch-size", "4", "--benchmarks", "structured", "--no-ssot"])
    same = [json.dumps(paper_suite._json_safe(r["base"]["structured"])) for r in (again["results"], res)]
    assert same[0] == same[1]  # (as JSON: NaN != NaN in a dict comparison)
    report = (out / "report.md").read_text()
    assert "## Summary" in report and "| soft |" in report and "| ssot |" in report and "not run" in report
    for title in ("valid rate \u2191", "W1 / sd \u2193", "MCQ: TV from uniform \u2193", "NoveltyBench: distinct \u2191"):
        assert title in report
    assert "reward model" in report  # utility is said to be absent, not faked
    assert (out / "plots" / "summary.png").stat().st_size > 0 and json.loads((out / "summary.json").read_text())


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "calft.eval", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, **kwargs)


def test_help_finds_the_suite():
    plain = run_cli("--help")  # a user who never read the docs learns the suite exists
    assert plain.returncode == 0 and "--suite paper" in " ".join(plain.stdout.split())
    suite = run_cli("--suite", "paper", "--help")
    text = " ".join(suite.stdout.split())
    assert suite.returncode == 0
    assert all(name in text for name in ("structured", "open_generation", "mcq", "noveltybench", "retention", "--size"))


def test_unknown_suite_is_one_line_exit_2():
    proc = run_cli("--suite", "nope")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["calft.eval: error: unknown --suite 'nope'; known: paper"]


def test_adapter_from_another_base_model(tiny_model_dir, tmp_path, tiny_size, capsys):
    from tiny import make_tiny_model

    other = tmp_path / "other_model"
    make_tiny_model(other, hidden=48)
    adapter = save_tiny_adapter(other, tmp_path / "other_adapter")
    with pytest.raises(ValueError, match="was trained on") as err:
        paper_suite.main(["--suite", "paper", "--model", str(tiny_model_dir), "--adapter", f"x={adapter}",
                          "--output-dir", str(tmp_path / "o")])
    assert "\n" not in str(err.value)
    (adapter / "config.json").unlink()  # no calft record: the test load catches the shape mismatch
    with pytest.raises(ValueError, match="does not fit --model") as err:
        paper_suite.main(["--suite", "paper", "--model", str(tiny_model_dir), "--adapter", f"x={adapter}",
                          "--output-dir", str(tmp_path / "o")])
    assert "\n" not in str(err.value)
    capsys.readouterr()  # only what the CLI call writes counts below
    with pytest.raises(SystemExit) as exit_:  # the CLI wrapper: one line on stderr, status 2
        paper_suite.cli(["--suite", "paper", "--model", str(tiny_model_dir), "--adapter", f"x={adapter}",
                         "--output-dir", str(tmp_path / "o")])
    assert exit_.value.code == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1, err_lines
    line = err_lines[0]
    assert line.startswith("calft.eval: error: --adapter x=") and "size mismatch" in line
    assert not (tmp_path / "o").exists()  # failed before writing anything


def test_bad_adapter_and_benchmark_arguments(tmp_path):
    with pytest.raises(ValueError, match="not a saved PEFT adapter"):
        paper_suite.main(["--suite", "paper", "--adapter", f"soft={tmp_path}"])
    with pytest.raises(ValueError, match="unknown --benchmarks"):
        paper_suite.main(["--suite", "paper", "--benchmarks", "structured,mmlu"])


def test_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch, capsys):
    # rouge_score made unimportable (None in sys.modules): one line naming the package and the extra
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    with pytest.raises(SystemExit) as exit_:
        paper_suite.cli(["--suite", "paper", "--benchmarks", "noveltybench", "--output-dir", str(tmp_path / "o")])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("calft.eval: error: the noveltybench benchmark needs the package 'rouge-score'")
    assert '.[paper]' in line and not (tmp_path / "o").exists()
