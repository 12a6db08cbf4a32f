"""Calibration fine-tuning with LoRA: soft (trie) targets, hard (sampled string) targets, or trie mode.

Run (a single process, CPU or one GPU):
    python -m calft.train                                  # quick recipe, embedded SmolLM2 (< 10 min on 2 CPU cores)
    python -m calft.train --recipe long                    # 960 steps: meets the pooled sampled targets (~35 min)
    python -m calft.train --recipe paper-soft --model Qwen/Qwen3-0.6B --output-dir runs/qwen-soft
    python -m calft.train --output-dir runs/quick --resume # continue an interrupted run exactly
Scale out (the global --batch-size is kept; accumulation = batch / (micro batch x processes)):
    torchrun --nproc-per-node=4 -m calft.train --recipe paper-soft --model Qwen/Qwen3-8B
    torchrun --nproc-per-node=8 -m calft.train --recipe paper-soft --model google/gemma-3-27b-it --fsdp
Every option: python -m calft.train --help

The script reads top to bottom (nanoGPT's order): config, setup, data, model + PEFT, optimizer
and schedule, one training loop, evaluation (calft.train_eval, calft.eval's code path). The
objective: calft/batching.py (positions, targets, weights), calft/tree.py (SoftTargetKLLoss) and
calft/losses.py (the fused LM-head + sparse KL).

Reliability (calft/run_dir.py, calft/checkpoint.py): checkpoints every --checkpoint-interval
steps, at the end, on SIGINT/SIGTERM (exit status 128 + signal) and on a non-finite loss (exit 3);
--resume continues bit for bit at the same thread count; bad flags fail before any work (exit 2);
one process per run dir.
Scale-out: DDP or FSDP2 (--fsdp: one fully_shard unit per block); each rank takes a slice of every
global batch (loss weights normalized globally); rank 0 checkpoints and evaluates (not under --fsdp).
"""
import gc
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np

# With both cores busy, OpenMP's default spin-waiting makes torch's CPU threads 5-10x slower; a
# passive wait costs nothing when the machine is idle. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from tqdm import tqdm  # noqa: E402

from calft import checkpoint, fileio, run_dir  # noqa: E402
from calft.batching import (build_batch, build_tree_batch, epoch_plan, epoch_size, global_num_positions,  # noqa: E402
                            micro_batches, step_items, steps_per_epoch)
from calft.cli import comma_list  # noqa: E402
from calft.data import DataSettings, prepare_prompts  # noqa: E402
from calft.families import get_family  # noqa: E402
from calft.models import (add_lora, check_model_files, check_training_memory,  # noqa: E402
                          decoder, load_model, load_tokenizer)
from calft.precision import autocast_dtype as precision_dtype, describe as describe_precision  # noqa: E402
from calft.prompts import set_reasoning_effort, terminator_ids  # noqa: E402
from calft.splits import drawn_train_specs, get_split  # noqa: E402
from calft.train_config import (RUN_ONLY_FIELDS, TrainConfig, check_config, parse_config,  # noqa: E402
                                parse_family_draws, parse_family_weights)
from calft.train_eval import evaluate_after_training  # noqa: E402
from calft.tree import SoftTargetKLLoss  # noqa: E402


# ------------------------------------------------------------------------------------------------
# config (calft/train_config.py): every knob is a TrainConfig field and a CLI flag; --recipe sets defaults

t_launch = time.time()
cfg = parse_config()


def fail(message: str, status: int = 2):
    """A one-line error, no traceback; status 2 = bad input (before any work), 1 = a fault in the run."""
    print(f"calft.train: error: {message}", file=sys.stderr, flush=True)
    fileio.release_locks()
    sys.exit(status)


# ------------------------------------------------------------------------------------------------
# setup: validate everything cheap first, then processes, device, seeds, output dir

def disk_fault(what):  # a full disk or a link where calft writes: one line, exit 1; --resume continues
    return fileio.write_errors(lambda why: fail(f"could not write {what} ({why}); nothing written before is "
                                                "lost: free space and continue with --resume", 1))


try:  # every flag, the split and the model's layout before anything is written (exit 2, no run dir)
    families = comma_list(cfg.families) or None
    for fam in families or ():
        if get_family(fam).held_out and cfg.train_split == "train":
            raise ValueError(f"family {fam!r} is held out (docs/method.md, section 'Families and grids'): it is never trained on")
    check_config(cfg)
    set_reasoning_effort(cfg.reasoning_effort)  # before any prompt is rendered
    tokenizer = load_tokenizer(cfg.model)  # bad path / no EOS token -> ValueError here
    check_model_files(cfg.model)  # a tokenizer without weights -> ValueError here
    specs = get_split(cfg.train_split, families=families,
                      max_specs=None if cfg.max_prompts_per_family < 0 else cfg.max_prompts_per_family)
    family_draws = parse_family_draws(cfg.family_draws)
    if unknown := set(family_draws) - {sp.family_id for sp in specs}:
        raise ValueError(f"--family-draws: {', '.join(sorted(unknown))} not among the families trained on")
    # denser parameters inside the same ranges; the test splits stay unseen
    specs += [sp for fid in dict.fromkeys(sp.family_id for sp in specs)
              for sp in drawn_train_specs(fid, family_draws.get(fid, cfg.param_draws), seed=cfg.seed)]
    family_weights = parse_family_weights(cfg.family_weights)
    if unknown := set(family_weights) - {sp.family_id for sp in specs}:
        raise ValueError(f"--family-weights: {', '.join(sorted(unknown))} not among the families trained on")
    tree_batches = cfg.mode == "trie" or cfg.share_prompt  # one tree item per prompt: the batch counts prompts
    items_per_epoch = (epoch_size([sp.family_id for sp in specs], balance_families=cfg.family_balance,
                                  family_weights=family_weights)
                       * (1 if tree_batches else cfg.samples_per_prompt))
    spe = steps_per_epoch(items_per_epoch, cfg.batch_size, keep_last=cfg.keep_last_batch)
    max_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * spe
    check_training_memory(cfg.model, cfg.lora_targets, cfg.lora_r, items_per_epoch,  # LoRA targets too
                          on_gpu=cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()))
except (ValueError, OSError) as err:  # OSError: the embedded model's first conversion on a full disk
    fail(fileio.describe_error(err), 1 + isinstance(err, ValueError))

distributed = "RANK" in os.environ
if cfg.fsdp and not distributed:
    fail("--fsdp needs several processes: launch with torchrun --nproc-per-node=N -m calft.train")
if cfg.device == "auto":
    cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
if distributed:
    dist.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
    rank, world_size, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{local_rank}"
        torch.cuda.set_device(cfg.device)
else:
    rank, world_size = 0, 1
master = rank == 0
device = torch.device(cfg.device)
cfg.micro_batch_size = min(cfg.micro_batch_size, max(1, cfg.batch_size // world_size))
if cfg.batch_size % (cfg.micro_batch_size * world_size):
    fail(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size "
         f"{cfg.micro_batch_size} x {world_size} processes")
grad_accum = cfg.batch_size // (cfg.micro_batch_size * world_size)
autocast_dtype = precision_dtype(device.type, cfg.precision)  # bf16 where native; LoRA weights and loss stay fp32

# The run directory (calft.run_dir.claim_run_dir): only a directory calft started a run in (its
# marker) is reused, resumed or overwritten; one process at a time (an flock held until exit).
out_dir = Path(cfg.output_dir)
ckpt_dir = out_dir / run_dir.CKPT
metrics_path = out_dir / "metrics.jsonl"
claimed = None  # "new", "resume" or "finished" (rank 0)
if master:
    try:
        claimed = run_dir.claim_run_dir(out_dir, asdict(cfg), RUN_ONLY_FIELDS, resume=cfg.resume,
                                        overwrite=cfg.overwrite, max_steps=max_steps, defaults=asdict(TrainConfig()))
    except (run_dir.RunDirError, OSError) as err:  # OSError: the marker or config.json on a full disk
        fail(fileio.describe_error(err), 1 + isinstance(err, ValueError))
    print(json.dumps(asdict(cfg), indent=2))
    print(f"processes: {world_size}, device: {device}, gradient accumulation: {grad_accum}; "
          f"{describe_precision(device.type, autocast_dtype)}")
if distributed:
    dist.barrier()

random.seed(cfg.seed)
np.random.seed(cfg.seed)
torch.manual_seed(cfg.seed)

# ------------------------------------------------------------------------------------------------
# data: prompts -> supports -> tries (cached on disk by calft.data); rank 0 fills the cache first

settings = DataSettings(num_decimals=cfg.num_decimals, max_bins=cfg.max_bins)
for turn in (0, 1) if distributed else (0,):
    if (turn == 0) == master:
        with disk_fault("the prepared-data cache"):  # its temp file is removed
            prompts = prepare_prompts(tokenizer, specs, settings, progress=master and cfg.progress)
    if distributed:
        dist.barrier()
# the answer's terminator comes from the chat template (Gemma: <end_of_turn>, not <eos>)
eos_id, pad_id = terminator_ids(tokenizer), tokenizer.pad_token_id
snapshot_steps = {int(x) for x in comma_list(cfg.snapshot_steps)}
if master and snapshot_steps and max(snapshot_steps) > max_steps:  # steps set by --epochs
    print(f"calft.train: warning: --snapshot-steps past the last step ({max_steps}) are never "
          f"reached: {sorted(s for s in snapshot_steps if s > max_steps)}", file=sys.stderr, flush=True)
if master:
    num_families = len({p.spec.family_id for p in prompts})
    print(f"{len(prompts)} prompts from {num_families} famil{'y' if num_families == 1 else 'ies'}, "
          f"{items_per_epoch} {'prompts' if tree_batches else 'sequences'}/epoch, {spe} steps/epoch, "
          f"{max_steps} steps" + (f" (family weights: {cfg.family_weights})" if family_weights else "")
          + (f" (family draws: {cfg.family_draws})" if cfg.family_draws else "")
          + (f" ({cfg.samples_per_prompt} target + {cfg.uniform_paths} uniform paths per prompt)" if cfg.uniform_paths else "")
          + (f" (log-ratio term x {cfg.log_ratio_weight:g}"
             + (f", Huber cap {cfg.log_ratio_cap:g}" if cfg.log_ratio_cap else "") + ")" if cfg.log_ratio_weight else ""))

# ------------------------------------------------------------------------------------------------
# model + PEFT: frozen base (bf16 on CUDA, fp32 on CPU), fp32 LoRA weights

try:
    model = load_model(cfg.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
except ValueError as err:
    fail(str(err))
if model.config.vocab_size < len(tokenizer):
    fail(f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
try:
    model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     target_modules=cfg.lora_targets)
except ValueError as err:
    fail(str(err))
model.train()
objective = SoftTargetKLLoss(model, autocast_dtype=autocast_dtype, share_prefix=not cfg.fsdp,
                             off_support_weight=cfg.off_support_weight, log_ratio_weight=cfg.log_ratio_weight,
                             log_ratio_cap=cfg.log_ratio_cap)
trainable = [p for p in objective.parameters() if p.requires_grad]
if cfg.fsdp:
    mp = (MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)  # CPU: fp32 params under autocast
          if autocast_dtype and device.type == "cuda" else MixedPrecisionPolicy())
    for layer in decoder(model).layers:  # one FSDP unit per transformer block, then the root
        fully_shard(layer, mp_policy=mp)
    fully_shard(objective, mp_policy=mp)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    wrapped = objective
elif distributed:
    wrapped = torch.nn.parallel.DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
else:
    wrapped = objective
if master:
    n_train, n_all = sum(p.numel() for p in trainable), sum(p.numel() for p in objective.parameters())
    print(f"trainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%)")

# ------------------------------------------------------------------------------------------------
# optimizer and schedule (linear warmup, cosine decay; a pure function of the step)

optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
# hf: transformers' get_cosine_schedule_with_warmup (the artifact's), W = int(frac x S), and the
# optimizer step s runs at lr x s/W (step 0 at lr 0); ceil: W = ceil(frac x S), lr x (s+1)/W.
hf_warmup = cfg.warmup_rule == "hf"
warmup_steps = int(max_steps * cfg.warmup_frac) if hf_warmup else math.ceil(cfg.warmup_frac * max_steps)


def get_lr(step: int) -> float:
    """lr(s) = lr*(s+1)/W (hf: lr*s/W) for s < W, then min + (lr-min)*(1 + cos(pi*(s-W)/(S-W)))/2."""
    if step < warmup_steps:
        return cfg.lr * (step + (0 if hf_warmup else 1)) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------
# checkpoints (calft/checkpoint.py): trainable tensors + optimizer + RNG states as safetensors,
# the rest as JSON, written to a temp dir and rotated in; nothing is unpickled on --resume

trainable_names = {n for n, p in objective.named_parameters() if p.requires_grad}


def save_checkpoint(step: int):
    """Collective under FSDP (every rank gathers), then rank 0 writes ckpt_dir atomically."""
    lora, optim, rng = checkpoint.gather_training_state(objective, optimizer, trainable_names,
                                                        with_cuda=device.type == "cuda", world_size=world_size)
    if not master:
        return
    meta = {"step": step, "epoch": step // spe, "step_in_epoch": step % spe, "config": asdict(cfg),
            "train_time_s": elapsed_before + time.time() - t_start, "tokens": tokens_before + tokens_seen,
            "loss": last_loss, "segments": segment, "threads": torch.get_num_threads(), "world_size": world_size}
    try:
        checkpoint.save_training_state(out_dir, model, lora, optim, rng, meta)
    except checkpoint.CheckpointError as err:
        fail(str(err), status=1)


def save_snapshot(step: int):
    """The adapter after `step` in snapshots/step_<step> (collective under FSDP)."""
    adapter = checkpoint.adapter_state(checkpoint.trainable_state(objective, trainable_names))
    if master:
        with disk_fault(f"the snapshot of step {step}"):
            checkpoint.save_snapshot(out_dir, model, adapter, step)


# resume: step, timings, token count and last loss carry over; the run's segments add up
step, elapsed_before, tokens_before, segment = 0, 0.0, 0, 1
last_loss = float("nan")  # of the last step taken (the summary's final_loss)
t_start = time.time()  # training time of this process; elapsed_before = earlier processes
if cfg.resume and ckpt_dir.exists():  # validated, restored with the RNG states; prints where it resumed
    try:
        state = checkpoint.resume_training(ckpt_dir, objective, optimizer, trainable_names, rank, world_size,
                                           device.type == "cuda", max_steps, spe, metrics_path)
    except checkpoint.CheckpointError as err:
        fail(f"cannot resume from {ckpt_dir}: {err}. Nothing was changed; pass --overwrite instead of "
             "--resume to start this run over")
    step, elapsed_before, tokens_before = state["step"], state["train_time_s"], state["tokens"]
    last_loss, segment = state["loss"], state["segments"] + 1
    if master and claimed != "finished":
        with disk_fault(metrics_path):  # steps logged after that checkpoint are redone
            run_dir.truncate_metrics(metrics_path, step)
elif master and claimed != "finished":
    metrics_path.unlink(missing_ok=True)  # steps of a run that never checkpointed are redone


def end_processes():
    """Release the run-directory lock; under torchrun, free the DDP/FSDP objects and destroy the
    process group while the interpreter is whole (at shutdown, gloo's threads made ranks SIGABRT)."""
    global wrapped, objective, model, optimizer, trainable
    fileio.release_locks()
    if distributed:
        dist.barrier()
        del wrapped, objective, model, optimizer, trainable
        gc.collect()
        dist.destroy_process_group()


if claimed == "finished" or step >= max_steps and run_dir.finished(out_dir, max_steps):  # written: nothing
    if master:
        print(f"{out_dir} already holds the finished run ({max_steps} steps): nothing to do")
    end_processes()
    sys.exit(0)

# SIGINT / SIGTERM: finish the current step, checkpoint, exit 128 + signal (a second Ctrl-C kills)
stop_signal = 0


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signum
    signal.signal(signum, previous_handlers[signum])


previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

# ------------------------------------------------------------------------------------------------
# training loop: one optimizer step per iteration = grad_accum micro-batches on every rank

bar = tqdm(total=max_steps, initial=step, disable=not (master and cfg.progress), desc="train", dynamic_ncols=True)
plan_epoch, plan = -1, None
tokens_seen, exit_code = 0, 0  # tokens of this process (tokens_before: of earlier ones)
while step < max_steps:
    t0 = time.time()
    epoch, pos = divmod(step, spe)
    if epoch != plan_epoch:  # the same on every rank: a pure function of (seed, epoch)
        plan, plan_epoch = epoch_plan(prompts, seed=cfg.seed, epoch=epoch, balance_families=cfg.family_balance,
                                      family_weights=family_weights,
                                      samples_per_prompt=1 if tree_batches else cfg.samples_per_prompt), epoch
    global_items = step_items(plan, pos, global_batch=cfg.batch_size)
    mine = step_items(plan, pos, global_batch=cfg.batch_size, world_size=world_size, rank=rank)
    global_positions = global_num_positions(prompts, global_items, len(eos_id)) if cfg.mode == "hard" else None
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    local = torch.zeros(3, dtype=torch.float64, device=device)  # [loss, tokens, stop flag]
    for micro, chunk in enumerate(micro_batches(mine, grad_accum)):
        # a short last step (keep_last_batch) may leave a micro-batch empty: run one item at weight
        # 0 instead, so every rank still takes part in the DDP/FSDP collectives
        empty = len(chunk) == 0
        micro_items = global_items[:1] if empty else chunk
        if tree_batches:
            batch = build_tree_batch(prompts, micro_items, pad_id=pad_id, global_batch=len(global_items),
                                     max_nodes=0 if cfg.share_prompt else cfg.trie_max_nodes,
                                     samples_per_prompt=cfg.samples_per_prompt, seed=cfg.seed,
                                     epoch=epoch, pack=cfg.trie_pack, uniform_paths=cfg.uniform_paths).to(device)
        else:
            batch = build_batch(prompts, micro_items, mode=cfg.mode, pad_id=pad_id, eos_id=eos_id,
                                global_batch=len(global_items), global_positions=global_positions).to(device)
        if empty:
            batch.weights.zero_()
            batch.num_tokens = 0
        last = micro == grad_accum - 1  # reduce gradients over ranks only after the last one
        if cfg.fsdp:
            wrapped.set_requires_gradient_sync(last)
        with wrapped.no_sync() if distributed and not cfg.fsdp and not last else nullcontext():
            loss = wrapped(batch)
            # the weights already normalize by the whole global step; DDP/FSDP average the
            # gradients over ranks, so scale by world_size to get their sum
            (loss * world_size).backward()
        local[0] += loss.detach().double()
        local[1] += batch.num_tokens
    local[2] = float(stop_signal != 0)
    if distributed:
        dist.all_reduce(local)
    loss_value, step_tokens, stop_now = local.tolist()  # the step's one host sync
    step_tokens, stop_now = int(step_tokens), stop_now > 0
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        save_checkpoint(step)
        if master:
            print(f"\ncalft.train: error: non-finite loss ({loss_value}) or gradient norm "
                  f"({grad_norm}) at step {step + 1}; the weights before that step are in {ckpt_dir}. "
                  "Lower --lr, or check the data of this step.", file=sys.stderr)
        exit_code = 3
        break
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    tokens_seen += step_tokens
    last_loss = loss_value
    dt = time.time() - t0
    if master:
        record = {"step": step, "epoch": epoch, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "tokens": step_tokens, "tokens_per_s": step_tokens / dt,
                  "elapsed_s": elapsed_before + time.time() - t_start}
        with disk_fault(metrics_path):  # fsynced; --resume redoes the steps after the last checkpoint
            fileio.append_line(metrics_path, json.dumps(record), root=out_dir)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{step_tokens / dt:.0f}", lr=f"{lr:.2e}")
        bar.update(1)
    if step in snapshot_steps:  # a plain adapter copy, kept (checkpoints rotate)
        save_snapshot(step)
    interval_hit = cfg.checkpoint_interval > 0 and step % cfg.checkpoint_interval == 0
    if interval_hit or step == max_steps or step == cfg.stop_at_step or stop_now:
        save_checkpoint(step)
    if stop_now or step == cfg.stop_at_step:
        if master:
            why = f"signal {signal.Signals(stop_signal).name}" if stop_now else "--stop-at-step"
            print(f"\nstopped at step {step} ({why}); checkpoint in {ckpt_dir}; continue with --resume", flush=True)
        exit_code = 128 + stop_signal if stop_now else 0
        break
bar.close()
for signum, handler in previous_handlers.items():
    signal.signal(signum, handler)
train_time = time.time() - t_start
if exit_code or step < max_steps:
    end_processes()
    sys.exit(exit_code)

# ------------------------------------------------------------------------------------------------
# outputs: adapter + tokenizer at the top of --output-dir, then base vs fine-tuned evaluation

if master:  # the run marker lists every file written here (--overwrite deletes only those)
    with disk_fault(f"the adapter and tokenizer in {out_dir}"):
        checkpoint.save_outputs(out_dir, model, checkpoint.adapter_state(
            checkpoint.trainable_state(objective, trainable_names)), tokenizer)
elif cfg.fsdp:
    checkpoint.trainable_state(objective, trainable_names)  # collective: every rank takes part
# every segment of a resumed run counts: time and tokens come from the checkpoint
train_time = elapsed_before + train_time
summary = {"steps": step, "epochs": step / spe, "final_loss": last_loss, "train_time_s": train_time,
           "tokens": tokens_before + tokens_seen,
           "tokens_per_s": (tokens_before + tokens_seen) / max(train_time, 1e-9),
           "processes": world_size, "segments": segment}
if cfg.eval and cfg.fsdp and master:
    print("evaluation skipped under --fsdp (the model is sharded): evaluate the saved adapter with python -m calft.eval")
if cfg.eval and master and not cfg.fsdp:  # calft.train_eval: calft.eval's code path
    model.eval()
    summary.update(evaluate_after_training(model, tokenizer, cfg, families, out_dir=out_dir, guard=disk_fault,
                                           autocast=(device.type, autocast_dtype) if autocast_dtype else None,
                                           record=lambda names: run_dir.record_files(out_dir, names)))
if master:
    summary["process_time_s"] = time.time() - t_launch  # this process: setup + data + training + evaluation
    with disk_fault(out_dir / "summary.json"):  # last: a valid summary.json marks a finished run
        run_dir.write_run_file(out_dir, "summary.json", json.dumps(summary, indent=2, default=float))
    print(f"done: {step} steps in {train_time:.0f} s; adapter, tokenizer, metrics and summary in {out_dir}")
end_processes()
