"""Faults, damaged or untrusted files and misuse (issue 11): kills at any moment of a checkpoint
rotation, a full disk, pickled or damaged checkpoints, two processes at once, altered caches, the
eval CLI's checks, and the losses' edges. Each case would fail on the code before its fix.

Training runs go through runpy in this process at one thread (tests/test_train.py's helpers), on
copies of one run stopped at step 2 of 6; a reference uninterrupted run gives the exact losses.
"""
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import read_metrics, run_inline, threads, tiny_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """{"cache", "full" (6 steps), "stopped" (the same run stopped at step 2)} at one thread."""
    base = tmp_path_factory.mktemp("rel")
    cache = base / "cache"
    with threads(1):
        run_inline(tiny_args(tiny_model_dir, base / "full"), cache)
        run_inline(tiny_args(tiny_model_dir, base / "stopped", "--stop-at-step", "2"), cache)
    return {"cache": cache, "full": base / "full", "stopped": base / "stopped", "base": base}


def copy_of(runs, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(runs[name], dst)
    return dst


def train_here(args, monkeypatch, capsys, n_threads=1):
    """python -m calft.train in this process: (exit status, stdout, stderr)."""
    import runpy

    from calft.fileio import release_locks

    monkeypatch.setattr(sys, "argv", ["calft.train", *map(str, args)])
    code = 0
    try:
        with threads(n_threads):
            runpy.run_module("calft.train", run_name="__main__")
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        release_locks()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def resume(tiny_model_dir, out, runs, monkeypatch, capsys, *extra):
    """--resume in this process at one thread: (exit status, stderr)."""
    monkeypatch.setenv("CALFT_CACHE_DIR", str(runs["cache"]))
    code, _, err = train_here(tiny_args(tiny_model_dir, out, "--resume", *extra), monkeypatch, capsys)
    return code, err


# ---- checkpoint rotation: a kill at any point leaves a state the next start repairs -----------------

def kill_during_rotation(out, state):
    ckpt, old = out / "checkpoint", out / ".checkpoint.old"
    tmp = out / ".checkpoint.tmp-killed"
    if state == "both_present":  # killed after checkpoint -> .old with a new checkpoint in place
        shutil.copytree(ckpt, old)
        shutil.copytree(ckpt, tmp)  # and a temp dir of a killed write
    elif state == "only_old":  # killed between the two renames
        os.replace(ckpt, old)
    elif state == "old_and_partial_tmp":  # killed between the renames, plus a half-written temp dir
        os.replace(ckpt, old)
        tmp.mkdir()
        (tmp / "state.safetensors").write_bytes(b"\0" * 100)
    elif state == "incomplete_checkpoint":  # checkpoint/ without its last file, a complete .old
        shutil.copytree(ckpt, old)
        (ckpt / "state.json").unlink()


@pytest.mark.parametrize("state", ["both_present", "only_old", "old_and_partial_tmp", "incomplete_checkpoint"])
def test_rotation_recovers_from_a_kill(state, runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = copy_of(runs, "stopped", tmp_path)
    kill_during_rotation(out, state)
    code, err = resume(tiny_model_dir, out, runs, monkeypatch, capsys, "--checkpoint-interval", "1")
    assert code == 0, err
    assert [m["loss"] for m in read_metrics(out)] == [m["loss"] for m in read_metrics(runs["full"])]
    leftovers = [p.name for p in out.iterdir() if p.name.startswith((".checkpoint.old", ".checkpoint.tmp-"))]
    assert leftovers == []  # later saves rotate cleanly: no "Directory not empty", no stale temp dirs
    from calft import checkpoint

    assert checkpoint.load(out / "checkpoint")[1]["step"] == 6


def test_disk_full_while_saving(runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of a checkpoint write: one clear line, exit 1, the temp dir removed,
    the previous checkpoint intact and resumable."""
    from calft import checkpoint

    out = copy_of(runs, "stopped", tmp_path)

    def full_disk(path, data):
        Path(path).write_bytes(data[: len(data) // 2])  # a partial file, then the error
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_write_bytes", full_disk)
    code, err = resume(tiny_model_dir, out, runs, monkeypatch, capsys, "--checkpoint-interval", "1")
    assert code == 1
    assert "disk is full" in err and "previous checkpoint" in err and "Traceback" not in err
    assert not list(out.glob(".checkpoint.tmp-*"))
    monkeypatch.undo()
    assert checkpoint.load(out / "checkpoint")[1]["step"] == 2


# ---- untrusted and damaged checkpoints: nothing is unpickled, damage is refused loudly -------------

class _Payload:
    """Unpickling this runs a command: what a crafted state.pt could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["pickle_only", "no_state_json", "no_tensors", "tampered_tensors"])
def test_damaged_or_untrusted_checkpoint_is_refused(damage, runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = copy_of(runs, "stopped", tmp_path)
    ckpt, marker = out / "checkpoint", tmp_path / "code_ran"
    if damage == "pickle_only":  # the old format, crafted: loading it with pickle would run code
        for f in ("state.json", "state.safetensors"):
            (ckpt / f).unlink()
        with open(ckpt / "state.pt", "wb") as fh:
            pickle.dump({"step": _Payload(marker)}, fh)
    elif damage == "no_state_json":
        (ckpt / "state.json").unlink()
    elif damage == "no_tensors":
        (ckpt / "state.safetensors").unlink()
    else:
        blob = bytearray((ckpt / "state.safetensors").read_bytes())
        blob[-5] ^= 0xFF  # one flipped byte in an RNG state or optimizer moment
        (ckpt / "state.safetensors").write_bytes(bytes(blob))
    metrics = (out / "metrics.jsonl").read_text()
    code, err = resume(tiny_model_dir, out, runs, monkeypatch, capsys)
    assert code == 2 and "cannot resume" in err and "--overwrite" in err, err
    assert not marker.exists()
    assert (out / "metrics.jsonl").read_text() == metrics  # not silently restarted from scratch


def test_no_unpickling_anywhere():
    """No torch.load(weights_only=False) or pickle in the package, the kernels or the benchmarks."""
    hits = []
    for folder in ("calft", "kernels", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for bad in ("weights_only=False", "import pickle", "torch.load("):
                if bad in text:
                    hits.append(f"{path.relative_to(ROOT)}: {bad}")
    assert hits == []


# ---- resume semantics ------------------------------------------------------------------------------

def test_resume_of_a_finished_run_changes_nothing(runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = copy_of(runs, "full", tmp_path)
    kept = lambda p: p.is_file() and p.name not in (".calft.lock", "config.json")  # noqa: E731 (run-only flags differ)
    before = {p.name: p.read_bytes() for p in out.iterdir() if kept(p)}
    monkeypatch.setenv("CALFT_CACHE_DIR", str(runs["cache"]))
    code, stdout, _ = train_here(tiny_args(tiny_model_dir, out, "--resume"), monkeypatch, capsys)
    assert code == 0 and "nothing to do" in stdout
    after = {p.name: p.read_bytes() for p in out.iterdir() if kept(p)}
    assert after == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] > 0 and np.isfinite(summary["final_loss"])


def test_resume_with_another_thread_count_warns(runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from calft import checkpoint

    out = copy_of(runs, "stopped", tmp_path)
    assert checkpoint.load(out / "checkpoint")[1]["threads"] == 1
    monkeypatch.setenv("CALFT_CACHE_DIR", str(runs["cache"]))
    code, _, err = train_here(tiny_args(tiny_model_dir, out, "--resume"), monkeypatch, capsys, n_threads=2)
    assert code == 0 and "used 1 CPU threads, this process 2" in err, err


def test_second_process_on_the_same_run_is_refused(runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = copy_of(runs, "stopped", tmp_path)
    holder = subprocess.Popen(  # a process that holds the run directory's lock, as a running trainer does
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(out / ".calft.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        metrics = (out / "metrics.jsonl").read_text()
        code, err = resume(tiny_model_dir, out, runs, monkeypatch, capsys)
        assert code == 2 and "another calft.train process is running" in err, err
        assert (out / "metrics.jsonl").read_text() == metrics
    finally:
        holder.kill()
        holder.wait()


def test_overwrite_deletes_only_what_calft_wrote(runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = copy_of(runs, "full", tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "mine.png").write_bytes(b"png")
    monkeypatch.setenv("CALFT_CACHE_DIR", str(runs["cache"]))
    code, _, err = train_here(tiny_args(tiny_model_dir, out, "--overwrite", "--max-steps", "2"),
                              monkeypatch, capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "plots" / "mine.png").is_file()
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


# ---- the prepared-data cache: digest and value checks, one builder at a time ---------------------------

def _prepare(tok, cache, **kw):
    from calft.data import DataSettings, prepare_prompts
    from calft.splits import get_split

    specs = get_split("train", families=["gaussian", "binomial"], max_specs=2)
    return prepare_prompts(tok, specs, DataSettings(num_decimals=1, max_bins=40), cache_dir=cache,
                           progress=False, **kw), specs


@pytest.mark.parametrize("damage", ["altered_probability", "negative_token_id", "truncated"])
def test_damaged_prepared_cache_is_rebuilt(damage, tiny_tokenizer, tmp_path):
    from calft import data

    want, specs = _prepare(tiny_tokenizer, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    if damage == "altered_probability":  # the digest catches it
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        begin = 8 + size + header["value_probs"]["data_offsets"][0]
        blob = bytearray(path.read_bytes())
        blob[begin:begin + 8] = np.float64(0.9).tobytes()
        path.write_bytes(bytes(blob))
    elif damage == "negative_token_id":  # a valid digest over bad values: the range check catches it
        arrays = data._build(tiny_tokenizer, specs, data.DataSettings(num_decimals=1, max_bins=40),
                             progress=False, full_check=False)
        arrays["answer_tokens"] = arrays["answer_tokens"].copy()
        arrays["answer_tokens"][0] = -1
        data._save_atomic(path, arrays)
    else:
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="unreadable prepared-data cache"):
        got, _ = _prepare(tiny_tokenizer, tmp_path)
    for a, b in zip(got, want):
        assert np.array_equal(a.support.probs, b.support.probs) and np.array_equal(a.trie.probs, b.trie.probs)
        assert np.array_equal(a.answer_ids.tokens, b.answer_ids.tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt file loads cleanly
        _prepare(tiny_tokenizer, tmp_path)


def test_concurrent_data_preparation_builds_once(tiny_tokenizer, tmp_path, monkeypatch):
    from calft import data

    calls, real_build = [], data._build

    def slow_build(*args, **kw):
        calls.append(1)
        time.sleep(0.5)  # the window in which a second process would start its own build
        return real_build(*args, **kw)

    monkeypatch.setattr(data, "_build", slow_build)
    results = [None, None]

    def worker(i):
        results[i] = _prepare(tiny_tokenizer, tmp_path)[0]

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1
    assert [p.support.values for p in results[0]] == [p.support.values for p in results[1]]


# ---- the converted default model: locked, marked complete, never deleted when finished ---------------

def test_concurrent_model_conversion_converts_once(fake_gguf):
    from calft import models

    calls, target = fake_gguf
    target.parent.mkdir(parents=True)
    stale = target.parent / ".tmp-killed"  # a conversion killed earlier
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    paths = []
    workers = [threading.Thread(target=lambda: paths.append(models._embedded_checkpoint())) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and paths == [target, target]
    assert not stale.exists() and (target / models.COMPLETE).is_file()
    inode = (target / "model.safetensors").stat().st_ino
    stale.mkdir()  # another killed conversion, next to a finished copy
    models._embedded_checkpoint()  # a finished copy is used as it is, never deleted or rebuilt
    assert len(calls) == 1 and (target / "model.safetensors").stat().st_ino == inode
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage_same_size"])
def test_damaged_model_conversion_is_rebuilt(damage, fake_gguf):
    from calft import models

    calls, target = fake_gguf
    models._embedded_checkpoint()
    weights = target / "model.safetensors"
    blob = weights.read_bytes()
    if damage == "truncated":  # sizes no longer match the completion marker
        weights.write_bytes(blob[: len(blob) // 2])
        model = models.load_model(models.DEFAULT_MODEL)
    else:  # the same size, an unreadable header: the load fails, the copy is rebuilt once
        weights.write_bytes(b"\xff" * 16 + blob[16:])
        with pytest.warns(UserWarning, match="converting it again"):
            model = models.load_model(models.DEFAULT_MODEL)
    assert len(calls) == 2 and model.config.vocab_size > 0


# ---- the eval CLI checks everything before the first model is scored ---------------------------------

def eval_args(tiny_model_dir, tmp_path, *extra):
    return ["--model", str(tiny_model_dir), "--split", "test_selected", "--families", "gaussian",
            "--max-prompts-per-family", "1", "--num-decimals", "1", "--max-bins", "20", "--no-plots",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--quiet",
            "--output-dir", str(tmp_path / "eval_out"), *extra]


@pytest.fixture
def no_scoring(monkeypatch):
    import calft.scoring

    def refuse(*a, **k):
        raise AssertionError("a model was scored before the arguments were checked")

    monkeypatch.setattr(calft.scoring, "evaluate_exact", refuse)


@pytest.mark.parametrize("case", ["garbage_adapter", "mismatched_adapter", "misspelled_family", "run_as_output"])
def test_eval_rejects_bad_input_before_scoring(case, runs, tiny_model_dir, tmp_path, no_scoring):
    from calft.eval import main
    from calft.models import add_lora, load_model

    args = eval_args(tiny_model_dir, tmp_path)
    if case == "garbage_adapter":
        adapter = tmp_path / "garbage"
        shutil.copytree(runs["full"], adapter)
        (adapter / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
        args += ["--adapter", str(adapter)]
        message = "cannot be loaded"
    elif case == "mismatched_adapter":  # LoRA of another base model (hidden 48, not 32)
        other = tmp_path / "other_model"
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_tiny_model

        make_tiny_model(other, hidden=48)
        adapter = tmp_path / "mismatched"
        add_lora(load_model(str(other)), r=2).save_pretrained(str(adapter))
        args += ["--adapter", str(adapter)]
        message = "cannot be loaded"
    elif case == "misspelled_family":
        args[args.index("--families") + 1] = "gausian"
        message = "did you mean 'gaussian'"
    else:
        args[args.index("--output-dir") + 1] = str(runs["full"])
        message = "holds a training run"
    summary = (runs["full"] / "summary.json").read_text()
    with pytest.raises(ValueError, match=message):
        main(args)
    assert (runs["full"] / "summary.json").read_text() == summary
    assert not (tmp_path / "eval_out" / "summary.json").exists()


def test_eval_warns_when_decimals_differ_from_training(runs, tiny_model_dir, tmp_path, capsys):
    from calft.eval import main

    args = eval_args(tiny_model_dir, tmp_path, "--adapter", str(runs["full"]), "--no-base")
    args[args.index("--num-decimals") + 1] = "2"
    main(args)
    assert "trained with 1 decimals but is scored at --eval-decimals 2" in capsys.readouterr().err


# ---- losses with validate=False: shape errors still raise, the trusted inputs are documented ----------

def test_losses_reject_an_empty_vocabulary():
    from calft.losses import SparseTargets, linear_soft_target_kl, soft_target_kl

    t = SparseTargets.from_lists([[], []], [[], []])
    with pytest.raises(ValueError, match="V=0"):
        soft_target_kl(torch.zeros(2, 0), t, validate=False)
    with pytest.raises(ValueError, match="V=0"):
        linear_soft_target_kl(torch.zeros(2, 3), torch.zeros(0, 3), t, validate=False)


def test_losses_trusted_inputs_are_documented():
    """validate=False does not mask: the docstring says what it trusts, validate=True catches ids."""
    import calft.losses as L

    doc = L.__doc__
    assert "negative id" in doc and "+inf" in doc
    t = L.SparseTargets(torch.tensor([0, 1]), torch.tensor([-1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="outside"):
        L.soft_target_kl(torch.zeros(1, 5), t)
    z = torch.zeros(1, 5)
    z[0, 2] = float("inf")  # documented: NaN, which the trainer turns into a clean stop (exit 3)
    good = L.SparseTargets(torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([1.0]))
    assert torch.isnan(L.soft_target_kl(z, good, validate=False))
