"""Calibration fine-tuning with LoRA: soft (trie) targets or hard (sampled string) targets.

Run (a single process, CPU or one GPU):
    python -m calft.train                                  # quick recipe, embedded SmolLM2 (< 10 min on 2 CPU cores)
    python -m calft.train --recipe paper-soft --model Qwen/Qwen3-0.6B --output-dir runs/qwen-soft
    python -m calft.train --recipe paper-hard --model Qwen/Qwen3-0.6B --output-dir runs/qwen-hard
    python -m calft.train --output-dir runs/quick --resume # continue an interrupted run exactly
Scale out (the global --batch-size is kept; accumulation = batch / (micro batch x processes)):
    torchrun --nproc-per-node=4 -m calft.train --recipe paper-soft --model Qwen/Qwen3-8B
    torchrun --nproc-per-node=8 -m calft.train --recipe paper-soft --model google/gemma-3-27b-it --fsdp
Every option: python -m calft.train --help

The script reads top to bottom (STYLE.md rule 2): config, setup, data, model + PEFT, optimizer
and schedule, one training loop, evaluation. The math of the objective is in calft/batching.py
(positions, targets, weights) and calft/losses.py (the fused LM-head + sparse KL).

Reliability. A checkpoint (output_dir/checkpoint: adapter, optimizer, step, every rank's RNG
states; the data order is a pure function of (seed, epoch, step)) is written to a temp dir and
renamed, every --checkpoint-interval steps, at the end, on SIGINT/SIGTERM (after the current step;
exit status 128 + signal) and on a non-finite loss (exit status 3). --resume continues it with the
same loss sequence as an uninterrupted run. Under torchrun, Ctrl-C reaches torchrun, which sends
SIGTERM to the workers (and SIGKILL 30 s later: keep steps shorter than that).
Scale-out. DDP (gloo on CPU, NCCL on GPU) or FSDP2 (--fsdp: one fully_shard unit per block,
bf16 all-gathers with fp32 gradient reduction on GPU); each rank takes a contiguous slice of every
global batch, and the loss weights are normalized by the global batch, so N processes take the
same steps as one. Rank 0 writes checkpoints and runs the final evaluation (skipped under --fsdp).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# With both cores busy, OpenMP's default spin-waiting makes torch's CPU threads 5-10x slower; a
# passive wait costs nothing when the machine is idle. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.distributed as dist
from tqdm import tqdm

from calft.models import DEFAULT_MODEL, add_lora, decoder, load_model, load_tokenizer
from calft.splits import SPLITS, get_split


# ------------------------------------------------------------------------------------------------
# config: every knob is a TrainConfig field and a CLI flag (--field-name); --recipe sets defaults

def knob(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # model
    model: str = knob(DEFAULT_MODEL, "HF model id, local directory, or the embedded alias")
    recipe: str = knob("quick", "sets the defaults of the other flags (SPEC.md section 7); flags "
                       "given explicitly override it", ("quick", "paper-soft", "paper-hard"))
    mode: str = knob("soft", "soft = trie targets along sampled strings; hard = cross-entropy on "
                     "sampled strings", ("soft", "hard"))
    # data
    train_split: str = knob("train", "prompt split to train on", SPLITS)
    families: str = knob("", "comma-separated family ids to train on; '' = every family of the split")
    max_prompts_per_family: int = knob(-1, "evenly subsample each family to at most this many "
                                       "prompts; -1 = all")
    num_decimals: int = knob(5, "decimals of continuous answers (integers: none)")
    max_bins: int = knob(1001, "max support strings per prompt")
    samples_per_prompt: int = knob(1, "support strings drawn per prompt per epoch")
    # optimization
    epochs: int = knob(3, "passes over the prompts (sets the step count when --max-steps is -1)")
    max_steps: int = knob(-1, "optimizer steps; the cosine schedule spans them; -1 = epochs x steps/epoch")
    batch_size: int = knob(32, "sequences per optimizer step, over all processes (global batch)")
    micro_batch_size: int = knob(8, "sequences per forward pass per process; gradient accumulation "
                                 "= batch_size / (micro_batch_size x processes)")
    lr: float = knob(2e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = knob(0.0, "final lr as a fraction of --lr (cosine floor)")
    warmup_frac: float = knob(0.03, "fraction of the steps with linear warmup")
    warmup_rule: str = knob("ceil", "hf = transformers' get_cosine_schedule_with_warmup, as the artifact: "
                            "W = int(frac x steps), lr x s/W (step 0 at lr 0); ceil = W = ceil(frac x steps), "
                            "lr x (s+1)/W", ("hf", "ceil"))
    keep_last_batch: bool = knob(False, "train on each epoch's last partial batch (as the artifact: "
                                 "ceil(items/batch) steps per epoch); off = drop it")
    weight_decay: float = knob(0.01, "AdamW weight decay (LoRA weights)")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this; 0 = no clipping")
    # LoRA
    lora_r: int = knob(16, "LoRA rank")
    lora_alpha: float = knob(32.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = knob(0.05, "dropout on the LoRA input")
    lora_targets: str = knob("q_proj,k_proj,v_proj,o_proj", "comma-separated module names to adapt")
    # run
    seed: int = knob(0, "seed of the data order, string sampling, LoRA init and dropout")
    output_dir: str = knob("", "run directory; '' = runs/<recipe>")
    checkpoint_interval: int = knob(100, "steps between checkpoints; 0 = only at the end or on a signal")
    stop_at_step: int = knob(-1, "checkpoint and stop after this step without changing the schedule "
                             "(time-boxed jobs); -1 = run to the end")
    resume: bool = knob(False, "continue from the checkpoint in --output-dir (fresh start if none)")
    overwrite: bool = knob(False, "delete an existing run in --output-dir and start over")
    device: str = knob("auto", "auto = cuda if available, else cpu (torchrun: cuda:<local rank>)",
                       ("auto", "cpu", "cuda"))
    fsdp: bool = knob(False, "shard the model with FSDP2 (fully_shard) under torchrun")
    progress: bool = knob(True, "show progress bars")
    # evaluation after training (exact metrics, SPEC.md section 8)
    eval: bool = knob(True, "evaluate base vs fine-tuned on --eval-split when training ends")
    eval_split: str = knob("test_selected", "split for the final evaluation", SPLITS)
    eval_decimals: int = knob(2, "decimals of the evaluation supports")
    eval_bins: int = knob(1001, "max support strings per evaluation prompt")
    eval_max_prompts: int = knob(-1, "evaluate at most this many prompts (evenly spaced); -1 = all")


# Per-recipe defaults (SPEC.md section 7). quick: the embedded 135M model on 2 CPU cores in < 10
# min, evaluation included: 16 prompts per training family x 2 epochs = 96 steps of 8 sequences
# (~3 s each on 2 cores), LoRA on every linear layer, lr 1.5e-3 (the paper's 2e-4 is for ~200 steps of 32).
# Training and evaluation use 1 decimal: with 2 decimals and 1001 bins, 11 of the 24 selected
# prompts have more grid strings than bins, so their supports skip strings a calibrated model
# emits and support_mass cannot reach 1; at 1 decimal and 2001 bins only lognormal and cauchy do
# (heavy tails). 1 decimal also makes the tries, and so the exact evaluation, ~5x smaller.
# The paper recipes reproduce the artifact's loop (chandar-lab/calibration-finetuning,
# calibrate_sft/train_loop.py): the last partial batch is trained (1988 prompts / 32 = 63 steps
# per epoch, not 62), warmup is transformers' int(3% x steps) with lr x s/W, and no clipping.
_ARTIFACT_LOOP = dict(keep_last_batch=True, warmup_rule="hf", grad_clip=0.0)
RECIPES = {
    "quick": dict(mode="soft", num_decimals=1, max_bins=1001, max_prompts_per_family=16, epochs=2,
                  batch_size=8, micro_batch_size=8, lr=1.5e-3, warmup_frac=0.05, lora_dropout=0.0,
                  lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                  checkpoint_interval=25, eval_decimals=1, eval_bins=2001),
    "paper-soft": dict(mode="soft", num_decimals=5, max_bins=1001, samples_per_prompt=1, epochs=3,
                       **_ARTIFACT_LOOP),
    "paper-hard": dict(mode="hard", num_decimals=5, max_bins=16384, samples_per_prompt=16, epochs=2,
                       **_ARTIFACT_LOOP),
}
# argparse groups: the field that opens each group -> its title
FLAG_GROUPS = {"model": "model", "train_split": "data", "epochs": "optimization", "lora_r": "LoRA",
               "seed": "run", "eval": "evaluation after training"}
# Fields that may differ between a run and its --resume (they do not change the trained weights).
RUN_ONLY_FIELDS = {"resume", "overwrite", "stop_at_step", "device", "progress", "micro_batch_size",
                   "checkpoint_interval", "eval", "eval_split", "eval_decimals", "eval_bins",
                   "eval_max_prompts", "output_dir"}


def parse_config(argv=None) -> TrainConfig:
    """Flags from the dataclass fields; recipe defaults first, then explicit flags."""
    parser = argparse.ArgumentParser(prog="python -m calft.train", description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)
    group = parser
    for f in dataclasses.fields(TrainConfig):
        if f.name in FLAG_GROUPS:
            group = parser.add_argument_group(FLAG_GROUPS[f.name])
        per_recipe = ", ".join(f"{r}: {d[f.name]}" for r, d in RECIPES.items() if f.name in d)
        help = f"{f.metadata['help']} (default: {f.default!r}{'; ' + per_recipe if per_recipe else ''})"
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            choices = f.metadata["choices"]
            group.add_argument(flag, type=typ, choices=choices, help=help,
                               metavar="{" + ",".join(choices) + "}" if choices else typ.__name__.upper())
    given = vars(parser.parse_args(argv))
    cfg = TrainConfig(**{**RECIPES[given.get("recipe", TrainConfig.recipe)], **given})
    if not cfg.output_dir:
        cfg.output_dir = str(Path("runs") / cfg.recipe)
    return cfg


t_launch = time.time()
cfg = parse_config()


def fail(message: str):
    """A clear one-line error (no traceback) and exit status 2, before any expensive work."""
    print(f"calft.train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# ------------------------------------------------------------------------------------------------
# setup: validate everything cheap first, then processes, device, seeds, output dir

from calft.batching import (SparseKLLoss, build_batch, epoch_plan, global_num_positions,  # noqa: E402
                            micro_batches, step_items, steps_per_epoch)
from calft.data import DataSettings, prepare_prompts  # noqa: E402
from calft.families import get_family  # noqa: E402

try:
    families = [s.strip() for s in cfg.families.split(",") if s.strip()] or None
    for fam in families or ():
        if get_family(fam).held_out and cfg.train_split == "train":
            raise ValueError(f"family {fam!r} is held out (SPEC.md section 2): it is never trained on")
    for key in ("batch_size", "micro_batch_size", "epochs", "lora_r", "samples_per_prompt", "max_bins"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if not (cfg.lr > 0 and 0 <= cfg.warmup_frac < 1 and 0 <= cfg.min_lr_ratio <= 1 and cfg.grad_clip >= 0):
        raise ValueError("need --lr > 0, 0 <= --warmup-frac < 1, 0 <= --min-lr-ratio <= 1, --grad-clip >= 0")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    tokenizer = load_tokenizer(cfg.model)  # bad path / no EOS token -> ValueError here
except ValueError as err:
    fail(str(err))

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
# bf16 autocast on CUDA (LoRA weights and the loss stay fp32); plain fp32 on CPU
autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

out_dir = Path(cfg.output_dir)
ckpt_dir = out_dir / "checkpoint"
train_fields = {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY_FIELDS}
if master:
    old_cfg = out_dir / "config.json"
    if out_dir.exists() and any(out_dir.iterdir()):
        if not old_cfg.is_file():
            fail(f"{out_dir} is not empty and holds no calft run (no config.json): choose another "
                 "--output-dir")
        old = {k: v for k, v in json.loads(old_cfg.read_text()).items() if k not in RUN_ONLY_FIELDS}
        if cfg.overwrite:
            shutil.rmtree(out_dir)
        elif old != train_fields:
            diff = {k: (old.get(k), train_fields.get(k)) for k in set(old) | set(train_fields)
                    if old.get(k) != train_fields.get(k)}
            fail(f"{out_dir} holds a run with a different config {diff} (old, new): pass "
                 "--overwrite to replace it or choose another --output-dir")
        elif not cfg.resume:
            fail(f"{out_dir} already holds this run: pass --resume to continue it or --overwrite "
                 "to start over")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    print(json.dumps(asdict(cfg), indent=2))
    print(f"processes: {world_size}, device: {device}, gradient accumulation: {grad_accum}")
if distributed:
    dist.barrier()

random.seed(cfg.seed)
np.random.seed(cfg.seed)
torch.manual_seed(cfg.seed)

# ------------------------------------------------------------------------------------------------
# data: prompts -> supports -> tries (cached on disk by calft.data); rank 0 fills the cache first

try:
    specs = get_split(cfg.train_split, families=families,
                      max_specs=None if cfg.max_prompts_per_family < 0 else cfg.max_prompts_per_family)
except ValueError as err:
    fail(str(err))
settings = DataSettings(num_decimals=cfg.num_decimals, max_bins=cfg.max_bins)
for turn in (0, 1) if distributed else (0,):
    if (turn == 0) == master:
        prompts = prepare_prompts(tokenizer, specs, settings, progress=master and cfg.progress)
    if distributed:
        dist.barrier()
eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
items_per_epoch = len(prompts) * cfg.samples_per_prompt
try:
    spe = steps_per_epoch(items_per_epoch, cfg.batch_size, keep_last=cfg.keep_last_batch)
except ValueError as err:
    fail(str(err))
max_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * spe
if master:
    print(f"{len(prompts)} prompts from {len({p.spec.family_id for p in prompts})} families, "
          f"{items_per_epoch} sequences/epoch, {spe} steps/epoch, {max_steps} steps")

# ------------------------------------------------------------------------------------------------
# model + PEFT: frozen base (bf16 on CUDA, fp32 on CPU), fp32 LoRA weights

model = load_model(cfg.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                   device=device)
if model.config.vocab_size < len(tokenizer):
    fail(f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
try:
    model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     target_modules=[t.strip() for t in cfg.lora_targets.split(",") if t.strip()])
except ValueError as err:
    fail(str(err))
model.train()
objective = SparseKLLoss(model, autocast_dtype=autocast_dtype, share_prefix=not cfg.fsdp)
trainable = [p for p in objective.parameters() if p.requires_grad]
if cfg.fsdp:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32) if autocast_dtype else MixedPrecisionPolicy()
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
# checkpoints: adapter + optimizer + step + RNG states, written to a temp dir and renamed

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def rng_state_of_this_rank() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}


def save_checkpoint(step: int, path: Path = ckpt_dir):
    """Collective under FSDP (every rank gathers), then rank 0 writes `path` atomically."""
    lora = get_model_state_dict(objective, options=FULL)
    optim = get_optimizer_state_dict(objective, optimizer, options=FULL)
    rng = [rng_state_of_this_rank()]
    if distributed:  # every rank's generators (dropout draws differ by rank)
        rng = [None] * world_size
        dist.all_gather_object(rng, rng_state_of_this_rank())
    if not master:
        return
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.tmp-", dir=out_dir))
    model.save_pretrained(tmp, state_dict={k.removeprefix("model."): v for k, v in lora.items()})
    torch.save({"step": step, "epoch": step // spe, "step_in_epoch": step % spe, "config": asdict(cfg),
                "elapsed_s": elapsed_before + time.time() - t_start,
                "model": lora, "optimizer": optim, "rng": rng}, tmp / "state.pt")
    old = out_dir / ".checkpoint.old"
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


step, elapsed_before, metrics_path = 0, 0.0, out_dir / "metrics.jsonl"
t_start = time.time()  # training time of this process; elapsed_before = earlier processes
resume_from = ckpt_dir if ckpt_dir.exists() else out_dir / ".checkpoint.old"  # crash mid-rename
if cfg.resume and (resume_from / "state.pt").is_file():
    state = torch.load(resume_from / "state.pt", map_location="cpu", weights_only=False)
    set_model_state_dict(objective, state["model"], options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(objective, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    step, elapsed_before = state["step"], state["elapsed_s"]
    rng = state["rng"][rank if len(state["rng"]) == world_size else 0]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    if master:
        print(f"resumed from {resume_from} at step {step} (epoch {state['epoch']}, "
              f"step {state['step_in_epoch']} of {spe})")
        if metrics_path.exists():  # drop steps logged after that checkpoint: they are redone
            lines = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            metrics_path.write_text("".join(ln + "\n" for ln in lines))
elif master:
    if cfg.resume:
        print(f"no checkpoint in {out_dir}: starting from scratch")
    metrics_path.unlink(missing_ok=True)  # steps of a run that never checkpointed are redone

# SIGINT / SIGTERM: finish the current step, checkpoint, exit 128 + signal (a second Ctrl-C kills)
stop_signal = 0


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signum
    signal.signal(signum, previous_handlers[signum])


previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

# ------------------------------------------------------------------------------------------------
# training loop: one optimizer step per iteration = grad_accum micro-batches on every rank

bar = tqdm(total=max_steps, initial=step, disable=not (master and cfg.progress), desc="train",
           dynamic_ncols=True)
plan_epoch, plan = -1, None
tokens_seen, exit_code, loss_value = 0, 0, float("nan")
while step < max_steps:
    t0 = time.time()
    epoch, pos = divmod(step, spe)
    if epoch != plan_epoch:  # the same on every rank: a pure function of (seed, epoch)
        plan, plan_epoch = epoch_plan(prompts, seed=cfg.seed, epoch=epoch,
                                      samples_per_prompt=cfg.samples_per_prompt), epoch
    global_items = step_items(plan, pos, global_batch=cfg.batch_size)
    mine = step_items(plan, pos, global_batch=cfg.batch_size, world_size=world_size, rank=rank)
    global_positions = global_num_positions(prompts, global_items) if cfg.mode == "hard" else None
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    local = torch.zeros(3, dtype=torch.float64, device=device)  # [loss, tokens, stop flag]
    for micro, chunk in enumerate(micro_batches(mine, grad_accum)):
        # a short last step (keep_last_batch) may leave a micro-batch empty: run one item at weight
        # 0 instead, so every rank still takes part in the DDP/FSDP collectives
        empty = len(chunk) == 0
        batch = build_batch(prompts, global_items[:1] if empty else chunk,
                            mode=cfg.mode, pad_id=pad_id, eos_id=eos_id, global_batch=len(global_items),
                            global_positions=global_positions).to(device)
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
    dt = time.time() - t0
    if master:
        record = {"step": step, "epoch": epoch, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": step_tokens / dt, "elapsed_s": elapsed_before + time.time() - t_start}
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{step_tokens / dt:.0f}", lr=f"{lr:.2e}")
        bar.update(1)
    interval_hit = cfg.checkpoint_interval > 0 and step % cfg.checkpoint_interval == 0
    if interval_hit or step == max_steps or step == cfg.stop_at_step or stop_now:
        save_checkpoint(step)
    if stop_now or step == cfg.stop_at_step:
        if master:
            why = f"signal {signal.Signals(stop_signal).name}" if stop_now else "--stop-at-step"
            print(f"\nstopped at step {step} ({why}); checkpoint in {ckpt_dir}; continue with --resume",
                  flush=True)
        exit_code = 128 + stop_signal if stop_now else 0
        break
bar.close()
for signum, handler in previous_handlers.items():
    signal.signal(signum, handler)
train_time = time.time() - t_start
if exit_code or step < max_steps:
    if distributed:
        dist.destroy_process_group()
    sys.exit(exit_code)

# ------------------------------------------------------------------------------------------------
# outputs: adapter + tokenizer at the top of --output-dir, then base vs fine-tuned evaluation

if master:
    model.save_pretrained(out_dir, state_dict={k.removeprefix("model."): v.detach().cpu() for k, v in
                                               get_model_state_dict(objective, options=FULL).items()})
    tokenizer.save_pretrained(out_dir)
elif cfg.fsdp:
    get_model_state_dict(objective, options=FULL)  # collective: every rank takes part
summary = {"steps": step, "epochs": step / spe, "final_loss": loss_value, "train_time_s": train_time,
           "tokens": tokens_seen, "tokens_per_s": tokens_seen / max(train_time, 1e-9),
           "processes": world_size}
if cfg.eval and cfg.fsdp and master:
    print("evaluation skipped under --fsdp (the model is sharded): evaluate the saved adapter "
          "with python -m calft.eval")
if cfg.eval and master and not cfg.fsdp:
    from calft.evaluate import evaluate_exact, format_comparison_table, summarize

    eval_settings = DataSettings(num_decimals=cfg.eval_decimals, max_bins=cfg.eval_bins)
    eval_specs = get_split(cfg.eval_split)
    if 0 < cfg.eval_max_prompts < len(eval_specs):
        eval_specs = [eval_specs[i] for i in np.linspace(0, len(eval_specs) - 1, cfg.eval_max_prompts).round().astype(int)]
    eval_prompts = prepare_prompts(tokenizer, eval_specs, eval_settings, progress=cfg.progress)
    model.eval()
    t_eval = time.time()
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        with model.disable_adapter():
            base_rows = evaluate_exact(model, tokenizer, eval_prompts, progress=cfg.progress)
        tuned_rows = evaluate_exact(model, tokenizer, eval_prompts, progress=cfg.progress)
    base_summary, tuned_summary = summarize(base_rows), summarize(tuned_rows)
    table = format_comparison_table({"base": base_summary, "fine-tuned": tuned_summary})
    print(f"\nexact metrics on {cfg.eval_split} ({len(eval_prompts)} prompts, {cfg.eval_decimals} "
          f"decimals, {cfg.eval_bins} bins), base vs fine-tuned:\n{table}")
    (out_dir / "eval.json").write_text(json.dumps(
        {"split": cfg.eval_split, "num_decimals": cfg.eval_decimals, "max_bins": cfg.eval_bins,
         "base": base_summary, "finetuned": tuned_summary, "base_rows": base_rows,
         "finetuned_rows": tuned_rows}, indent=2, default=float))
    (out_dir / "eval_table.md").write_text(table + "\n")
    summary.update(eval_time_s=time.time() - t_eval, eval_base=base_summary, eval_finetuned=tuned_summary)
if master:
    summary["process_time_s"] = time.time() - t_launch  # setup + data + training + evaluation
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"done: {step} steps in {train_time:.0f} s; adapter, tokenizer, metrics and summary in {out_dir}")
if distributed:
    dist.destroy_process_group()
