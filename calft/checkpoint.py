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

from calft.fileio import (TMP_MARK, check_target, file_lock, hold_lock, move_files_into,  # noqa: F401
                          release_locks, remove_temps, temp_dir, write_atomic)

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


def _marker(out_dir: Path) -> dict:
    try:
        marker = json.loads((Path(out_dir) / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def record_files(out_dir: Path, names, **flags) -> None:
    """Add `names` (paths relative to out_dir) to the marker's list of files calft wrote, and
    set `flags` in it (checkpointed=True: the run has written a checkpoint). Unchanged: no write."""
    marker = _marker(out_dir)
    files = set(marker.get("files", [])) if isinstance(marker.get("files"), list) else set()
    new = {**marker, **flags, "calft_run": 1, "files": sorted(files | {str(n) for n in names})}
    if new != marker:
        write_atomic(Path(out_dir) / RUN_MARKER, json.dumps(new, indent=1), root=out_dir)


def write_run_file(out_dir: Path, name: str, text: str) -> None:
    """A file of the run at the top of out_dir: listed in the marker, then written atomically."""
    record_files(out_dir, [name])
    write_atomic(Path(out_dir) / name, text, root=out_dir)


def recorded_files(out_dir: Path) -> set:
    """The names the marker lists as written by calft."""
    files = _marker(out_dir).get("files", [])
    return set(files) if isinstance(files, list) else set()


def was_checkpointed(out_dir: Path) -> bool:
    """The run in out_dir wrote a checkpoint at some point (its marker says so)."""
    return _marker(out_dir).get("checkpointed") is True


def _remove(p: Path) -> None:
    """Delete a file, a folder, or only the link when `p` is a symbolic link."""
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)


def remove_run(out_dir: Path) -> None:
    """Delete what a calft run wrote in `out_dir` (listed in its marker, plus checkpoint folders),
    leaving every other file; the lock file stays (another process may be waiting on it). A
    symbolic link is removed itself, never what it points to."""
    out_dir = Path(out_dir)
    files = _marker(out_dir).get("files", [])
    for name in files if isinstance(files, list) else ():
        if not isinstance(name, str) or "/" in name or name in ("", ".", "..", LOCK_NAME, RUN_MARKER):
            continue  # only plain names directly inside the run dir
        _remove(out_dir / name)
    for d in [out_dir / CKPT, out_dir / OLD, *out_dir.glob(TMP_PREFIX + "*")]:
        _remove(d)
    (out_dir / RUN_MARKER).unlink()


class RunDirError(ValueError):
    """A run directory that cannot be claimed: the message says why and what to do."""


# names calft writes at the top of a run dir besides the marker's list: none may be a link
_OWN_NAMES = ("config.json", "metrics.jsonl", "summary.json", "eval.json", "snapshots", CKPT, OLD, RUN_MARKER)


def _is_own_temp(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name or name == RUN_MARKER + ".tmp"


def claim_run_dir(out_dir: Path, config: dict, run_only_fields, *, resume: bool, overwrite: bool,
                  max_steps: int, prog: str = "calft.train", defaults: dict | None = None) -> str:
    """Make `out_dir` this process's run directory, or raise RunDirError (nothing written).

    Only a directory calft started a run in (its marker) is reused, resumed or overwritten; one
    process at a time (an flock held until release_locks() or exit). A run with the same config
    (fields outside `run_only_fields`) is resumed with `resume`, replaced with `overwrite` (only
    the files it wrote are deleted), refused otherwise. A symbolic link where calft writes is
    refused (with `overwrite`: the link is removed). Temp files of killed writers are removed.
    config.json is written for a new run only. Returns "new", "resume" (checkpoint/ recovered if
    a kill left it mid-rotation) or "finished" (nothing written). A --resume whose checkpoint/ is
    gone although the run wrote one is refused, never silently restarted from step 0. A field
    that an older run's config lacks (added to calft since) counts as its value in `defaults`.
    """
    out_dir = Path(out_dir)
    train_fields = {k: v for k, v in config.items() if k not in run_only_fields}
    if out_dir.is_dir() and not is_run(out_dir) and \
            any(p.name != LOCK_NAME and not _is_own_temp(p.name) for p in out_dir.iterdir()):
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
    for p in list(out_dir.iterdir()):  # we hold the lock: temp files are those of killed writers
        if _is_own_temp(p.name) and not p.name.startswith(TMP_PREFIX):
            _remove(p)
    if (out_dir / "snapshots").is_dir() and not (out_dir / "snapshots").is_symlink():
        remove_temps(out_dir / "snapshots")
    files = _marker(out_dir).get("files", [])
    names = {*_OWN_NAMES, *(n for n in (files if isinstance(files, list) else []) if isinstance(n, str) and "/" not in n)}
    links = sorted(n for n in names if n not in ("", ".", "..") and (out_dir / n).is_symlink())
    if links and not overwrite:
        raise RunDirError(f"{out_dir / links[0]} is a symbolic link (to {os.readlink(out_dir / links[0])}); calft "
                          "never writes through one: remove it, or pass --overwrite to start the run over "
                          "(that removes the link, never what it points to)")
    for n in links:
        (out_dir / n).unlink()
    if is_run(out_dir):
        old = _read_config(out_dir)
        if overwrite:
            remove_run(out_dir)  # only the files calft wrote
        else:
            old = train_fields if old is None else \
                {k: v for k, v in {**(defaults or {}), **old}.items() if k not in run_only_fields}
            if old != train_fields:
                diff = {k: (old.get(k), train_fields.get(k)) for k in set(old) | set(train_fields)
                        if old.get(k) != train_fields.get(k)}
                raise RunDirError(f"{out_dir} holds a run with a different config {diff} (old, new): pass "
                                  "--overwrite to replace it or choose another --output-dir")
            if not resume:
                raise RunDirError(f"{out_dir} already holds this run: pass --resume to continue it or "
                                  "--overwrite to start over")
            if finished(out_dir, max_steps):
                return "finished"
            if not (out_dir / "config.json").is_file():  # killed before its first write
                write_atomic(out_dir / "config.json", json.dumps(config, indent=2), root=out_dir)
            if recover(out_dir) is None:
                if was_checkpointed(out_dir):  # deleted, not "never written"
                    raise RunDirError(f"cannot resume: {out_dir / CKPT} is missing, but this run wrote checkpoints "
                                      f"(its {RUN_MARKER} says so); nothing was changed. Pass --overwrite instead "
                                      "of --resume to start this run over")
                if (out_dir / "metrics.jsonl").exists():
                    print(f"{prog}: warning: {out_dir} has no checkpoint (the run stopped before its first "
                          "one): starting from step 0 again", file=sys.stderr, flush=True)
            return "resume"
    elif resume:
        print(f"{prog}: warning: no run in {out_dir} yet: --resume starts a new one",
              file=sys.stderr, flush=True)
    record_files(out_dir, ["config.json", "metrics.jsonl"])
    write_atomic(out_dir / "config.json", json.dumps(config, indent=2), root=out_dir)
    return "new"


def _read_config(out_dir: Path) -> dict | None:
    """The run's config: config.json, else the one its checkpoint holds; None when neither exists."""
    for path, key in ((out_dir / "config.json", None), (out_dir / CKPT / STATE_JSON, "config"),
                      (out_dir / OLD / STATE_JSON, "config")):
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        value = value.get(key) if key and isinstance(value, dict) else value
        if isinstance(value, dict):
            return value
    return None


def truncate_metrics(metrics_path: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step` (steps logged after the checkpoint a run
    resumes from are redone) and drop a torn last line; rewritten atomically."""
    metrics_path = Path(metrics_path)
    if not metrics_path.exists():
        return
    kept = [line for line, record in _metric_lines(metrics_path) if record["step"] <= step]
    write_atomic(metrics_path, "".join(ln + "\n" for ln in kept), root=metrics_path.parent)


def _metric_lines(metrics_path: Path):
    """(line, record) of every whole, well-formed line of metrics.jsonl."""
    out = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append((line, record))
    return out


def finished(out_dir: Path, max_steps: int) -> bool:
    """The run in out_dir finished: summary.json (written last) parses and counts max_steps."""
    try:
        summary = json.loads((Path(out_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("steps") == max_steps and \
        (Path(out_dir) / "adapter_model.safetensors").is_file()


# ---- rotation ------------------------------------------------------------------------------------
def is_complete(ckpt: Path) -> bool:
    return (Path(ckpt) / STATE_JSON).is_file()


def recover(out_dir: Path) -> Path | None:
    """Repair whatever a kill left (module docstring); the checkpoint to resume from, or None."""
    out_dir = Path(out_dir)
    for tmp in out_dir.glob(TMP_PREFIX + "*"):
        _remove(tmp)
    ckpt, old = out_dir / CKPT, out_dir / OLD
    for p in (ckpt, old):
        check_target(p, out_dir)  # claim_run_dir refused links; one planted since is never followed
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
        logged = {r["step"]: r.get("loss") for _, r in _metric_lines(metrics_path)} if Path(metrics_path).is_file() else {}
        if step not in logged:
            bad(f"step {step} is not in {metrics_path.name} (its checkpoint is always logged there first)")
        if logged[step] != loss:
            bad(f"the loss of step {step} is {loss!r}, but {metrics_path.name} logged {logged[step]!r}")
