"""Checkpoints: what one holds, writing it atomically and reading it back, and the training state
of calft.train packed into it and restored from it. Where checkpoints live and how a kill is
repaired: calft.run_dir.

A checkpoint is a folder `checkpoint/` with:
    adapter_config.json, adapter_model.safetensors   the LoRA adapter (PEFT layout, loadable alone)
    state.safetensors   tensors: trainable weights ("model/<name>"), optimizer state
                        ("optim/<name>/<key>"), torch/CUDA RNG states ("rng/<rank>/torch")
    state.json          everything else: step, config, timings, optimizer hyperparameters,
                        python/numpy RNG states as plain lists, sha256 of state.safetensors;
                        written last, so its presence marks a complete checkpoint
Nothing is unpickled on load (safetensors + JSON only): a run directory downloaded from elsewhere
cannot execute code. Only trainable tensors are stored (not the frozen, possibly tied, LM head).

Saving writes a fresh `.checkpoint.tmp-*` folder and then rotates:
    checkpoint/ -> .checkpoint.old/,  tmp -> checkpoint/,  remove .checkpoint.old/
A kill at any point leaves a state that `calft.run_dir.recover` repairs on the next start.

calft.train checkpoints every --checkpoint-interval steps, at the end, on SIGINT/SIGTERM (after the
current step) and on a non-finite loss; the data order is a pure function of (seed, epoch, step),
so --resume continues with the same loss sequence as an uninterrupted run, bit for bit, on the
same machine with the same number of CPU threads (float sums change with it: resuming with another
count warns). Under torchrun, Ctrl-C reaches torchrun, which sends SIGTERM to the workers (and
SIGKILL 30 s later: keep steps shorter than that).
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from calft.fileio import check_target, move_files_into, temp_dir
from calft.run_dir import CKPT, OLD, RUN_MARKER, STATE_JSON, TMP_PREFIX, is_complete, metric_lines, \
    record_files, recorded_files

STATE_TENSORS = "state.safetensors"
FORMAT = 2  # 1 = the pickled state.pt of calft <= 0.1 (no longer read)


class CheckpointError(Exception):
    """A checkpoint that cannot be written (disk full, permissions) or read (damaged)."""


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save(out_dir: Path, tensors: dict, meta: dict, write_adapter=None) -> Path:
    """Write a complete checkpoint into a temp folder, then rotate it in (module docstring).
    On failure (disk full, ...) the temp folder is removed, the previous checkpoint is kept, and
    CheckpointError says what happened."""
    from safetensors.torch import save as save_tensors

    out_dir = Path(out_dir)
    ckpt, old = out_dir / CKPT, out_dir / OLD
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out_dir))
    try:
        if write_adapter is not None:
            write_adapter(tmp)
        blob = save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        _write_bytes(tmp / STATE_TENSORS, blob)
        meta = {**meta, "format": FORMAT, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
        _write_bytes(tmp / STATE_JSON, json.dumps(meta, allow_nan=True).encode())  # last: complete
        if old.exists() or old.is_symlink():  # left by an earlier kill; checkpoint/ is complete here (recover ran)
            shutil.rmtree(old)
        if ckpt.exists():
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full" if getattr(err, "errno", None) == errno.ENOSPC else f"{type(err).__name__}: {err}"
        kept = f"; the previous checkpoint in {ckpt} is intact" if is_complete(ckpt) or is_complete(old) else ""
        raise CheckpointError(f"could not write a checkpoint in {out_dir} ({why}){kept}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return ckpt


def load(ckpt: Path) -> tuple[dict, dict]:
    """(tensors, meta) of a complete checkpoint; CheckpointError naming the problem otherwise."""
    from safetensors.torch import load as load_tensors

    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        legacy = " (it holds a pickled state.pt of an older calft, which is never loaded)" \
            if (ckpt / "state.pt").exists() else ""
        raise CheckpointError(f"{ckpt} has no {STATE_JSON}: the checkpoint is incomplete{legacy}")
    try:
        meta = json.loads((ckpt / STATE_JSON).read_text())
        blob = (ckpt / STATE_TENSORS).read_bytes()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the checkpoint in {ckpt}: {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{ckpt / STATE_JSON} holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / STATE_JSON} has format {meta.get('format')!r}, expected {FORMAT}")
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        raise CheckpointError(f"{ckpt / STATE_TENSORS} does not match the digest in {STATE_JSON}: "
                              "the checkpoint is damaged")
    try:
        tensors = load_tensors(blob)
    except Exception as err:  # safetensors raises its own error type
        raise CheckpointError(f"cannot read {ckpt / STATE_TENSORS}: {err}") from err
    return tensors, meta


# ---- state <-> (tensors, JSON) -----------------------------------------------------------------------
def pack_rng(states: list[dict]) -> tuple[list, dict]:
    """Per-rank RNG states -> (JSON-able list, tensors). Each state: python = random.getstate(),
    numpy = np.random.get_state(), torch / cuda = uint8 tensors (cuda may be None)."""
    js, tensors = [], {}
    for r, s in enumerate(states):
        version, internal, gauss = s["python"]
        name, keys, pos, has_gauss, cached = s["numpy"]
        js.append({"python": [version, list(internal), gauss],
                   "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]})
        tensors[f"rng/{r}/torch"] = s["torch"]
        if s.get("cuda") is not None:
            tensors[f"rng/{r}/cuda"] = s["cuda"]
    return js, tensors


def unpack_rng(js: list, tensors: dict, rank: int) -> dict:
    """This rank's RNG states (rank 0's when the world size changed)."""
    r = rank if rank < len(js) else 0
    version, internal, gauss = js[r]["python"]
    name, keys, pos, has_gauss, cached = js[r]["numpy"]
    return {"python": (version, tuple(internal), gauss),
            "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
            "torch": tensors[f"rng/{r}/torch"], "cuda": tensors.get(f"rng/{r}/cuda")}


def rng_states(with_cuda: bool) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if with_cuda else None}


def set_rng_states(s: dict, with_cuda: bool) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if with_cuda and s["cuda"] is not None:
        torch.cuda.set_rng_state(s["cuda"])


def pack_optimizer(optim: dict) -> tuple[dict, dict]:
    """A full optimizer state dict ({"state": {name: {key: value}}, "param_groups": [...]}) ->
    (JSON-able dict without tensors, tensors keyed "optim/<name>/<key>")."""
    js, tensors = {"state": {}, "param_groups": optim["param_groups"]}, {}
    for name, entry in optim["state"].items():
        js["state"][name] = {}
        for key, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{name}/{key}"] = v
                js["state"][name][key] = {"tensor": f"optim/{name}/{key}"}
            else:
                js["state"][name][key] = v
    return js, tensors


def unpack_optimizer(js: dict, tensors: dict) -> dict:
    state = {name: {key: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                    for key, v in entry.items()} for name, entry in js["state"].items()}
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in js["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- the training state of calft.train (objective = the model wrapped by SoftTargetKLLoss) ----------
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def trainable_state(objective, trainable_names) -> dict:
    """Full (gathered) trainable tensors only: never the frozen base, tied LM head included.
    Collective under FSDP: every rank calls it."""
    return {k: v for k, v in get_model_state_dict(objective, options=FULL).items() if k in trainable_names}


def adapter_state(trainable: dict) -> dict:
    """Trainable tensors under PEFT's adapter names (the objective wraps the model as `model.`)."""
    return {k.removeprefix("model."): v.detach().cpu() for k, v in trainable.items()}


def gather_training_state(objective, optimizer, trainable_names, *, with_cuda: bool, world_size: int = 1):
    """(trainable tensors, full optimizer state, every rank's RNG states); collective when
    world_size > 1 (every rank's generators: dropout draws differ by rank)."""
    lora = trainable_state(objective, trainable_names)
    optim = get_optimizer_state_dict(objective, optimizer, options=FULL)
    rng = [rng_states(with_cuda)]
    if world_size > 1:
        rng = [None] * world_size
        dist.all_gather_object(rng, rng_states(with_cuda))
    return lora, optim, rng


def save_training_state(out_dir: Path, model, lora: dict, optim: dict, rng: list, meta: dict) -> Path:
    """`save` of a training state: tensors as safetensors, the rest (meta, RNG, optimizer
    hyperparameters) as JSON, the PEFT adapter alongside. CheckpointError when it cannot be written."""
    rng_json, rng_tensors = pack_rng(rng)
    optim_json, optim_tensors = pack_optimizer(optim)
    adapter = adapter_state(lora)
    ckpt = save(out_dir, {**{f"model/{k}": v for k, v in lora.items()}, **optim_tensors, **rng_tensors},
                {**meta, "rng": rng_json, "optimizer": optim_json},
                write_adapter=lambda d: model.save_pretrained(d, state_dict=adapter))
    try:  # the marker remembers: a later missing checkpoint/ is refused, not silently restarted
        record_files(out_dir, [], checkpointed=True)
    except OSError as err:
        raise CheckpointError(f"could not update {Path(out_dir) / RUN_MARKER}: {err.strerror or err}") from err
    return ckpt


def resume_training(ckpt: Path, objective, optimizer, trainable_names, rank: int, world_size: int,
                    with_cuda: bool, max_steps: int, steps_per_epoch: int, metrics_path: Path) -> dict:
    """calft.train's --resume: load_training_state, then this rank's RNG states; rank 0 says where it
    resumes (and warns when the thread count changed). The checkpoint's meta; CheckpointError when
    anything in it does not fit (nothing restored then is used: the run exits)."""
    try:
        state, rng = load_training_state(ckpt, objective, optimizer, trainable_names, rank, world_size,
                                         max_steps=max_steps, steps_per_epoch=steps_per_epoch, metrics_path=metrics_path)
        set_rng_states(rng, with_cuda)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, OverflowError) as err:
        raise CheckpointError(f"{type(err).__name__}: {err}") from err
    if rank == 0:
        print(f"resumed from {ckpt} at step {state['step']} (epoch {state['epoch']}, "
              f"step {state['step_in_epoch']} of {steps_per_epoch})")
        if state["threads"] != torch.get_num_threads():
            print(f"calft.train: warning: the run so far used {state['threads']} CPU threads, this "
                  f"process {torch.get_num_threads()}: the losses will not be bit-identical to an "
                  "uninterrupted run (float sums change with the thread count)", file=sys.stderr, flush=True)
    return state


def load_training_state(ckpt: Path, objective, optimizer, trainable_names, rank: int, world_size: int, *,
                        max_steps: int, steps_per_epoch: int, metrics_path: Path):
    """Load a checkpoint into `objective` and `optimizer`, once `validate_state` has checked it
    against this run; (meta, this rank's RNG states). CheckpointError when it does not fit."""
    tensors, state = load(ckpt)
    validate_state(state, tensors, max_steps=max_steps, steps_per_epoch=steps_per_epoch, metrics_path=metrics_path,
                   params={n: tuple(p.shape) for n, p in objective.named_parameters() if n in trainable_names})
    lora = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    if set(lora) != trainable_names:
        raise CheckpointError(f"{ckpt} holds {len(lora)} trainable tensors, but "
                              f"this model has {len(trainable_names)} (or other names)")
    set_model_state_dict(objective, lora, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(objective, optimizer, unpack_optimizer(state["optimizer"], tensors),
                             options=StateDictOptions(full_state_dict=True))
    return state, unpack_rng(state["rng"], tensors, rank if state["world_size"] == world_size else 0)


def save_outputs(out_dir: Path, model, adapter: dict, tokenizer) -> None:
    """The final adapter and tokenizer at the top of out_dir: written into a temp folder, listed
    in the marker, then renamed into place file by file (a user's README.md stays: PEFT writes a
    model card)."""
    out_dir = Path(out_dir)
    with temp_dir(out_dir, "outputs") as tmp:
        model.save_pretrained(tmp, state_dict=adapter)
        tokenizer.save_pretrained(tmp)
        if (out_dir / "README.md").exists() and "README.md" not in recorded_files(out_dir):
            (tmp / "README.md").unlink(missing_ok=True)
        record_files(out_dir, [p.name for p in tmp.iterdir()])
        move_files_into(tmp, out_dir, root=out_dir)


def save_snapshot(out_dir: Path, model, adapter: dict, step: int) -> None:
    """The adapter after `step` in snapshots/step_<step>, written to a temp folder and renamed
    (never through a link: OSError / UnsafePathError)."""
    record_files(out_dir, ["snapshots"])
    folder = check_target(Path(out_dir) / "snapshots", out_dir)
    folder.mkdir(exist_ok=True)
    final = check_target(folder / f"step_{step}", out_dir)
    with temp_dir(folder, final.name) as tmp:
        model.save_pretrained(tmp / "new", state_dict=adapter)
        if final.exists():  # a redone step after --resume replaces its snapshot
            os.replace(final, tmp / "old")  # deleted with tmp
        os.replace(tmp / "new", final)


# ---- the one validation of a loaded training state ------------------------------------------------
def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _words(x, n: int) -> bool:
    """A list of n integers in [0, 2**32): a Mersenne Twister's state words."""
    return isinstance(x, list) and len(x) == n and all(_int(w) and 0 <= w < 2**32 for w in x)


def validate_state(meta: dict, tensors: dict, *, params: dict, max_steps: int, steps_per_epoch: int,
                   metrics_path: Path) -> None:
    """Check a loaded checkpoint against this run before anything is restored: the types and
    ranges of every state.json value, the RNG states, the optimizer state against the trainable
    tensors (`params`: name -> shape; AdamW's step count = the state's step), and the state's
    step and loss against metrics.jsonl. CheckpointError naming the first problem."""
    def bad(what):
        raise CheckpointError(f"{STATE_JSON}: {what}")

    step = meta.get("step")
    if not _int(step) or not 0 <= step <= max_steps:
        bad(f"step {step!r} is not a whole number in [0, {max_steps}] (this run's steps)")
    for key, low in (("tokens", 0), ("segments", 1), ("threads", 1), ("world_size", 1), ("epoch", 0),
                     ("step_in_epoch", 0)):
        if not _int(meta.get(key)) or meta[key] < low:
            bad(f"{key} {meta.get(key)!r} is not a whole number >= {low}")
    if (meta["epoch"], meta["step_in_epoch"]) != divmod(step, steps_per_epoch):
        bad(f"epoch {meta['epoch']} / step_in_epoch {meta['step_in_epoch']} do not match step {step} "
            f"({steps_per_epoch} steps per epoch)")
    if not _num(meta.get("train_time_s")) or not 0 <= meta["train_time_s"] < math.inf:
        bad(f"train_time_s {meta.get('train_time_s')!r} is not a finite number >= 0")
    loss = meta.get("loss")
    if not _num(loss) or (step > 0 and not math.isfinite(loss)):
        bad(f"loss {loss!r} is not a finite number")
    rng = meta.get("rng")
    if not isinstance(rng, list) or len(rng) != meta["world_size"]:
        bad(f"rng holds {len(rng) if isinstance(rng, list) else rng!r} states for {meta['world_size']} processes")
    torch_size = torch.get_rng_state().numel()
    for r, s in enumerate(rng):
        py, npy = (s.get("python"), s.get("numpy")) if isinstance(s, dict) else (None, None)
        if not (isinstance(py, list) and len(py) == 3 and py[0] == 3 and _words(py[1], 625) and py[1][-1] <= 624
                and (py[2] is None or _num(py[2]))):
            bad(f"rng[{r}].python is not a Python random state (version 3, 625 words in [0, 2**32))")
        if not (isinstance(npy, list) and len(npy) == 5 and npy[0] == "MT19937" and _words(npy[1], 624)
                and _int(npy[2]) and 0 <= npy[2] <= 624 and npy[3] in (0, 1) and _num(npy[4])):
            bad(f"rng[{r}].numpy is not a numpy MT19937 state (624 words in [0, 2**32), position <= 624)")
        t = tensors.get(f"rng/{r}/torch")
        if t is None or t.dtype != torch.uint8 or t.shape != (torch_size,):
            bad(f"the torch RNG state of process {r} is missing or not {torch_size} bytes")
    optim = meta.get("optimizer")
    if not (isinstance(optim, dict) and isinstance(optim.get("state"), dict) and isinstance(optim.get("param_groups"), list)
            and optim["param_groups"] and all(isinstance(g, dict) for g in optim["param_groups"])):
        bad("optimizer is not an object with a state and param_groups")
    for g in optim["param_groups"]:
        betas = g.get("betas")
        if not (isinstance(betas, list) and len(betas) == 2 and all(_num(b) and 0 <= b < 1 for b in betas)):
            bad(f"optimizer betas {betas!r} are not two numbers in [0, 1)")
        for key, low in (("lr", 0), ("eps", 0), ("weight_decay", 0)):
            if not _num(g.get(key)) or not low <= g[key] < math.inf:
                bad(f"optimizer {key} {g.get(key)!r} is not a finite number >= {low}")
        if not isinstance(g.get("params"), list):
            bad("optimizer param_groups without their params")
    if step > 0 and set(optim["state"]) != set(params):
        bad(f"the optimizer state covers {len(optim['state'])} tensors, this model trains {len(params)}")
    for name, entry in optim["state"].items():
        if name not in params or not isinstance(entry, dict):
            bad(f"optimizer state for an unknown tensor {name!r}")
        for key, value in entry.items():
            t = tensors.get(value["tensor"]) if isinstance(value, dict) and isinstance(value.get("tensor"), str) else None
            if key == "step":
                count = t.item() if t is not None and t.numel() == 1 else value
                if not _num(count) or count != step:
                    bad(f"optimizer step count {count!r} of {name} differs from step {step}")
            elif key in ("exp_avg", "exp_avg_sq"):
                if t is None or tuple(t.shape) != tuple(params[name]) or not torch.isfinite(t).all() or \
                        (key == "exp_avg_sq" and (t < 0).any()):
                    bad(f"optimizer {key} of {name} is missing, of another shape or not finite")
    for name, shape in params.items():
        t = tensors.get(f"model/{name}")
        if t is None or tuple(t.shape) != tuple(shape) or not torch.isfinite(t).all():
            bad(f"weight {name} is missing, of another shape or not finite")
    if step > 0:
        logged = {r["step"]: r.get("loss") for _, r in metric_lines(metrics_path)} if Path(metrics_path).is_file() else {}
        if step not in logged:
            bad(f"step {step} is not in {metrics_path.name} (its checkpoint is always logged there first)")
        if logged[step] != loss:
            bad(f"the loss of step {step} is {loss!r}, but {metrics_path.name} logged {logged[step]!r}")
