"""Fault injection at calft's write sites, from outside the package (issue 19).

A Python audit hook (sys.addaudithook) sees every file write Python makes: open() for writing or
appending, os.open with write flags, renames, removals, mkdir, temp files and rmtree. Under the
roots it is given (a run directory, a cache directory) it can

- record each write event as a *site* (the event, and the path with random temp names, cache keys
  and the roots normalized away), so a sweep can visit every site of a run;
- kill the process (SIGKILL) at the n-th event of one site. A truncating open is applied first,
  so a file that is rewritten in place is caught at its worst moment: emptied, not yet refilled;
- fail the n-th matching write with ENOSPC ("no space left on device"), as a full disk does.

Writes made outside Python (safetensors' and tokenizers' Rust code) are not seen; the Python
writes around them (the temp folder, the rename) are.

`python tests/faults.py sweep WORK MODEL` runs the kill sweep of tests/test_reliability_round2.py:
one process that imports torch and calft once, then forks a child per run (the parent never runs
torch, so forking is safe), and prints one JSON object.
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys

_CONFIG: dict = {}  # action, roots, and what to match; empty = the hook does nothing
_ACTIVE = [False]  # re-entry guard (the hook itself touches files)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_EVENTS = ("open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.symlink",
           "shutil.rmtree", "tempfile.mkstemp", "tempfile.mkdtemp")


def install() -> None:
    """Add the hook once per process (audit hooks cannot be removed: it stays inert when unset)."""
    if not getattr(sys, "_calft_fault_hook", False):
        sys.addaudithook(_hook)
        sys._calft_fault_hook = True


def configure(**config) -> None:
    """action: "record" | "kill" | "enospc"; roots: {tag: folder}; for kill: site, occurrence;
    for enospc: match (a callable on the kind of open, "open-w" or "open-a", and the absolute
    path) and occurrence; log: a file path where
    recorded sites / fired faults are appended (JSON lines)."""
    _CONFIG.clear()
    _CONFIG.update(config)
    _CONFIG["counts"] = {}


def reset() -> None:
    _CONFIG.clear()


def _path(p, dir_fd=None) -> str | None:
    if isinstance(p, int):
        try:
            return os.readlink(f"/proc/self/fd/{p}")
        except OSError:
            return None
    try:
        p = os.fsdecode(p)
    except TypeError:
        return None
    if not os.path.isabs(p):
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) else os.getcwd()
        p = os.path.join(base, p)
    return os.path.normpath(p)


def normalize(path: str, roots: dict) -> str | None:
    """The site name of a path under one of the roots (None when outside them)."""
    for tag, root in roots.items():
        if path == root or path.startswith(root + os.sep):
            rel = path[len(root):]
            rel = re.sub(r"[0-9a-f]{32}", "<key>", rel)
            rel = re.sub(r"(tmp|\.tmp-|\.checkpoint\.tmp-)[A-Za-z0-9_]{6,}", r"\1*", rel)
            return tag + rel
    return None


def _describe(event: str, args):
    """(kind, [absolute paths], truncates) of a write event, or None for reads and other events."""
    if event not in _EVENTS:
        return None
    if event == "open":
        path, mode, flags = args
        if mode is not None:
            writes = any(c in str(mode) for c in "wax+")
            truncates = "w" in str(mode)
        else:
            writes = bool(flags & _WRITE_FLAGS)
            truncates = bool(flags & os.O_TRUNC)
        if not writes:
            return None
        p = _path(path)
        return ("open-" + ("w" if truncates else "a"), [p] if p else [], truncates)
    if event == "os.rename":
        src, dst, src_fd, dst_fd = args
        return ("rename", [_path(src, src_fd), _path(dst, dst_fd)], False)
    if event in ("os.remove", "os.rmdir", "os.mkdir"):
        path, dir_fd = args[0], args[-1]
        return (event[3:], [_path(path, dir_fd if isinstance(dir_fd, int) else None)], False)
    return (event.split(".")[-1], [_path(args[0])], False)


def _hook(event, args):
    if not _CONFIG or _ACTIVE[0] or event not in _EVENTS:
        return
    _ACTIVE[0] = True
    try:
        described = _describe(event, args)
        if described is None:
            return
        kind, paths, truncates = described
        paths = [p for p in paths if p]
        if not paths or any(os.path.basename(p).endswith(".lock") for p in paths):
            return
        roots = _CONFIG.get("roots", {})
        names = [normalize(p, roots) for p in paths]
        if names[0] is None and (len(names) < 2 or names[1] is None):
            return
        site = kind + ":" + "->".join(n or "<outside>" for n in names)
        action = _CONFIG.get("action")
        counts = _CONFIG["counts"]
        if action == "record":
            counts[site] = counts.get(site, 0) + 1
            _log({"site": site, "occurrence": counts[site]})
        elif action == "kill" and site == _CONFIG["site"]:
            counts[site] = counts.get(site, 0) + 1
            if counts[site] == _CONFIG.get("occurrence", 1):
                if truncates and os.path.isdir(os.path.dirname(paths[0])):
                    open(paths[0], "w").close()  # what the open is about to do: the worst moment
                _log({"killed": site})
                os.kill(os.getpid(), signal.SIGKILL)
        elif action == "enospc" and kind.startswith("open") and _CONFIG["match"](kind, paths[0]):
            counts["match"] = counts.get("match", 0) + 1
            if counts["match"] >= _CONFIG.get("occurrence", 1) and not _CONFIG.get("fired"):
                _CONFIG["fired"] = site
                _log({"enospc": site})
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), paths[0])
    finally:
        _ACTIVE[0] = False


def _log(record: dict) -> None:
    if _CONFIG.get("log"):
        with open(_CONFIG["log"], "a") as f:  # outside the roots: not an event of the run
            f.write(json.dumps(record) + "\n")


# ---- the kill sweep: one warm parent, a forked child per run ------------------------------------
def _run_child(args: list, cache: str, out: str, fault: dict | None) -> int:
    """python -m calft.train `args` in a forked child (1 thread): its exit status, -9 if killed."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import runpy

            import torch

            torch.set_num_threads(1)
            os.environ["CALFT_CACHE_DIR"] = cache
            if fault:
                configure(**fault)
            sys.argv = ["calft.train", *map(str, args)]
            try:
                runpy.run_module("calft.train", run_name="__main__")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run_args(model: str, out: str, *extra) -> list:
    """The tiny run of the sweep: 6 steps, a checkpoint every 2, a snapshot at step 5."""
    return ["--model", model, "--output-dir", out, "--families", "gaussian,binomial",
            "--max-prompts-per-family", "4", "--num-decimals", "1", "--max-bins", "40",
            "--batch-size", "4", "--micro-batch-size", "2", "--lora-r", "4", "--lora-alpha", "8",
            "--lora-targets", "q_proj,v_proj", "--lora-dropout", "0.1", "--lr", "1e-2", "--max-steps", "6",
            "--no-share-prompt", "--samples-per-prompt", "1", "--no-trie-pack", "--no-progress",
            "--checkpoint-interval", "2", "--snapshot-steps", "5", *extra]


def finish_args(model: str, out: str) -> list:
    """--resume to the end, with a small final evaluation (its tables, figure and eval.json)."""
    return run_args(model, out, "--resume", "--eval-split", "test_within_range", "--eval-decimals", "1",
                    "--eval-bins", "20", "--eval-prompts-per-family", "1", "--eval-samples", "0")


def outcome(out: str, cache: str) -> dict:
    """What a finished run holds: losses, adapter and snapshot tensors (hex of their bytes),
    summary and eval numbers, files that do not parse, temp files left behind."""
    from pathlib import Path

    from safetensors.torch import load_file

    out_p = Path(out)
    res = {"bad_json": [], "leftovers": []}
    try:
        res["losses"] = [json.loads(line)["loss"] for line in (out_p / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError, KeyError) as err:
        res["losses"] = f"unreadable: {err}"

    def tensors(path):
        try:
            t = load_file(str(path))
            return {k: v.numpy().tobytes().hex() for k, v in sorted(t.items())}
        except Exception as err:  # noqa: BLE001 (any damage is a difference)
            return f"unreadable: {err}"

    res["adapter"] = tensors(out_p / "adapter_model.safetensors")
    res["snapshot"] = tensors(out_p / "snapshots" / "step_5" / "adapter_model.safetensors")
    try:
        s = json.loads((out_p / "summary.json").read_text())
        res["summary"] = {k: s.get(k) for k in ("steps", "final_loss", "tokens", "segments")}
        res["summary"].pop("segments")
    except (OSError, ValueError) as err:
        res["summary"] = f"unreadable: {err}"
    try:
        e = json.loads((out_p / "eval.json").read_text())
        res["eval"] = json.dumps(e.get("splits", e), sort_keys=True, default=str)[:100000]
    except (OSError, ValueError) as err:
        res["eval"] = f"unreadable: {err}"
    for p in out_p.rglob("*.json"):
        try:
            json.loads(p.read_text())
        except (OSError, ValueError):
            res["bad_json"].append(str(p.relative_to(out_p)))
    for root in (out_p, Path(cache)):
        for p in root.rglob("*"):
            if re.search(r"(^|\.)tmp", p.name) and ".lock" not in p.name:
                res["leftovers"].append(str(p))
    return res


def sweep(work: str, model: str) -> dict:
    """Kill a run at the first event of every write site, resume it, compare with an
    uninterrupted run. Phase A: a run stopped at step 3 (cold data cache); phase B: its --resume
    to step 6 plus the final outputs. Each site of each phase is one trial."""
    import shutil
    import tempfile

    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "events.jsonl")

    def fresh(name):
        d = tempfile.mkdtemp(prefix=name + "-", dir=work)
        return os.path.join(d, "run"), os.path.join(d, "cache")

    def sites(phase_log, skip=()):
        """The first event of each written path (renames and removals: of each pair / folder)."""
        seen, keys = [], set(skip)
        with open(phase_log) as f:
            for line in f:
                site = json.loads(line).get("site", "")
                kind, _, where = site.partition(":")
                if kind in ("mkdir", "mkdtemp", "mkstemp"):
                    continue  # the next write of the new path is the same moment
                src = where.split("->")[0]
                if kind in ("remove", "rmdir") or (kind == "rename" and ".tmp-*/" in src):
                    where = os.path.dirname(src) + "/*"  # one file of a folder being emptied
                key = (kind if kind in ("rename", "rmtree") else "file", where)
                if key not in keys:
                    keys.add(key)
                    seen.append((site, key))
        return seen

    # reference: A then B, recording the sites of each
    ref, ref_cache = fresh("ref")
    roots = lambda out, cache: {"RUN": out, "CACHE": cache}  # noqa: E731
    log_a, log_b = log + ".a", log + ".b"
    code_a = _run_child(run_args(model, ref, "--stop-at-step", "3", "--no-eval"), ref_cache, ref + ".log",
                        dict(action="record", roots=roots(ref, ref_cache), log=log_a))
    stopped, stopped_cache = ref + "-stopped", ref_cache + "-stopped"
    shutil.copytree(ref, stopped, symlinks=True)
    shutil.copytree(ref_cache, stopped_cache, symlinks=True)
    code_b = _run_child(finish_args(model, ref), ref_cache, ref + ".log",
                        dict(action="record", roots=roots(ref, ref_cache), log=log_b))
    result = {"reference_codes": [code_a, code_b], "trials": []}
    if (code_a, code_b) != (0, 0):
        result["reference_log"] = open(ref + ".log").read()[-3000:]
        return result
    want = outcome(ref, ref_cache)
    result["reference"] = {k: (v if k in ("summary", "leftovers", "bad_json") else str(v)[:80])
                           for k, v in want.items()}
    sites_a = sites(log_a)
    trials = [("A", site) for site, _ in sites_a] + [("B", site) for site, _ in sites(log_b, [k for _, k in sites_a])]

    def trial(phase, site):
        out, cache = fresh("trial")
        if phase == "A":
            args = run_args(model, out, "--stop-at-step", "3", "--no-eval")
        else:
            shutil.copytree(stopped, out, symlinks=True)
            shutil.copytree(stopped_cache, cache, symlinks=True)
            args = finish_args(model, out)
        fault = dict(action="kill", roots=roots(out, cache), site=site, occurrence=1, log=log)
        killed = _run_child(args, cache, out + ".log", fault)
        resumed = _run_child(finish_args(model, out), cache, out + ".log", None)
        got = outcome(out, cache) if resumed == 0 else {}
        diffs = [k for k in ("losses", "adapter", "snapshot", "summary", "eval") if got.get(k) != want[k]]
        problems = []
        if killed != -signal.SIGKILL:
            problems.append(f"not killed (exit {killed})")
        if resumed != 0:
            problems.append(f"--resume exited {resumed}")
        problems += [f"{k} differs" for k in diffs]
        problems += [f"unparsable {p}" for p in got.get("bad_json", [])]
        problems += [f"left {p}" for p in got.get("leftovers", [])]
        res = {"phase": phase, "site": site, "killed": killed, "resumed": resumed, "problems": problems}
        if problems:
            res["log"] = open(out + ".log").read()[-1500:]
        else:
            shutil.rmtree(os.path.dirname(out), ignore_errors=True)
        return res

    # trials run two at a time, each in its own forked process (which forks its two runs)
    pending, running, results = list(enumerate(trials)), {}, {}
    while pending or running:
        while pending and len(running) < int(os.environ.get("CALFT_SWEEP_JOBS", "2")):
            i, (phase, site) = pending.pop(0)
            r_fd, w_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r_fd)
                try:
                    data = json.dumps(trial(phase, site)).encode()
                except BaseException as err:  # noqa: BLE001
                    data = json.dumps({"phase": phase, "site": site, "problems": [f"harness: {err!r}"]}).encode()
                with os.fdopen(w_fd, "wb") as f:
                    f.write(data)
                os._exit(0)
            os.close(w_fd)
            running[pid] = (i, r_fd)
        pid, _ = os.wait()
        i, r_fd = running.pop(pid)
        with os.fdopen(r_fd, "rb") as f:
            results[i] = json.loads(f.read() or b"{}")
    result["trials"] = [results[i] for i in sorted(results)]
    return result


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "sweep":
        raise SystemExit("usage: python tests/faults.py sweep WORK_DIR TINY_MODEL_DIR")
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, os.getcwd())  # the checkout's calft
    install()
    import torch  # noqa: F401  (imported once in the parent: every forked child starts warm)
    import transformers  # noqa: F401
    import peft  # noqa: F401
    import importlib

    for name in ("calft.data", "calft.models", "calft.batching", "calft.run_dir", "calft.checkpoint", "calft.tree",
                 "calft.evaluate", "calft.scoring", "calft.report", "calft.sampling", "calft.tracking",
                 "calft.plots", "matplotlib.pyplot", "torch.distributed.checkpoint.state_dict"):
        try:  # whichever of these the checkout has
            importlib.import_module(name)
        except ImportError:
            pass

    print(json.dumps(sweep(os.path.abspath(sys.argv[2]), os.path.abspath(sys.argv[3]))))
