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

Reliability (calft/checkpoint.py): checkpoints every --checkpoint-interval steps, at the end, on
SIGINT/SIGTERM (exit status 128 + signal) and on a non-finite loss (exit 3); --resume continues bit
for bit at the same thread count; bad flags fail before any work (exit 2); one process per run dir.
Scale-out: DDP or FSDP2 (--fsdp: one fully_shard unit per block); each rank takes a slice of every
global batch (loss weights normalized globally); rank 0 checkpoints and evaluates (not under --fsdp).
"""
import argparse
import gc
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# With both cores busy, OpenMP's default spin-waiting makes torch's CPU threads 5-10x slower; a
# passive wait costs nothing when the machine is idle. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from tqdm import tqdm  # noqa: E402

from calft import checkpoint, fileio  # noqa: E402
from calft.batching import (build_batch, build_tree_batch, epoch_plan, epoch_size, global_num_positions,  # noqa: E402
                            micro_batches, step_items, steps_per_epoch)
from calft.cli import add_flags, comma_list, knob  # noqa: E402
from calft.data import DataSettings, prepare_prompts  # noqa: E402
from calft.families import get_family  # noqa: E402
from calft.models import (DEFAULT_MODEL, add_lora, check_model_files, check_training_memory,  # noqa: E402
                          decoder, load_model, load_tokenizer)
from calft.precision import PRECISIONS, autocast_dtype as precision_dtype, describe as describe_precision  # noqa: E402
from calft.prompts import REASONING_EFFORTS, set_reasoning_effort, terminator_ids  # noqa: E402
from calft.splits import SPLITS, drawn_train_specs, get_split  # noqa: E402
from calft.support import MAX_BINS, MAX_DECIMALS  # noqa: E402
from calft.train_eval import evaluate_after_training  # noqa: E402
from calft.tree import SoftTargetKLLoss  # noqa: E402


# ------------------------------------------------------------------------------------------------
# config: every knob is a TrainConfig field and a CLI flag (--field-name, calft.cli); --recipe sets defaults

@dataclass
class TrainConfig:
    # model
    model: str = knob(DEFAULT_MODEL, "HF model id, local directory, or the embedded alias")
    reasoning_effort: str = knob("low", "reasoning level gpt-oss's template renders (paper: low)", REASONING_EFFORTS)
    recipe: str = knob("quick", "sets the defaults of the other flags (docs/method.md, section 'Recipes'); flags "
                       "given explicitly override it", ("quick", "long", "long-dense", "paper-soft", "paper-hard"))
    mode: str = knob("soft", "soft = trie targets along sampled strings; hard = cross-entropy on "
                     "sampled strings; trie = every trie node of a prompt in one tree-attention "
                     "forward, weighted to the exact expected soft loss (--batch-size counts prompts)",
                     ("soft", "hard", "trie"))
    # data
    train_split: str = knob("train", "prompt split to train on", SPLITS)
    families: str = knob("", "comma-separated family ids to train on; '' = every family of the split")
    max_prompts_per_family: int = knob(-1, "evenly subsample each family to at most this many prompts; -1 = all")
    param_draws: int = knob(0, "extra training prompts per family at parameters drawn at random inside its "
                            "training grid's ranges (log-uniform on log-spaced axes; never a grid or test "
                            "prompt); 0 = the paper's grid only (docs/calibration.md)")
    family_balance: bool = knob(False, "each family fills as much of an epoch as the largest (smaller "
                                "families' prompts repeat), not a share set by the size of its grid")
    num_decimals: int = knob(5, "decimals of continuous answers (integers: none)")
    max_bins: int = knob(1001, "max support strings per prompt")
    samples_per_prompt: int = knob(1, "support strings drawn per prompt per epoch (trie mode and "
                                   "--share-prompt: paths per prompt per step covering the nodes "
                                   "beyond --trie-max-nodes)")
    trie_max_nodes: int = knob(-1, "trie mode: train at most this many nodes per prompt exactly (largest "
                               "weight first) and the rest along sampled paths (unbiased); -1 = all")
    share_prompt: bool = knob(False, "soft mode: the --samples-per-prompt strings of a prompt share one "
                              "tree-attention forward of the prompt (--batch-size then counts prompts)")
    trie_pack: bool = knob(False, "trie mode / --share-prompt: pack a micro-batch's prompts into one row "
                           "without padding, their common prefix once (N x N attention: small tries)")
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
    off_support_weight: float = knob(0.0, "lambda x -log(model mass on a trained node's children) added to the "
                                     "loss: mass back on the support; 0 = off")
    precision: str = knob("auto", "auto = bf16 autocast on CUDA and on CPUs with native bf16, else fp32", PRECISIONS)
    # LoRA
    lora_r: int = knob(16, "LoRA rank")
    lora_alpha: float = knob(32.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = knob(0.05, "dropout on the LoRA input")
    lora_targets: str = knob("all-linear", "comma-separated module names to adapt, or 'all-linear' "
                             "(PEFT: every linear layer but the LM head; works for dense and MoE models)")
    # run
    seed: int = knob(0, "seed of the data order, string sampling, LoRA init and dropout")
    output_dir: str = knob("", "run directory; '' = runs/<recipe>")
    checkpoint_interval: int = knob(100, "steps between checkpoints; 0 = only at the end or on a signal")
    snapshot_steps: str = knob("", "comma-separated steps after which the adapter is also saved to "
                               "<output-dir>/snapshots/step_<N> (for a curve of metrics vs training "
                               "time: benchmarks/calibration_curve.py); '' = none")
    stop_at_step: int = knob(-1, "checkpoint and stop after this step without changing the schedule "
                             "(time-boxed jobs); -1 = run to the end")
    resume: bool = knob(False, "continue from the checkpoint in --output-dir (fresh start if none)")
    overwrite: bool = knob(False, "delete an existing run in --output-dir and start over")
    device: str = knob("auto", "auto = cuda if available, else cpu (torchrun: cuda:<local rank>)",
                       ("auto", "cpu", "cuda"))
    fsdp: bool = knob(False, "shard the model with FSDP2 (fully_shard) under torchrun")
    progress: bool = knob(True, "show progress bars")
    # evaluation after training (exact metrics, docs/method.md, section 'Metrics')
    eval: bool = knob(True, "evaluate base vs fine-tuned on --eval-split when training ends")
    eval_split: str = knob("test_within_range,test_selected", "comma-separated splits for the final "
                           f"evaluation, from: {', '.join(SPLITS)}; test_within_range = unseen "
                           "parameters inside the training ranges, test_selected = the headline rows")
    eval_decimals: int = knob(2, "decimals of the evaluation supports")
    eval_bins: int = knob(1001, "max support strings per evaluation prompt")
    eval_prompts_per_family: int = knob(3, "prompts per family and split, spread over the parameter "
                                        "grid; -1 = the split's own cap")
    eval_samples: int = knob(100, "answers sampled per prompt from the fine-tuned model (temperature 1); 0 = none")
    eval_exact_split: str = knob("test_selected", "splits of --eval-split also scored exactly, base and fine-tuned, "
                                 "and the base sampled (the target compares them there); '' = none")


# Per-recipe defaults (why each value, what the alternatives measured: docs/method.md, 'Recipes'). The paper
# recipes reproduce the artifact's loop (last partial batch trained, HF int(3% x steps) warmup, no clipping).
_ARTIFACT_LOOP = dict(keep_last_batch=True, warmup_rule="hf", grad_clip=0.0)
_QUICK = dict(mode="soft", share_prompt=True, samples_per_prompt=4, trie_pack=True, num_decimals=1, max_bins=1001,
              max_prompts_per_family=32, max_steps=240, off_support_weight=1.0, batch_size=8, micro_batch_size=8,
              lr=1.5e-3, warmup_frac=0.05, lora_dropout=0.0, lora_targets="all-linear", checkpoint_interval=25,
              eval_decimals=1, eval_bins=1001, eval_samples=100)
_LONG = {**_QUICK, "max_prompts_per_family": -1, "max_steps": 960, "family_balance": True, "checkpoint_interval": 50}
RECIPES = {
    "quick": _QUICK,
    "long": _LONG,
    # twice long's steps plus 121 prompts per family drawn between the grid points: every family follows
    "long-dense": {**_LONG, "max_steps": 1920, "param_draws": 121},
    # the paper's LoRA is on the attention projections, named q/k/v/o_proj in all four families
    "paper-soft": dict(mode="soft", num_decimals=5, max_bins=1001, samples_per_prompt=1, epochs=3,
                       lora_targets="q_proj,k_proj,v_proj,o_proj", **_ARTIFACT_LOOP),
    "paper-hard": dict(mode="hard", num_decimals=5, max_bins=16384, samples_per_prompt=16, epochs=2,
                       lora_targets="q_proj,k_proj,v_proj,o_proj", **_ARTIFACT_LOOP),
}
FLAG_GROUPS = {"model": "model", "train_split": "data", "epochs": "optimization", "lora_r": "LoRA",
               "seed": "run", "eval": "evaluation after training"}
# Fields that may differ between a run and its --resume (they do not change the trained weights).
RUN_ONLY_FIELDS = {"resume", "overwrite", "stop_at_step", "snapshot_steps", "device", "progress", "micro_batch_size",
                   "checkpoint_interval", "output_dir", *(k for k in TrainConfig.__dataclass_fields__ if k.startswith("eval"))}


def parse_config(argv=None) -> TrainConfig:
    """Flags from the dataclass fields; recipe defaults first, then explicit flags."""
    parser = argparse.ArgumentParser(prog="python -m calft.train", description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)
    add_flags(parser, TrainConfig, FLAG_GROUPS, extra_help=lambda name: ", ".join(
        f"{r}: {d[name]}" for r, d in RECIPES.items() if name in d))
    given = vars(parser.parse_args(argv))
    recipe = dict(RECIPES[given.get("recipe", TrainConfig.recipe)])
    if given.get("mode", recipe.get("mode")) != recipe.get("mode"):
        # another --mode than the recipe's: its mode-specific settings do not carry over
        for key in ("share_prompt", "samples_per_prompt", "trie_pack"):
            recipe.pop(key, None)
    cfg = TrainConfig(**{**recipe, **given})
    if not cfg.output_dir:
        cfg.output_dir = str(Path("runs") / cfg.recipe)
    return cfg


t_launch = time.time()
cfg = parse_config()


def fail(message: str, status: int = 2):
    """A one-line error, no traceback; status 2 = bad input (before any work), 1 = a fault in the run."""
    print(f"calft.train: error: {message}", file=sys.stderr, flush=True)
    checkpoint.release_locks()
    sys.exit(status)


# ------------------------------------------------------------------------------------------------
# setup: validate everything cheap first, then processes, device, seeds, output dir

def check_config(cfg: TrainConfig) -> None:
    """Every flag, before any work (ValueError naming the flag); sentinels are -1."""
    def flag(key):
        return "--" + key.replace("_", "-")

    for key in ("batch_size", "micro_batch_size", "epochs", "lora_r", "samples_per_prompt", "max_bins", "eval_bins"):
        if not 1 <= getattr(cfg, key) <= (MAX_BINS if key.endswith("bins") else math.inf):
            raise ValueError(f"{flag(key)} must be >= 1{' and <= %d' % MAX_BINS if 'bins' in key else ''}, got {getattr(cfg, key)}")
    for key in ("max_steps", "stop_at_step", "max_prompts_per_family", "eval_prompts_per_family"):
        if getattr(cfg, key) < 1 and getattr(cfg, key) != -1:
            raise ValueError(f"{flag(key)} must be >= 1, or -1 (the sentinel), got {getattr(cfg, key)}")
    for key in ("num_decimals", "eval_decimals"):
        if not 0 <= getattr(cfg, key) <= MAX_DECIMALS:
            raise ValueError(f"{flag(key)} must be in [0, {MAX_DECIMALS}], got {getattr(cfg, key)}")
    if not 0 <= cfg.seed < 2**32:  # numpy's seed range
        raise ValueError(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.param_draws < 0:
        raise ValueError(f"--param-draws must be >= 0 (0 = the grid only), got {cfg.param_draws}")
    if cfg.param_draws and cfg.train_split != "train":
        raise ValueError(f"--param-draws draws inside the train split's grids; --train-split is {cfg.train_split!r}")
    if cfg.eval_samples < 0:
        raise ValueError(f"--eval-samples must be >= 0 (0 = exact metrics only), got {cfg.eval_samples}")
    for split in cfg.eval_split.split(",") + comma_list(cfg.eval_exact_split):  # an empty item is an error here too
        if split.strip() not in SPLITS:
            raise ValueError(f"--eval-split: unknown split {split.strip()!r}; known: {', '.join(SPLITS)}")
    try:
        snapshots = [int(x) for x in comma_list(cfg.snapshot_steps)]
    except ValueError:
        raise ValueError(f"--snapshot-steps must be comma-separated step numbers, got {cfg.snapshot_steps!r}") from None
    if any(s < 1 for s in snapshots):
        raise ValueError(f"--snapshot-steps must be >= 1, got {cfg.snapshot_steps!r}")
    if snapshots and cfg.max_steps > 0 and max(snapshots) > cfg.max_steps:
        raise ValueError(f"--snapshot-steps {max(snapshots)} is past the last step ({cfg.max_steps})")
    if cfg.checkpoint_interval < 0:
        raise ValueError(f"--checkpoint-interval must be >= 0 (0 = only at the end), got {cfg.checkpoint_interval}")
    if not (0 < cfg.lr < math.inf and 0 <= cfg.warmup_frac < 1 and 0 <= cfg.min_lr_ratio <= 1
            and 0 <= cfg.grad_clip < math.inf and 0 <= cfg.weight_decay < math.inf):
        raise ValueError("need 0 < --lr < inf, 0 <= --warmup-frac < 1, 0 <= --min-lr-ratio <= 1, "
                         "--grad-clip >= 0 and --weight-decay >= 0 (finite)")
    if not (0 < cfg.lora_alpha < math.inf and 0 <= cfg.lora_dropout < 1):
        raise ValueError(f"need --lora-alpha > 0 (got {cfg.lora_alpha}; alpha 0 scales LoRA to nothing) "
                         f"and 0 <= --lora-dropout < 1 (got {cfg.lora_dropout})")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    if cfg.trie_max_nodes < -1:
        raise ValueError(f"--trie-max-nodes must be >= 0 or -1 (all), got {cfg.trie_max_nodes}")
    if cfg.trie_max_nodes != -1 and cfg.mode != "trie":
        raise ValueError("--trie-max-nodes applies to --mode trie")
    if cfg.share_prompt and cfg.mode != "soft":
        raise ValueError("--share-prompt applies to --mode soft (trie mode always shares the prompt)")
    if cfg.trie_pack and not (cfg.mode == "trie" or cfg.share_prompt):
        raise ValueError("--trie-pack applies to --mode trie and --share-prompt")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is False): use --device cpu or auto")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file, not a directory")


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
    if cfg.param_draws:  # denser parameters inside the same ranges; the test splits stay unseen
        specs += [sp for fid in dict.fromkeys(sp.family_id for sp in specs)
                  for sp in drawn_train_specs(fid, cfg.param_draws, seed=cfg.seed)]
    tree_batches = cfg.mode == "trie" or cfg.share_prompt  # one tree item per prompt: the batch counts prompts
    items_per_epoch = (epoch_size([sp.family_id for sp in specs], balance_families=cfg.family_balance)
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

# The run directory (calft.checkpoint.claim_run_dir): only a directory calft started a run in (its
# marker) is reused, resumed or overwritten; one process at a time (an flock held until exit).
out_dir = Path(cfg.output_dir)
ckpt_dir = out_dir / checkpoint.CKPT
metrics_path = out_dir / "metrics.jsonl"
claimed = None  # "new", "resume" or "finished" (rank 0)
if master:
    try:
        claimed = checkpoint.claim_run_dir(out_dir, asdict(cfg), RUN_ONLY_FIELDS, resume=cfg.resume,
                                           overwrite=cfg.overwrite, max_steps=max_steps, defaults=asdict(TrainConfig()))
    except (checkpoint.RunDirError, OSError) as err:  # OSError: the marker or config.json on a full disk
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
          f"{max_steps} steps")

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
                             off_support_weight=cfg.off_support_weight)
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
            checkpoint.truncate_metrics(metrics_path, step)
elif master and claimed != "finished":
    metrics_path.unlink(missing_ok=True)  # steps of a run that never checkpointed are redone


def end_processes():
    """Release the run-directory lock; under torchrun, free the DDP/FSDP objects and destroy the
    process group while the interpreter is whole (at shutdown, gloo's threads made ranks SIGABRT)."""
    global wrapped, objective, model, optimizer, trainable
    checkpoint.release_locks()
    if distributed:
        dist.barrier()
        del wrapped, objective, model, optimizer, trainable
        gc.collect()
        dist.destroy_process_group()


if claimed == "finished" or step >= max_steps and checkpoint.finished(out_dir, max_steps):  # written: nothing
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
                                     epoch=epoch, pack=cfg.trie_pack).to(device)
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
                                           record=lambda names: checkpoint.record_files(out_dir, names)))
if master:
    summary["process_time_s"] = time.time() - t_launch  # this process: setup + data + training + evaluation
    with disk_fault(out_dir / "summary.json"):  # last: a valid summary.json marks a finished run
        checkpoint.write_run_file(out_dir, "summary.json", json.dumps(summary, indent=2, default=float))
    print(f"done: {step} steps in {train_time:.0f} s; adapter, tokenizer, metrics and summary in {out_dir}")
end_processes()
