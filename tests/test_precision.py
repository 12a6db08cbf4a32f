"""--precision: bf16 autocast where the hardware computes bf16 natively, fp32 elsewhere, and the
soft-target loss of a tiny model in both (against a float64 reference)."""
import pytest
import torch

from calft import precision


@pytest.mark.parametrize("features, expected", [(["avx512_bf16"], torch.bfloat16), (["amx_bf16"], torch.bfloat16),
                                                ([], None)])
def test_auto_follows_the_cpu_features(monkeypatch, features, expected):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: features)
    assert precision.autocast_dtype("cpu", "auto") is expected
    assert precision.autocast_dtype("cuda", "auto") is torch.bfloat16  # CUDA: bf16 whatever the CPU
    assert precision.autocast_dtype("cpu", "fp32") is None and precision.autocast_dtype("cuda", "fp32") is None
    assert precision.autocast_dtype("cpu", "bf16") is torch.bfloat16
    line = precision.describe("cpu", precision.autocast_dtype("cpu", "auto"))
    assert ("bf16 autocast" in line) == bool(features) and (features[0] in line if features else "fp32" in line)
    with pytest.raises(ValueError, match="precision"):
        precision.autocast_dtype("cpu", "fp16")


def test_detection_reads_torch():
    found = precision.cpu_bf16_features()
    assert set(found) <= {"amx_bf16", "avx512_bf16"}
    assert ("avx512_bf16" in found) == bool(torch.cpu._is_avx512_bf16_supported())


@pytest.mark.parametrize("dtype, tol", [(None, 1e-5), (torch.bfloat16, 3e-2)])  # relative, beside its dtype
def test_tiny_model_loss_in_both_precisions(tiny_model_dir, dtype, tol):
    """The quick recipe's objective (tree batch, shared prompt) on the tiny model, fp32 and bf16
    autocast, against the same model in float64: loss and every LoRA gradient."""
    from calft.batching import build_tree_batch, epoch_plan, step_items
    from calft.data import DataSettings, prepare_prompts
    from calft.models import add_lora, load_model, load_tokenizer
    from calft.splits import get_split
    from calft.tree import SoftTargetKLLoss

    tok = load_tokenizer(str(tiny_model_dir))
    prompts = prepare_prompts(tok, get_split("train", max_specs=1)[:4], DataSettings(num_decimals=1, max_bins=101),
                              cache_dir=False, progress=False)
    batch = build_tree_batch(prompts, step_items(epoch_plan(prompts, seed=0, epoch=0), 0, global_batch=4),
                             pad_id=tok.pad_token_id, global_batch=4, max_nodes=0, samples_per_prompt=2, pack=True)

    def run(model_dtype, amp):
        torch.manual_seed(0)
        model = add_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0)
        for name, p in model.named_parameters():  # LoRA B starts at 0: give it values so A gets gradients
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # drawn in fp32 for both runs, then converted
        model = model.to(model_dtype)
        loss = SoftTargetKLLoss(model, autocast_dtype=amp)(batch.to("cpu"))
        loss.backward()
        return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}

    batch.targets = type(batch.targets)(batch.targets.row_ptr, batch.targets.token_ids, batch.targets.probs.double())
    batch.weights = batch.weights.double()
    ref_loss, ref_grads = run(torch.float64, None)
    batch.targets = type(batch.targets)(batch.targets.row_ptr, batch.targets.token_ids, batch.targets.probs.float())
    batch.weights = batch.weights.float()
    loss, grads = run(torch.float32, dtype)
    assert abs(loss - ref_loss) <= tol * abs(ref_loss), (float(loss), float(ref_loss))
    worst = max(((grads[n] - g).norm() / g.norm()).item() for n, g in ref_grads.items())
    assert worst <= 10 * tol, f"max relative gradient error {worst:.3g}"
