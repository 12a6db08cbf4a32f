"""bf16 autocast vs fp32 on CPU for calft's two real workloads, interleaved in one process.

    python -m benchmarks.precision                         # embedded SmolLM2, writes results/precision_cpu.json
    python -m benchmarks.precision --threads 2 --repeats 6
    python -m benchmarks.precision --adapter runs/quick    # sample from a trained adapter (short answers)

1. A training step of the quick recipe (settings from calft/train_config.py: the quick recipe over TrainConfig's
   defaults): its first batches (calft.data, calft.batching.build_tree_batch: share_prompt, trie_pack,
   samples_per_prompt), SoftTargetKLLoss(autocast_dtype=None or bf16, off_support_weight), backward,
   clipping and AdamW, timed together; step s uses batch s in both precisions. Two model copies
   from the same seed (same LoRA init, fresh AdamW), one per precision: each follows its own
   trajectory as a real run does, nothing is copied inside the timed loop, and the first step (the
   warm-up, batch 0) sees identical weights, so its losses differ by the precision alone.
   Reported: median seconds, fp32 / bf16, the first loss's relative difference.
2. Sampling: calft.batch_sampling.sample_prompts as calft.sampling.evaluate_sampling calls it, under
   torch.autocast("cpu", bf16) as calft.scoring.evaluate_models puts it, or in fp32; --sample-prompts
   test_within_range prompts (one per family) x --samples answers, the same seeds. Reported:
   answers/s, fp32 / bf16, the fraction of identical answers, mean answer tokens (re-tokenized).
   The model carries an untrained LoRA (its compute; the base model's prose answers run to 32
   tokens) unless --adapter gives a trained one.
Each workload: one warm-up call per precision, then --repeats pairs, the order alternating.
(Run it as a module from the repository root, as benchmarks/train_step.py explains.)
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as calft.train: shared cores

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import format_table, machine_info, write_json  # noqa: E402
from calft.models import DEFAULT_MODEL, add_lora, load_model, load_tokenizer, quiet_peft  # noqa: E402
from calft.precision import cpu_bf16_features  # noqa: E402
from calft.train_config import RECIPES, TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def quick_recipe() -> dict:
    """calft.train's quick-recipe settings: TrainConfig's defaults, then the quick recipe's."""
    return asdict(TrainConfig(**RECIPES["quick"]))


def interleaved(calls: dict, repeats: int) -> dict:
    """{name: (seconds of each timed call, result of each call)}: one warm-up each, then `repeats`
    rounds calling every entry, the order reversed every other round."""
    out = {name: ([], [fn(0)]) for name, fn in calls.items()}  # warm-up: call 0
    for r in range(1, repeats + 1):
        for name in (list(calls) if r % 2 else list(calls)[::-1]):
            t0 = time.perf_counter()
            result = calls[name](r)
            out[name][0].append(time.perf_counter() - t0)
            out[name][1].append(result)
    return out


def train_batches(tokenizer, cfg: dict, n: int, prompts_per_family: int) -> list:
    """The first n batches of the quick recipe's plan (one micro-batch per step, as --batch-size 8
    with --micro-batch-size 8), over prompts_per_family training prompts per family."""
    from calft.batching import build_tree_batch, epoch_plan, step_items
    from calft.data import DataSettings, prepare_prompts
    from calft.splits import get_split

    prompts = prepare_prompts(tokenizer, get_split("train", max_specs=prompts_per_family),
                              DataSettings(num_decimals=cfg["num_decimals"], max_bins=cfg["max_bins"]), progress=False)
    plan, B = epoch_plan(prompts, seed=cfg["seed"], epoch=0), cfg["batch_size"]
    if len(plan) < B:
        raise SystemExit(f"{len(plan)} prompts are fewer than one batch of {B}")
    return [build_tree_batch(prompts, step_items(plan, s % (len(plan) // B), global_batch=B), global_batch=B,
                             pad_id=tokenizer.pad_token_id, max_nodes=0,  # share_prompt: sampled paths only
                             samples_per_prompt=cfg["samples_per_prompt"], seed=cfg["seed"], epoch=0,
                             pack=cfg["trie_pack"]) for s in range(n)]


def bench_train(model_name: str, tokenizer, repeats: int, prompts_per_family: int) -> dict:
    from calft.tree import SoftTargetKLLoss

    cfg = quick_recipe()
    batches = train_batches(tokenizer, cfg, repeats + 1, prompts_per_family)
    calls = {}
    for name, dtype in PRECISIONS.items():
        torch.manual_seed(cfg["seed"])  # the same LoRA init for both copies
        model = add_lora(load_model(model_name, dtype=torch.float32), r=cfg["lora_r"], alpha=cfg["lora_alpha"],
                         dropout=cfg["lora_dropout"], target_modules=cfg["lora_targets"])
        model.train()
        objective = SoftTargetKLLoss(model, autocast_dtype=dtype, off_support_weight=cfg["off_support_weight"])
        trainable = [p for p in objective.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.999))

        def step(s, objective=objective, trainable=trainable, optimizer=optimizer):
            loss = objective(batches[s])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        calls[name] = step
    runs = interleaved(calls, repeats)
    out = {name: {"median_s": statistics.median(t), "times_s": t, "losses": losses} for name, (t, losses) in runs.items()}
    first = out["fp32"]["losses"][0]
    out.update(ratio_fp32_over_bf16=out["fp32"]["median_s"] / out["bf16"]["median_s"],
               first_loss_rel_diff=abs(out["bf16"]["losses"][0] - first) / abs(first),
               recipe={k: cfg[k] for k in ("batch_size", "samples_per_prompt", "share_prompt", "trie_pack", "num_decimals",
                                           "max_bins", "off_support_weight", "lora_r", "lora_targets", "lr", "seed")},
               batch_shapes=[list(b.input_ids.shape) for b in batches],
               trained_rows=[int(b.gather_index.numel()) for b in batches])
    return out


def bench_sampling(model_name: str, tokenizer, repeats: int, num_prompts: int, samples: int, adapter: str = "") -> dict:
    from peft import PeftModel

    from calft.batch_sampling import sample_prompts
    from calft.data import DataSettings, prepare_prompts
    from calft.splits import get_split

    cfg = quick_recipe()
    preps = prepare_prompts(tokenizer, get_split("test_within_range", max_specs=1)[:num_prompts],
                            DataSettings(num_decimals=cfg["eval_decimals"], max_bins=cfg["eval_bins"]), progress=False)
    torch.manual_seed(cfg["seed"])
    model = load_model(model_name, dtype=torch.float32)
    with quiet_peft():
        model = (PeftModel.from_pretrained(model, adapter) if adapter else
                 add_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"], target_modules=cfg["lora_targets"])).eval()

    def sampler(dtype):
        def run(_):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                return sample_prompts(model, tokenizer, [p.prompt_ids for p in preps], samples, seed=cfg["seed"],
                                      prompt_keys=[p.text for p in preps], max_rows=1024, max_new_tokens=32)
        return run

    runs = interleaved({name: sampler(dtype) for name, dtype in PRECISIONS.items()}, repeats)
    answers = {name: [a for prompt in outs[0] for a in prompt] for name, (_, outs) in runs.items()}
    out = {name: {"median_s": statistics.median(t), "times_s": t, "answers_per_s": len(answers[name]) / statistics.median(t),
                  "mean_answer_tokens": statistics.mean(len(tokenizer(a, add_special_tokens=False).input_ids)
                                                        for a in answers[name])}
           for name, (t, _) in runs.items()}
    out.update(ratio_fp32_over_bf16=out["fp32"]["median_s"] / out["bf16"]["median_s"],
               identical_fraction=sum(a == b for a, b in zip(answers["fp32"], answers["bf16"])) / len(answers["fp32"]),
               prompts=len(preps), samples_per_prompt=samples, adapter=adapter or None)
    return out


def main(argv=None) -> dict:
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__, formatter_class=fmt)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model id/dir; smollm2-135m-instruct = the embedded one")
    p.add_argument("--tokenizer", default="", help="tokenizer id/dir ('' = the model's)")
    p.add_argument("--repeats", type=int, default=4, help="timed (fp32, bf16) pairs per workload, after 1 warm-up each")
    p.add_argument("--prompts-per-family", type=int, default=quick_recipe()["max_prompts_per_family"],
                   help="training prompts per family the batches are planned over (the quick recipe's; "
                   "the prepared data is cached as calft.train's)")
    p.add_argument("--sample-prompts", type=int, default=4, help="test_within_range prompts sampled (one per family)")
    p.add_argument("--samples", type=int, default=100, help="answers sampled per prompt (the quick recipe's eval_samples)")
    p.add_argument("--adapter", default="", help="a trained LoRA adapter dir to sample from ('' = a fresh, untrained LoRA)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--skip", choices=("", "train", "sampling"), default="", help="leave one workload out")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "precision_cpu.json"), help="JSON result")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    result = {"benchmark": "precision", "machine": machine_info("cpu"), "torch_threads": torch.get_num_threads(),
              "cpu_bf16_features": cpu_bf16_features(), "model": args.model, "repeats": args.repeats}
    if args.skip != "train":
        result["train"] = bench_train(args.model, tokenizer, args.repeats, args.prompts_per_family)
        gc.collect()  # the two training copies go before the sampling model loads
    if args.skip != "sampling":
        result["sampling"] = bench_sampling(args.model, tokenizer, args.repeats, args.sample_prompts, args.samples, args.adapter)
    rows = []
    for work in ("train", "sampling"):
        for name in PRECISIONS if work in result else ():
            r = result[work][name]
            rows.append({"workload": work, "precision": name, "median_s": r["median_s"],
                         "rate": r.get("answers_per_s"), "fp32_over_bf16": result[work]["ratio_fp32_over_bf16"],
                         "note": (f"first loss {r['losses'][0]:.5f}" if work == "train" else
                                  f"{r['mean_answer_tokens']:.1f} tokens/answer")})
    print(format_table(rows, [("workload", "workload", ""), ("precision", "precision", ""), ("median_s", "median s", ".3f"),
                              ("rate", "answers/s", ".1f"), ("fp32_over_bf16", "fp32/bf16", ".2f"), ("note", "", "")]))
    print(f"threads {result['torch_threads']}, native bf16: {', '.join(result['cpu_bf16_features']) or 'none'}"
          + (f"; first-loss relative difference {result['train']['first_loss_rel_diff']:.2e}" if "train" in result else "")
          + (f"; identical answers {result['sampling']['identical_fraction']:.1%}" if "sampling" in result else ""))
    write_json(Path(args.output), result)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
