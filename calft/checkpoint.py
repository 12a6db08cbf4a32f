"""Run directories and checkpoints: ownership marker, claiming a run directory, atomic save,
rotation, recovery, metrics truncation on resume (locks and atomic writes: calft.fileio).

A run directory (--output-dir) belongs to calft when it holds RUN_MARKER, a JSON file calft
writes when a run starts and which lists every file the run wrote there. `--overwrite` deletes
only those files (and the checkpoint folders), never a directory calft did not create and never a
file the user put next to them.

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
A kill at any point leaves a state `recover` repairs on the next start: a complete checkpoint/
wins; otherwise a complete .checkpoint.old/ is moved back; temp folders are removed.

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

from calft.fileio import file_lock, hold_lock, release_locks, write_atomic  # noqa: F401 (re-exported)

RUN_MARKER = ".calft-run.json"
LOCK_NAME = ".calft.lock"  # flock'ed by the process that trains in the directory
CKPT, OLD, TMP_PREFIX = "checkpoint", ".checkpoint.old", ".checkpoint.tmp-"
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"
FORMAT = 2  # 1 = the pickled state.pt of calft <= 0.1 (no longer read)


class CheckpointError(Exception):
    """A checkpoint that cannot be written (disk full, permissions) or read (damaged)."""


# ---- run marker ----------------------------------------------------------------------------------
def is_run(out_dir: Path) -> bool:
    """True when `out_dir` holds calft's own marker (a run calft started there)."""
    try:
        return json.loads((Path(out_dir) / RUN_MARKER).read_text()).get("calft_run") == 1
    except (OSError, ValueError, AttributeError):
        return False


def record_files(out_dir: Path, names) -> None:
    """Add `names` (paths relative to out_dir) to the marker's list of files calft wrote."""
    path = Path(out_dir) / RUN_MARKER
    files = set(json.loads(path.read_text())["files"]) if path.is_file() else set()
    files |= {str(n) for n in names}
    write_atomic(path, json.dumps({"calft_run": 1, "files": sorted(files)}, indent=1))


def remove_run(out_dir: Path) -> None:
    """Delete what a calft run wrote in `out_dir` (listed in its marker, plus checkpoint folders),
    leaving every other file; the lock file stays (another process may be waiting on it)."""
    out_dir = Path(out_dir)
    files = json.loads((out_dir / RUN_MARKER).read_text()).get("files", [])
    for name in files:
        p = out_dir / name
        if p.resolve().parent != out_dir.resolve() or name in (LOCK_NAME, RUN_MARKER):
            continue  # only plain names directly inside the run dir
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for d in [out_dir / CKPT, out_dir / OLD, *out_dir.glob(TMP_PREFIX + "*")]:
        shutil.rmtree(d, ignore_errors=True)
    (out_dir / RUN_MARKER).unlink()


class RunDirError(ValueError):
    """A run directory that cannot be claimed: the message says why and what to do."""


def claim_run_dir(out_dir: Path, config: dict, run_only_fields, *, resume: bool, overwrite: bool,
                  prog: str = "calft.train") -> None:
    """Make `out_dir` this process's run directory, or raise RunDirError (nothing changed).

    Only a directory calft started a run in (its marker) is reused, resumed or overwritten; one
    process at a time (an flock held until release_locks() or exit). A run with the same
    config (fields outside `run_only_fields`) is resumed with `resume`, replaced with
    `overwrite` (only the files it wrote are deleted), refused otherwise. Writes config.json.
    """
    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    train_fields = {k: v for k, v in config.items() if k not in run_only_fields}
    if out_dir.is_dir() and not is_run(out_dir) and any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        raise RunDirError(f"{out_dir} is not empty and holds no calft run (no {RUN_MARKER}): choose "
                          "another --output-dir, or an empty or new one")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        locked = hold_lock(out_dir / LOCK_NAME)  # held until the process ends
    except OSError as err:
        raise RunDirError(f"cannot write to --output-dir {out_dir}: {err.strerror or err}") from None
    if not locked:
        raise RunDirError(f"another {prog} process is running in {out_dir} (it holds "
                          f"{out_dir / LOCK_NAME}): wait for it to finish, or choose another --output-dir")
    if is_run(out_dir):
        try:
            old = json.loads((out_dir / "config.json").read_text())
        except (OSError, ValueError):
            old = {}
        old = {k: v for k, v in old.items() if k not in run_only_fields}
        if overwrite:
            remove_run(out_dir)  # only the files calft wrote
        elif old != train_fields:
            diff = {k: (old.get(k), train_fields.get(k)) for k in set(old) | set(train_fields)
                    if old.get(k) != train_fields.get(k)}
            raise RunDirError(f"{out_dir} holds a run with a different config {diff} (old, new): pass "
                              "--overwrite to replace it or choose another --output-dir")
        elif not resume:
            raise RunDirError(f"{out_dir} already holds this run: pass --resume to continue it or "
                              "--overwrite to start over")
        elif recover(out_dir) is None and metrics_path.exists():
            print(f"{prog}: warning: {out_dir} has no checkpoint (the run stopped before its "
                  "first one): starting from step 0 again", file=sys.stderr, flush=True)
    elif resume:
        print(f"{prog}: warning: no run in {out_dir} yet: --resume starts a new one",
              file=sys.stderr, flush=True)
    record_files(out_dir, ["config.json", "metrics.jsonl"])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def truncate_metrics(metrics_path: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step` (steps logged after the checkpoint a run
    resumes from are redone) and drop a torn last line."""
    metrics_path = Path(metrics_path)
    if not metrics_path.exists():
        return
    kept = []
    for line in metrics_path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    metrics_path.write_text("".join(ln + "\n" for ln in kept))


# ---- rotation ------------------------------------------------------------------------------------
def is_complete(ckpt: Path) -> bool:
    return (Path(ckpt) / STATE_JSON).is_file()


def recover(out_dir: Path) -> Path | None:
    """Repair whatever a kill left (module docstring); the checkpoint to resume from, or None."""
    out_dir = Path(out_dir)
    for tmp in out_dir.glob(TMP_PREFIX + "*"):
        shutil.rmtree(tmp, ignore_errors=True)
    ckpt, old = out_dir / CKPT, out_dir / OLD
    if ckpt.is_dir() and not is_complete(ckpt) and is_complete(old):
        shutil.rmtree(ckpt)
    if not ckpt.exists() and is_complete(old):
        os.replace(old, ckpt)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return ckpt if ckpt.exists() else None


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


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
        if old.exists():  # left by an earlier kill; checkpoint/ is complete here (recover ran)
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
    return save(out_dir, {**{f"model/{k}": v for k, v in lora.items()}, **optim_tensors, **rng_tensors},
                {**meta, "rng": rng_json, "optimizer": optim_json},
                write_adapter=lambda d: model.save_pretrained(d, state_dict=adapter))


def load_training_state(ckpt: Path, objective, optimizer, trainable_names, rank: int, world_size: int):
    """Load a checkpoint into `objective` and `optimizer`; (meta, this rank's RNG states).
    CheckpointError (or KeyError / ValueError / RuntimeError) when it does not fit."""
    tensors, state = load(ckpt)
    lora = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    if set(lora) != trainable_names:
        raise CheckpointError(f"{ckpt} holds {len(lora)} trainable tensors, but "
                              f"this model has {len(trainable_names)} (or other names)")
    set_model_state_dict(objective, lora, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(objective, optimizer, unpack_optimizer(state["optimizer"], tensors),
                             options=StateDictOptions(full_state_dict=True))
    return state, unpack_rng(state["rng"], tensors, rank if state["world_size"] == world_size else 0)


def save_snapshot(out_dir: Path, model, adapter: dict, step: int) -> None:
    """The adapter after `step` in snapshots/step_<step>, written to a temp name and renamed."""
    record_files(out_dir, ["snapshots"])
    final = Path(out_dir) / "snapshots" / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=adapter)
    shutil.rmtree(final, ignore_errors=True)  # a redone step after --resume replaces its snapshot
    os.replace(tmp, final)
