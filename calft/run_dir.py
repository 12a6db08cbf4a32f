"""Run directories: calft's ownership marker, claiming a directory for a run (one process at a
time, same config or --overwrite), resuming, metrics truncation, and the rotation of its
checkpoint folders (which folder a kill left complete). What a checkpoint holds, and writing and
reading it: calft.checkpoint. Locks and atomic writes: calft.fileio.

A run directory (--output-dir) belongs to calft when it holds RUN_MARKER, a JSON file calft
writes when a run starts and which lists every file the run wrote there. `--overwrite` deletes
only those files (and the checkpoint folders), never a directory calft did not create and never a
file the user put next to them.

Checkpoint folders: `checkpoint/` (the current one), `.checkpoint.old/` (the previous one while a
save rotates) and `.checkpoint.tmp-*` (a save in progress); a folder is complete once it holds
state.json (written last). `recover` repairs what a kill left: a complete checkpoint/ wins;
otherwise a complete .checkpoint.old/ is moved back; temp folders are removed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from calft.cli import as_flags
from calft.fileio import TMP_MARK, check_target, hold_lock, remove_temps, write_atomic

RUN_MARKER = ".calft-run.json"
LOCK_NAME = ".calft.lock"  # flock'ed by the process that trains in the directory
CKPT, OLD, TMP_PREFIX = "checkpoint", ".checkpoint.old", ".checkpoint.tmp-"
STATE_JSON = "state.json"  # written last into a checkpoint folder: it marks the folder complete



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
                # a field calft has dropped since (absent from train_fields) has no flag to continue with
                resumable = all(k in train_fields and k in old for k in diff)
                how = f"continue it with --resume {as_flags({k: old[k] for k in diff})}, " if resumable else ""
                raise RunDirError(f"{out_dir} holds a run with a different config {diff} (old, new): {how}"
                                  "pass --overwrite to replace it, or choose another --output-dir")
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
    kept = [line for line, record in metric_lines(metrics_path) if record["step"] <= step]
    write_atomic(metrics_path, "".join(ln + "\n" for ln in kept), root=metrics_path.parent)


def metric_lines(metrics_path: Path):
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
