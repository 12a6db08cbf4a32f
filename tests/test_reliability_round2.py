"""Reliability, round two (issue 19): one test per numbered break, black-box.

The training and evaluation CLIs are driven as users drive them: `python -m calft.train` /
`python -m calft.eval` run through runpy in this process at one thread (an uncaught exception is
the traceback a user would see), or in a subprocess where a misuse would allocate tens of GB on
the old code (those run under an address-space limit). Library cases call public functions only;
the converted default model is made from the tiny model by standing in for its GGUF reader.
Faults come from outside the package: tests/faults.py's audit hook kills a run at a write or fails
a write with ENOSPC.
"""
import json
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import faults
from test_train import read_metrics, threads, tiny_args
from test_reliability import runs  # noqa: F401  (the module-scoped full / stopped tiny runs, one definition)

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 6 << 30  # address space of the subprocesses whose misuse would allocate 64-128 GB


# ---- helpers ---------------------------------------------------------------------------------------
def release_locks():
    from calft.fileio import release_locks as release
    release()


def cli(module, args, monkeypatch, capsys, n_threads=1, cache=None):
    """`python -m <module> args` in this process: (exit status, stdout, stderr). An exception that
    escapes is what a user sees as a traceback: it is reported as status "traceback"."""
    if cache is not None:
        monkeypatch.setenv("CALFT_CACHE_DIR", str(cache))
    monkeypatch.setattr(sys, "argv", [module, *map(str, args)])
    monkeypatch.delitem(sys.modules, module, raising=False)  # as `python -m`: runpy warns on an imported one
    code = 0
    try:
        with threads(n_threads):
            runpy.run_module(module, run_name="__main__")
    except SystemExit as exc:
        if isinstance(exc.code, str):  # the interpreter prints the message and exits with 1
            print(exc.code, file=sys.stderr)
            code = 1
        else:
            code = exc.code or 0
    except BaseException as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = f"traceback ({type(exc).__name__}: {exc})"
    finally:
        release_locks()
        faults.reset()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_subprocess(module, args, cache, timeout=600):
    """`python -m <module> args` in a subprocess limited to MEMORY_LIMIT of address space."""
    import resource

    env = dict(os.environ, CALFT_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout, preexec_fn=limit)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(code, err, prog, status=2, match=None):
    """Exit `status`, no traceback, exactly one `<prog>: error:` line (matching `match`)."""
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error:")]
    assert code == status and "Traceback" not in err and len(lines) == 1, f"exit {code}:\n{err[-3000:]}"
    if match:
        assert re.search(match, lines[0], re.IGNORECASE), lines[0]
    return lines[0]


def files_of(folder):
    """{relative path: bytes} of every regular file under `folder`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def temp_files(*folders):
    return [str(p) for f in folders for p in Path(f).rglob("*")
            if re.search(r"(^|\.)tmp", p.name) and not p.name.endswith(".lock")]


def copy_of(runs, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(runs[name], dst, symlinks=True)
    return dst


def train(tiny_model_dir, out, runs, monkeypatch, capsys, *extra, cache=None):
    return cli("calft.train", tiny_args(tiny_model_dir, out, *extra), monkeypatch, capsys,
               cache=cache or runs["cache"])


def losses(out):
    return [m["loss"] for m in read_metrics(out)]


# ---- 1. no write through a symbolic link ----------------------------------------------------------
@pytest.fixture
def victim(tmp_path):
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "file").write_text("precious\n")
    return folder / "file"


def test_symlinked_metrics_is_not_written_through_on_resume(runs, tiny_model_dir, tmp_path, victim,
                                                            monkeypatch, capsys):
    out = copy_of(runs, "stopped", tmp_path)
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(Path("..") / "victim" / "file")
    code, _, err = train(tiny_model_dir, out, runs, monkeypatch, capsys, "--resume")
    assert victim.read_text() == "precious\n"
    assert_one_line_error(code, err, "calft.train", match="symbolic link")


def test_symlinked_config_is_not_written_through_on_overwrite(runs, tiny_model_dir, tmp_path, victim,
                                                              monkeypatch, capsys):
    out = copy_of(runs, "full", tmp_path)
    (out / "config.json").unlink()
    (out / "config.json").symlink_to(victim)
    code, _, err = train(tiny_model_dir, out, runs, monkeypatch, capsys, "--overwrite", "--max-steps", "2")
    assert victim.read_text() == "precious\n"
    assert code == 0, err
    assert not (out / "config.json").is_symlink() and json.loads((out / "config.json").read_text())["max_steps"] == 2


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_symlinked_checkpoint_old(flag, runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A .checkpoint.old symlink to a folder elsewhere: --overwrite removes the link (never the
    folder) and runs; --resume refuses in one line. The folder is never touched or read."""
    out = copy_of(runs, "stopped", tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "checkpoint", elsewhere)
    before = files_of(elsewhere)
    (out / ".checkpoint.old").symlink_to(elsewhere)
    code, _, err = train(tiny_model_dir, out, runs, monkeypatch, capsys, flag)
    assert files_of(elsewhere) == before
    if flag == "--overwrite":
        assert code == 0, err
        assert losses(out) == losses(runs["full"]) and not (out / ".checkpoint.old").exists()
    else:
        assert_one_line_error(code, err, "calft.train", match="symbolic link")
    # and the directory is not stuck: --overwrite always gets out
    code, _, err = train(tiny_model_dir, out, runs, monkeypatch, capsys, "--overwrite")
    assert code == 0, err
    assert files_of(elsewhere) == before


# ---- 2. a kill at any write, then --resume: the same result, bit for bit ---------------------------
@pytest.fixture(scope="module")
def kill_sweep(tiny_model_dir, tmp_path_factory):
    """tests/faults.py's sweep: every write site of a stopped run (phase A) and of its --resume
    to the end with the final outputs (phase B), one kill each, then --resume, compared with an
    uninterrupted run."""
    work = tmp_path_factory.mktemp("kill_sweep")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "faults.py"), "sweep", str(work), str(tiny_model_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reference_codes"] == [0, 0], result.get("reference_log")
    return result


def trials_at(sweep, pattern, phase=None):
    found = [t for t in sweep["trials"] if re.search(pattern, t["site"]) and phase in (None, t["phase"])]
    assert found, f"no write site matches {pattern!r}: {[t['site'] for t in sweep['trials']]}"
    return found


def assert_recovered(trials):
    bad = [f"{t['phase']} {t['site']}: {'; '.join(t['problems'])}\n{t.get('log', '')[-800:]}"
           for t in trials if t["problems"]]
    assert not bad, "\n\n".join(bad)


def test_kill_at_every_write_site_resumes_bit_identical(kill_sweep):
    assert len(kill_sweep["trials"]) >= 25  # run marker, config, metrics, cache, checkpoints, outputs
    assert_recovered(kill_sweep["trials"])


def test_kill_while_config_json_is_written(kill_sweep):
    assert_recovered(trials_at(kill_sweep, r"config\.json"))


def test_kill_while_metrics_are_rewritten_on_resume(kill_sweep):
    # phase B's sites that phase A lacks: the appends are deduplicated, what remains is the rewrite
    assert_recovered(trials_at(kill_sweep, r"metrics\.jsonl", phase="B"))


def test_kill_while_summary_json_is_written(kill_sweep):
    assert_recovered(trials_at(kill_sweep, r"summary\.json"))


def test_kill_during_the_data_cache_write_leaves_no_temp_file(kill_sweep):
    assert_recovered(trials_at(kill_sweep, r"CACHE/prepared/.*safetensors", phase="A"))


# ---- 3. a damaged converted model is never used --------------------------------------------------
@pytest.fixture
def converted(fake_gguf, tiny_model_dir):
    """The embedded model's conversion with the tiny model standing in for the GGUF file, done once:
    (conversion count, cached folder, the tiny model's embedding)."""
    from transformers import AutoModelForCausalLM

    from calft import models

    calls, folder = fake_gguf
    models.load_model(models.DEFAULT_MODEL)
    embed = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight.detach().clone()
    return calls, folder, embed


def _flip(path, offset):
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))


def _header(path):
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return blob, n, json.loads(blob[8:8 + n])


@pytest.mark.parametrize("damage", ["header_renames_embed_tokens", "data_byte", "truncated"])
def test_damaged_converted_model_is_rebuilt_with_a_warning(damage, converted):
    from calft.models import DEFAULT_MODEL, load_model

    calls, target, embed = converted
    weights = target / "model.safetensors"
    blob, n, header = _header(weights)
    if damage == "header_renames_embed_tokens":  # same size: the size marker passes
        _flip(weights, 8 + blob[8:8 + n].index(b"embed_tokens") + 2)
    elif damage == "data_byte":
        begin = header["model.embed_tokens.weight"]["data_offsets"][0]
        _flip(weights, 8 + n + begin + 5)
    else:
        weights.write_bytes(blob[:-100])
    with pytest.warns(UserWarning, match="damaged|digest|does not match|converting"):
        model = load_model(DEFAULT_MODEL)
    assert len(calls) == 2
    assert torch.equal(model.get_input_embeddings().weight, embed)


def test_damaged_tokenizer_json_is_converted_once_by_concurrent_loads(converted):
    from calft.models import DEFAULT_MODEL, load_tokenizer

    calls, target, _ = converted
    (target / "tokenizer.json").write_text("{ damaged")
    errors = []

    def load():
        try:
            load_tokenizer(DEFAULT_MODEL)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == [] and len(calls) == 2  # the first conversion, then one rebuild for all three


# ---- 4. a missing checkpoint/ is not a fresh start; a finished run is left alone -----------------
def test_resume_without_its_checkpoint_refuses(runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = copy_of(runs, "stopped", tmp_path)
    shutil.rmtree(out / "checkpoint")
    before = files_of(out)
    code, _, err = train(tiny_model_dir, out, runs, monkeypatch, capsys, "--resume")
    assert_one_line_error(code, err, "calft.train", match="checkpoint")
    assert "before its first one" not in err
    assert files_of(out) == before


@pytest.mark.parametrize("checkpoint_deleted", [False, True])
def test_resume_of_a_finished_run_writes_nothing(checkpoint_deleted, runs, tiny_model_dir, tmp_path,
                                                 monkeypatch, capsys):
    out = copy_of(runs, "full", tmp_path)
    if checkpoint_deleted:
        shutil.rmtree(out / "checkpoint")
    before = {p: ((out / p).read_bytes(), (out / p).stat().st_mtime_ns) for p in files_of(out)
              if not p.endswith(".lock")}
    code, stdout, err = train(tiny_model_dir, out, runs, monkeypatch, capsys, "--resume")
    assert code == 0 and "nothing to do" in stdout, err
    after = {p: ((out / p).read_bytes(), (out / p).stat().st_mtime_ns) for p in files_of(out)
             if not p.endswith(".lock")}
    assert after == before  # config.json and the adapter included


# ---- 5. tampered state.json values are refused ------------------------------------------------------
def _rng(state):
    return state["rng"][0]


TAMPER = {
    "python_rng_short": lambda s: _rng(s)["python"].__setitem__(1, _rng(s)["python"][1][:10]),
    "numpy_rng_short": lambda s: _rng(s)["numpy"].__setitem__(1, _rng(s)["numpy"][1][:10]),
    "python_rng_negative": lambda s: _rng(s)["python"][1].__setitem__(0, -1),
    "numpy_rng_over_2_32": lambda s: _rng(s)["numpy"][1].__setitem__(0, 2**32 + 5),
    "step_string": lambda s: s.__setitem__("step", "2"),
    "step_float": lambda s: s.__setitem__("step", 2.5),
    "step_negative": lambda s: s.__setitem__("step", -1),
    "step_huge": lambda s: s.__setitem__("step", 10**18),
    "step_nan": lambda s: s.__setitem__("step", math.nan),
    "step_behind_the_weights": lambda s: s.__setitem__("step", 1),
    "tokens_string": lambda s: s.__setitem__("tokens", str(s["tokens"])),
    "train_time_string": lambda s: s.__setitem__("train_time_s", str(s["train_time_s"])),
    "segments_string": lambda s: s.__setitem__("segments", "1"),
    "betas_strings": lambda s: s["optimizer"]["param_groups"][0].__setitem__("betas", ["0.9", "0.999"]),
}


@pytest.mark.parametrize("case", [*TAMPER, "json_list"])
def test_tampered_state_is_refused(case, runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = copy_of(runs, "stopped", tmp_path)
    path = out / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    assert state["step"] == 2
    if case == "json_list":
        state = [state]
    else:
        TAMPER[case](state)
    path.write_text(json.dumps(state))
    before = files_of(out)
    code, _, err = train(tiny_model_dir, out, runs, monkeypatch, capsys, "--resume")
    assert_one_line_error(code, err, "calft.train", match="cannot resume")
    assert files_of(out) == before


# ---- 6. a full disk: one line, temp files removed, a later --resume continues --------------------
FULL_DISK = {  # where the disk fills: (start from, matcher on (kind, path))
    "run_marker": ("new", lambda kind, p: ".calft-run.json" in os.path.basename(p)),
    "metrics_append": ("stopped", lambda kind, p: kind == "open-a" and p.endswith("metrics.jsonl")),
    "final_adapter": ("stopped", lambda kind, p: os.path.basename(p).startswith(("adapter_config.json",
                      ".adapter_config.json")) and "checkpoint" not in p and "snapshots" not in p),
    "data_cache": ("new", lambda kind, p: "/fresh_cache/" in p and ".safetensors" in p),
}


@pytest.mark.parametrize("where", FULL_DISK)
def test_full_disk(where, runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    start, match = FULL_DISK[where]
    out = copy_of(runs, "stopped", tmp_path) if start == "stopped" else tmp_path / "new"
    cache = tmp_path / "fresh_cache" if where == "data_cache" else runs["cache"]
    faults.install()
    hits = tmp_path / "faults.jsonl"
    faults.configure(action="enospc", match=match, roots={"RUN": str(out), "CACHE": str(cache)}, log=str(hits))
    args = ["--resume"] if start == "stopped" else []
    code, _, err = train(tiny_model_dir, out, runs, monkeypatch, capsys, *args, cache=cache)
    assert hits.is_file(), "the full disk was never hit"
    assert_one_line_error(code, err, "calft.train", status=1, match="disk is full|no space")
    assert temp_files(out, cache) == []
    code, _, err = train(tiny_model_dir, out, runs, monkeypatch, capsys, "--resume", cache=cache)
    assert code == 0, err
    assert losses(out) == losses(runs["full"])
    from safetensors.torch import load_file

    a, b = (load_file(d / "adapter_model.safetensors") for d in (out, runs["full"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- 7. train CLI misuse: one line, exit 2, before anything is written ---------------------------
@pytest.mark.parametrize("flags", [["--lora-r", "1000000000"], ["--samples-per-prompt", "1000000000"]])
def test_train_refuses_a_run_that_cannot_fit_in_memory(flags, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli_subprocess("calft.train", tiny_args(tiny_model_dir, out, *flags), tmp_path / "cache")
    line = assert_one_line_error(code, err, "calft.train", match=r"memory")
    assert re.search(r"\d+(\.\d+)? ?[GTP]B", line), line  # the estimate, as a number
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--lora-targets", "lm_head"], ["--lora-targets", "nonexistent_proj"],
                                   ["--lora-targets", ","], ["--batch-size", "1000000000"],
                                   ["--families", "gaussian", "--train-split", "test_ood_family"]])
def test_train_misuse_fails_before_anything_is_written(flags, runs, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = tiny_args(tiny_model_dir, out)
    for flag, value in zip(flags[::2], flags[1::2]):  # replace the flag's value when tiny_args sets it
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    code, _, err = cli("calft.train", args, monkeypatch, capsys, cache=runs["cache"])
    assert_one_line_error(code, err, "calft.train")
    assert not out.exists() or not any(out.iterdir())
    # the corrected command runs in the same directory
    code, _, err = train(tiny_model_dir, out, runs, monkeypatch, capsys, "--max-steps", "1")
    assert code == 0, err


# ---- 8. eval CLI misuse -------------------------------------------------------------------------
def eval_args(model, tmp_path, *extra):
    return ["--model", str(model), "--split", "test_selected", "--families", "gaussian",
            "--max-prompts-per-family", "1", "--num-decimals", "1", "--max-bins", "20", "--no-plots",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--quiet",
            "--output-dir", str(tmp_path / "eval_out"), *extra]


def set_flag(args, flag, value):
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def test_eval_refuses_an_adapter_of_another_base_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """LoRA trained on a 3-layer model, scored on the 2-layer one: PEFT drops the third layer's
    weights without a word; calft refuses."""
    from calft.models import add_lora, load_model
    from tiny import make_tiny_model

    other = tmp_path / "three_layers"
    make_tiny_model(other, layers=3)
    adapter = tmp_path / "adapter"
    add_lora(load_model(str(other)), r=2).save_pretrained(str(adapter))
    code, _, err = cli("calft.eval", eval_args(tiny_model_dir, tmp_path, "--adapter", str(adapter)),
                       monkeypatch, capsys)
    assert_one_line_error(code, err, "calft.eval", match="adapter")
    assert not (tmp_path / "eval_out" / "summary.json").exists()


@pytest.mark.parametrize("case", ["device_gpu7", "device_cuda", "cache_dir_file", "split_comma",
                                  "mcq_negative", "output_is_model_dir", "misspelled_family"])
def test_eval_misuse_is_one_line_exit_2(case, tiny_model_dir, tmp_path, monkeypatch, capsys):
    args = eval_args(tiny_model_dir, tmp_path)
    guarded = tmp_path / "eval_out"
    if case == "device_gpu7":
        args = set_flag(args, "--device", "gpu7")
    elif case == "device_cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        args = set_flag(args, "--device", "cuda")
    elif case == "cache_dir_file":
        (tmp_path / "a_file").write_text("x")
        args = set_flag(args, "--cache-dir", str(tmp_path / "a_file"))
    elif case == "split_comma":
        args = set_flag(args, "--split", ",")
    elif case == "mcq_negative":
        args = set_flag(args, "--mcq-questions", "-5")
    elif case == "output_is_model_dir":
        guarded = tmp_path / "model_copy"
        shutil.copytree(tiny_model_dir, guarded)
        args = set_flag(args, "--output-dir", str(guarded))
    else:
        args = set_flag(args, "--families", "gausian")
    before = files_of(guarded) if guarded.exists() else {}
    code, _, err = cli("calft.eval", args, monkeypatch, capsys)
    assert_one_line_error(code, err, "calft.eval")
    assert (files_of(guarded) if guarded.exists() else {}) == before


def test_eval_refuses_a_sample_count_that_cannot_fit_in_memory(tiny_model_dir, tmp_path):
    args = eval_args(tiny_model_dir, tmp_path, "--metrics", "sampling", "--num-samples", "1000000000000")
    code, _, err = cli_subprocess("calft.eval", args, tmp_path / "cache")
    line = assert_one_line_error(code, err, "calft.eval", match="memory")
    assert re.search(r"\d+(\.\d+)? ?[GTP]B", line), line


# ---- 9. smaller gaps --------------------------------------------------------------------------------
def test_prepared_cache_digest_covers_the_support_metadata(tiny_tokenizer, tmp_path):
    """Every digit of the cached file's metadata flipped in turn: each flip is either noticed
    (and the data rebuilt) or changes nothing; none loads as different data."""
    import warnings

    from calft.data import DataSettings, prepare_prompts
    from calft.splits import get_split

    specs = get_split("train", families=["gaussian", "binomial"], max_specs=2)
    settings = DataSettings(num_decimals=1, max_bins=40)

    def prepared():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = prepare_prompts(tiny_tokenizer, specs, settings, cache_dir=tmp_path, progress=False)
        return [(p.support.family_id, p.support.params, p.support.values, p.support.probs.tolist(),
                 p.support.lower, p.support.upper, p.support.tail_mass, p.support.integer,
                 p.support.num_decimals, p.terminator_ids) for p in got]

    want = prepared()
    (path,) = tmp_path.glob("*.safetensors")
    pristine = path.read_bytes()
    n = int.from_bytes(pristine[:8], "little")
    meta_start = pristine.index(b'"__metadata__"')
    digits = [i for i in range(meta_start, 8 + n) if chr(pristine[i]).isdigit()]
    silent = []
    for i in digits[:: max(1, len(digits) // 40)]:
        blob = bytearray(pristine)
        blob[i] = ord("7") if blob[i] != ord("7") else ord("3")
        path.write_bytes(bytes(blob))
        if prepared() != want:
            silent.append(i)
        for p in tmp_path.glob("*.safetensors"):
            p.unlink()
        path.write_bytes(pristine)
    assert silent == []


def test_prompt_text_refuses_what_build_support_refuses():
    from calft.prompts import prompt_text
    from calft.support import build_support

    with pytest.raises(ValueError):
        build_support("gaussian", {"mu": 1e300, "sigma": 1.0})
    with pytest.raises(ValueError, match="mu"):
        prompt_text("gaussian", {"mu": 1e300, "sigma": 1.0})


def test_a_huge_support_is_a_clear_error_not_memory_error(tmp_path):
    code = ("from calft.support import build_support\n"
            "try:\n"
            "    build_support('uniform', {'a': 0, 'b': 1e4}, num_decimals=5, max_bins=10**9)\n"
            "except ValueError as err:\n"
            "    print('ValueError:', err)\n")
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "ValueError:" in proc.stdout and re.search(r"memory|GB|strings", proc.stdout), proc.stdout
