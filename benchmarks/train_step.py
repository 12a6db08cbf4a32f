"""One optimizer step of calft vs the usual way, same model, same batch of 8 prompts.

    python -m benchmarks.train_step                 # CPU (and GPU when present), writes JSON
    python -m benchmarks.train_step --repeats 3     # shorter
(Run it as a module from the repository root: as a script, benchmarks/ would lead sys.path and
benchmarks/kernels.py would shadow the `kernels` package that transformers probes for.)

- calft: the decoder body only, the N trained rows of its last hidden state gathered, then the
  fused LM-head + sparse soft-target KL (calft.batching.SoftTargetKLLoss; no [B, T, V] logits).
- usual: the HF forward computing logits at every position ([B, T, V]), then a Python loop over
  the trained positions: log_softmax of that row, index the target ids, KL, weighted sum.
Both: same LoRA (r=16 on q/k/v/o), AdamW, the paper's soft targets (5 decimals, 1001 bins).

Each variant runs in its own subprocess so that its peak memory is its own: on CPU the peak is
the rise of the resident set (VmHWM, reset through /proc/self/clear_refs) over the resident size
before the measured steps, with glibc told to mmap every block >= 64 KiB (MALLOC_MMAP_THRESHOLD_)
so that freed tensors leave the resident set at once instead of being reused from a heap that the
warm-up step grew; on CUDA it is torch.cuda.max_memory_allocated minus the allocation before them.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# `python benchmarks/train_step.py` puts benchmarks/ first on sys.path, where kernels.py would
# shadow the `kernels` package that transformers probes for: put the repository root there instead.
if __package__ in (None, ""):
    sys.path[0] = str(ROOT)
RESULTS = ROOT / "benchmarks" / "results"


# A Qwen3-0.6B-shaped model with random weights, built from its config (no download): the
# shapes of Qwen/Qwen3-0.6B's config.json (28 layers, H = 1024, 16/8 heads of 128, V = 151936,
# tied embeddings). The embedded SmolLM2 tokenizer (49152 ids, a subset of V) makes the batch.
QWEN3_RANDOM = "qwen3-0.6b-random"


def qwen3_0p6b_random(dtype, device):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype).to(device)


def make_setup(model_name: str, device: str, batch_prompts: int = 8, tokenizer: str = ""):
    """The shared factory: model with LoRA, optimizer, and one soft-target batch of 8 prompts."""
    from calft.batching import build_batch, epoch_plan
    from calft.data import DataSettings, prepare_prompts
    from calft.models import add_lora, load_model, load_tokenizer
    from calft.splits import get_split

    random_qwen3 = model_name == QWEN3_RANDOM
    tok = load_tokenizer(tokenizer or ("smollm2-135m-instruct" if random_qwen3 else model_name))
    # one prompt each of the first families; a prompt more per family for every 24 asked
    specs = get_split("train", max_specs=-(-batch_prompts // 24))[:batch_prompts]
    prompts = prepare_prompts(tok, specs, DataSettings(num_decimals=5, max_bins=1001), progress=False)
    batch = build_batch(prompts, epoch_plan(prompts, seed=0, epoch=0), mode="soft", pad_id=tok.pad_token_id,
                        eos_id=tok.eos_token_id, global_batch=len(prompts)).to(device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = qwen3_0p6b_random(dtype, device) if random_qwen3 else load_model(model_name, dtype=dtype, device=device)
    model = add_lora(base, dropout=0.0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)
    return model, opt, batch


def usual_loss(model, batch):
    """Full logits at every position, then one small KL per trained position (a Python loop)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, T, V]
    flat = logits.reshape(-1, logits.shape[-1])  # [B*T, V]
    t = batch.targets
    row_ptr = t.row_ptr.tolist()
    loss = flat.new_zeros((), dtype=torch.float32)
    for r, pos in enumerate(batch.gather_index.tolist()):
        logp = torch.log_softmax(flat[pos].float(), dim=-1)
        ids, q = t.token_ids[row_ptr[r]:row_ptr[r + 1]], t.probs[row_ptr[r]:row_ptr[r + 1]]
        loss = loss + batch.weights[r] * (q * (q.log() - logp.index_select(0, ids))).sum()
    return loss


def worker(variant: str, model_name: str, device: str, repeats: int, batch_prompts: int = 8,
           tokenizer: str = "") -> dict:
    """Time `repeats` full steps (forward, backward, AdamW) after one warm-up step."""
    from calft.tree import SoftTargetKLLoss

    model, opt, batch = make_setup(model_name, device, batch_prompts, tokenizer)
    objective = SoftTargetKLLoss(model, autocast_dtype=torch.bfloat16 if device == "cuda" else None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        if variant == "calft":
            loss = objective(batch)
        else:
            with amp:
                loss = usual_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    step()  # warm-up (allocator, autotuning)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    times, losses = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes("VmHWM")) - base
    median = statistics.median(times)
    return {"variant": variant, "device": device, "model": model_name, "repeats": repeats,
            "batch_sequences": int(batch.input_ids.shape[0]), "seq_len": int(batch.input_ids.shape[1]),
            "trained_positions": int(batch.gather_index.numel()), "target_entries": int(batch.targets.nnz),
            "vocab": int(model.config.vocab_size), "median_step_s": median, "times_s": times,
            "peak_extra_mb": peak / 2**20, "positions_per_s": batch.gather_index.numel() / median,
            "first_loss": losses[0]}


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help=f"model id/dir (default: embedded SmolLM2); {QWEN3_RANDOM} = Qwen3-0.6B shapes, random weights")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where train_step_<device>.json goes")
    ap.add_argument("--repeats", type=int, default=5, help="measured steps per variant (after 1 warm-up)")
    ap.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu (+ cuda if present)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker; 0 = torch's default")
    ap.add_argument("--batch-prompts", type=int, default=8, help="prompts in the batch (one sampled answer each)")
    ap.add_argument("--tokenizer", default="", help="tokenizer dir for the batch ('' = the model's; the embedded "
                    f"SmolLM2's for {QWEN3_RANDOM})")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        variant, device = args.worker.split(":")
        print(json.dumps(worker(variant, args.model, device, args.repeats, args.batch_prompts, args.tokenizer)))
        return
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if args.devices == "auto" \
        else args.devices.split(",")
    results = []
    for device in devices:
        for variant in ("calft", "usual"):
            cmd = [sys.executable, "-m", "benchmarks.train_step", "--model", args.model, "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--batch-prompts", str(args.batch_prompts),
                   "--tokenizer", args.tokenizer, "--worker", f"{variant}:{device}"]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode:
                raise SystemExit(f"{variant} on {device} failed:\n{proc.stderr[-4000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'device':6} {'variant':7} {'step ms':>9} {'peak MB':>9} {'positions/s':>12} {'loss':>9}  speedup  mem ratio")
    for r in results:
        ref = next(x for x in results if x["device"] == r["device"] and x["variant"] == "usual")
        r["speedup_vs_usual"] = ref["median_step_s"] / r["median_step_s"]
        r["memory_ratio_vs_usual"] = r["peak_extra_mb"] / ref["peak_extra_mb"]
        print(f"{r['device']:6} {r['variant']:7} {1e3 * r['median_step_s']:9.0f} {r['peak_extra_mb']:9.0f} "
              f"{r['positions_per_s']:12.1f} {r['first_loss']:9.4f}  {r['speedup_vs_usual']:6.2f}x  "
              f"{r['memory_ratio_vs_usual']:6.2f}")
    first = results[0]
    print(f"batch: {first['batch_sequences']} sequences x {first['seq_len']} tokens, "
          f"{first['trained_positions']} trained positions, {first['target_entries']} target entries, V={first['vocab']}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for device in devices:
        suffix = "" if args.batch_prompts == 8 else f"_b{args.batch_prompts}"
        path = args.out_dir / f"train_step_{device}{suffix}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"benchmark": "train_step", "threads": args.threads or torch.get_num_threads(),
                                   "results": [r for r in results if r["device"] == device]}, indent=2))
        os.replace(tmp, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
