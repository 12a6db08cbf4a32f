"""calft.train's configuration: every knob is a TrainConfig field and a CLI flag (--field-name,
calft.cli); --recipe sets their defaults (RECIPES); check_config rejects bad flags before any work.

A module apart from calft/train.py (a script that trains when imported), so benchmarks and tools
read the recipes and the defaults by importing them.
"""
import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from calft.cli import add_flags, comma_list, knob
from calft.families import get_family
from calft.models import DEFAULT_MODEL
from calft.precision import PRECISIONS
from calft.prompts import REASONING_EFFORTS
from calft.splits import SPLITS
from calft.support import MAX_BINS, MAX_DECIMALS

DESCRIPTION = "Calibration fine-tuning with LoRA: soft (trie) targets, hard (sampled string) targets, or trie mode."


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
    family_draws: str = knob("", "comma-separated family=count pairs (e.g. f_distribution=300): that "
                             "family's --param-draws; the others keep --param-draws")
    family_balance: bool = knob(False, "each family fills as much of an epoch as the largest (smaller "
                                "families' prompts repeat), not a share set by the size of its grid")
    family_weights: str = knob("", "with --family-balance: comma-separated family=weight pairs (e.g. "
                               "f_distribution=2): that family fills weight x the balanced share of an epoch, "
                               "spread evenly through it; the others keep weight 1")
    num_decimals: int = knob(5, "decimals of continuous answers (integers: none)")
    max_bins: int = knob(1001, "max support strings per prompt")
    samples_per_prompt: int = knob(1, "support strings drawn per prompt per epoch (trie mode and "
                                   "--share-prompt: paths per prompt per step covering the nodes "
                                   "beyond --trie-max-nodes)")
    trie_max_nodes: int = knob(-1, "trie mode: train at most this many nodes per prompt exactly (largest "
                               "weight first) and the rest along sampled paths (unbiased); -1 = all")
    share_prompt: bool = knob(False, "soft mode: the --samples-per-prompt strings of a prompt share one "
                              "tree-attention forward of the prompt (--batch-size then counts prompts)")
    uniform_paths: int = knob(0, "--share-prompt: per prompt and step, this many more paths drawn uniformly over "
                              "the support's strings, weighted like the --samples-per-prompt paths drawn from the "
                              "target: nodes deep in a tail, which target paths practically never reach, learn "
                              "which tokens may follow (soft target and off-support term); 0 = off")
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
    log_ratio_weight: float = knob(0.0, "gamma x the squared log-ratio of the model's to the target's mass on "
                                   "each child of a trained node (floored at 1e-3, averaged over the node's "
                                   "children) added to the soft loss: a tail child's error counts as much as "
                                   "a likely one's; uncapped, one of three long-dense seeds diverged, with "
                                   "--log-ratio-cap 1 none of three did (docs/calibration.md); 0 = off")
    log_ratio_cap: float = knob(0.0, "delta of a Huber cap on --log-ratio-weight's log-ratio: beyond it the "
                                "term grows linearly, so one child's push is at most delta (as the KL's "
                                "p - q is at most 1); 0 = squared, no cap")
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
    # twice long's steps plus 121 prompts per family drawn between the grid points (300 for F, the last
    # laggard) and the capped log-ratio term on each node's children: every target at 3 seeds (docs/calibration.md)
    "long-dense": {**_LONG, "max_steps": 1920, "param_draws": 121, "family_draws": "f_distribution=300",
                   "log_ratio_weight": 1.0, "log_ratio_cap": 1.0},
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
    parser = argparse.ArgumentParser(prog="python -m calft.train", description=DESCRIPTION,
                                     argument_default=argparse.SUPPRESS)
    add_flags(parser, TrainConfig, FLAG_GROUPS, extra_help=lambda name: ", ".join(
        f"{r}: {d[name]}" for r, d in RECIPES.items() if name in d))
    given = vars(parser.parse_args(argv))
    recipe = dict(RECIPES[given.get("recipe", TrainConfig.recipe)])
    if given.get("mode", recipe.get("mode")) != recipe.get("mode"):
        # another --mode than the recipe's: its mode-specific settings do not carry over
        for key in ("share_prompt", "samples_per_prompt", "trie_pack", "log_ratio_weight", "log_ratio_cap"):
            recipe.pop(key, None)
    if given.get("log_ratio_weight") == 0:
        recipe.pop("log_ratio_cap", None)  # `--log-ratio-weight 0` turns the recipe's term off, its cap with it
    cfg = TrainConfig(**{**recipe, **given})
    if not cfg.output_dir:
        cfg.output_dir = str(Path("runs") / cfg.recipe)
    return cfg


def parse_family_values(text: str, flag: str, count: bool = False) -> dict[str, float]:
    """"f_distribution=2,hypergeometric=1.5" -> {family id: value}; ValueError naming `flag` on a
    bad pair, an unknown family, a repeated one, or a value not > 0 (count: not an integer >= 0)."""
    what = "family=count with an integer count >= 0" if count else "family=weight with a weight > 0"
    values: dict[str, float] = {}
    for pair in comma_list(text):
        name, sep, text_value = pair.partition("=")
        try:
            value = int(text_value) if count else float(text_value)
        except ValueError:
            value = math.nan
        if not sep or not (0 <= value < math.inf if count else 0 < value < math.inf):
            raise ValueError(f"{flag}: expected {what}, got {pair!r}")
        try:
            fid = get_family(name.strip()).id
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
        if fid in values:
            raise ValueError(f"{flag}: {fid!r} given twice")
        values[fid] = value
    return values


def parse_family_weights(text: str) -> dict[str, float]:
    """--family-weights "f_distribution=2" -> {family id: weight > 0}."""
    return parse_family_values(text, "--family-weights")


def parse_family_draws(text: str) -> dict[str, int]:
    """--family-draws "f_distribution=300" -> {family id: draws >= 0}."""
    return {fid: int(n) for fid, n in parse_family_values(text, "--family-draws", count=True).items()}


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
    if (cfg.param_draws or any(parse_family_draws(cfg.family_draws).values())) and cfg.train_split != "train":
        raise ValueError(f"--param-draws and --family-draws draw inside the train split's grids; --train-split "
                         f"is {cfg.train_split!r}")
    if parse_family_weights(cfg.family_weights) and not cfg.family_balance:
        raise ValueError("--family-weights scales the balanced share of each family: add --family-balance")
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
    if not 0 <= cfg.log_ratio_weight < math.inf:
        raise ValueError(f"--log-ratio-weight must be >= 0 and finite (0 = off), got {cfg.log_ratio_weight}")
    if not 0 <= cfg.log_ratio_cap < math.inf:
        raise ValueError(f"--log-ratio-cap must be >= 0 and finite (0 = no cap), got {cfg.log_ratio_cap}")
    if cfg.log_ratio_cap and not cfg.log_ratio_weight:
        raise ValueError("--log-ratio-cap caps the term of --log-ratio-weight: set that too")
    if cfg.log_ratio_weight and cfg.mode != "soft":
        raise ValueError("--log-ratio-weight compares the model's mass with the soft target's: --mode soft only")
    if cfg.uniform_paths < 0:
        raise ValueError(f"--uniform-paths must be >= 0 (0 = off), got {cfg.uniform_paths}")
    if cfg.uniform_paths and not (cfg.mode == "soft" and cfg.share_prompt):
        raise ValueError("--uniform-paths applies to --mode soft with --share-prompt (the paths of a prompt share "
                         "one forward)")
    if cfg.trie_pack and not (cfg.mode == "trie" or cfg.share_prompt):
        raise ValueError("--trie-pack applies to --mode trie and --share-prompt")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is False): use --device cpu or auto")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file, not a directory")
