"""benchmarks/precision.py on the tiny model: both precisions timed, ratios from the reported
medians, and the fp32 first loss equal to the quick recipe's loss computed here on its own (a
fresh model, the batch unpacked, the full forward instead of the shared prefix)."""
import json

import pytest
import torch


def test_precision_benchmark_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    from benchmarks import precision
    from calft.batching import build_tree_batch, epoch_plan
    from calft.data import DataSettings, prepare_prompts
    from calft.models import add_lora, load_model, load_tokenizer
    from calft.splits import get_split
    from calft.tree import SoftTargetKLLoss

    monkeypatch.setenv("CALFT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "precision.json"
    threads = torch.get_num_threads()  # recorded as set, without changing this process's count
    result = precision.main(["--model", str(tiny_model_dir), "--repeats", "1", "--prompts-per-family", "1",
                             "--sample-prompts", "2", "--samples", "4", "--threads", str(threads), "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["torch_threads"] == threads and saved["cpu_bf16_features"] == result["cpu_bf16_features"]
    for work in ("train", "sampling"):
        medians = {name: saved[work][name]["median_s"] for name in ("fp32", "bf16")}
        assert all(t > 0 for name in medians for t in saved[work][name]["times_s"])
        assert saved[work]["ratio_fp32_over_bf16"] == pytest.approx(medians["fp32"] / medians["bf16"], rel=1e-12)
    sampling = saved["sampling"]
    assert sampling["fp32"]["answers_per_s"] == pytest.approx(2 * 4 / sampling["fp32"]["median_s"])
    assert 0 <= sampling["identical_fraction"] <= 1
    train = saved["train"]
    assert train["recipe"]["share_prompt"] and train["recipe"]["samples_per_prompt"] == 4
    assert all(len(train[name]["losses"]) == 2 for name in ("fp32", "bf16"))  # warm-up + 1 timed step

    # the first step's loss, from scratch: quick-recipe LoRA on a fresh load, fp32, no autocast
    cfg = precision.quick_recipe()
    tok = load_tokenizer(str(tiny_model_dir))
    prompts = prepare_prompts(tok, get_split("train", max_specs=1), DataSettings(num_decimals=1, max_bins=1001),
                              progress=False)
    items = epoch_plan(prompts, seed=0, epoch=0)[:8]
    batch = build_tree_batch(prompts, items, pad_id=tok.pad_token_id, global_batch=8, max_nodes=0,
                             samples_per_prompt=4, seed=0, epoch=0, pack=False)
    torch.manual_seed(0)
    model = add_lora(load_model(str(tiny_model_dir)), r=16, alpha=32.0, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        expected = float(SoftTargetKLLoss(model, share_prefix=False, off_support_weight=cfg["off_support_weight"])(batch))
    assert cfg["off_support_weight"] == 1.0 and not torch.is_autocast_enabled("cpu")
    # equal to fp32 rounding (bit-equal here); the bf16 loss is ~2e-6 off even on this tiny model
    assert train["fp32"]["losses"][0] == pytest.approx(expected, rel=3e-7)
    # bf16 computes the same loss in another precision: close, not equal
    assert 0 < train["first_loss_rel_diff"] < 1e-2
