"""Prepared data: (tokenizer, data settings, prompt specs) -> what training needs per prompt.

    spec -> prompt text -> chat-rendered prompt (+ answer prefix) -> prompt_ids
         -> support (canonical strings, float64 probs) -> answer tokens in context
            (tokens(prompt + s) minus tokens(prompt))
         -> trie over answer tokens + the template's terminator (calft.prompts.answer_format;
            one calft.trie.build_tries call for all prompts)

Everything is cached on disk, keyed by a hash of the tokenizer (vocabulary, merges, chat
template, EOS, a rendered probe prompt and the terminator), the settings, the specs, the calft
version and the source of the modules that define the data. The file holds concatenated arrays
+ offsets in the safetensors layout and is memory-mapped on load, so a second run only rebuilds
the Python objects (~0.5 s for the train split) while the big arrays stay on the page cache.

Tokenization (answers in context, the fast piecewise path) is in calft.tokenization and
calft.fast_tokenization.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import calft
from calft.fast_tokenization import answers_in_context, append_terminator, encode_prompts
from calft.fileio import atomic_write, file_lock, remove_temps
from calft.prompts import answer_format, prompt_text, reasoning_effort, render_chat, terminator_ids
from calft.splits import PromptSpec, get_split
from calft.support import Support, build_support
from calft.tokenization import fast_backend, memo_per_tokenizer
from calft.trie import Trie, build_tries_arrays, split_tries

CACHE_FORMAT = 4  # bump when the file layout changes (2: sha256 digest in the metadata; 3: terminator;
# 4: the digest covers the metadata and the array layout too)
_SOURCES = ("families.py", "support.py", "prompts.py", "tokenization.py", "fast_tokenization.py", "trie.py", "data.py")


@dataclass(frozen=True)
class DataSettings:
    """How supports are discretized (docs/method.md, section 'Supports'); defaults = the paper's soft recipe."""

    num_decimals: int = 5
    max_bins: int = 1001
    quantile_low: float = 0.001
    quantile_high: float = 0.999
    tail_policy: str = "clip_to_edge_bin"


class TokenSequences(Sequence):
    """Read-only list of int64 token arrays stored as flat tokens + offsets (no per-item objects).

    seqs[i] is a view tokens[offsets[i]:offsets[i+1]]; len(), iteration and slicing work as for
    a list (list(seqs) gives a real list of arrays).
    """

    __slots__ = ("tokens", "offsets")

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.tokens.setflags(write=False)

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            return TokenSequences(self.tokens, self.offsets[start:stop + 1])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} sequences")
        i = i % n
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __repr__(self) -> str:
        return f"TokenSequences({len(self)} sequences, {self.tokens.shape[0]} tokens)"


@dataclass
class PreparedPrompt:
    """One prompt, ready for training and exact evaluation.

    prompt_ids: chat-rendered prompt tokens (add_special_tokens=False), answer prefix included.
    answer_ids[i]: the canonical tokens of support.values[i] after the prompt (tokens(prompt + s)
    minus tokens(prompt)), without the terminator. terminator_ids: what ends every answer
    (calft.prompts.answer_format). trie: over answer_ids + terminator_ids weighted by
    support.probs (trie.sequence_leaf[i] / trie.path_nodes(i) refer to support string i).
    """

    spec: PromptSpec
    text: str
    prompt_ids: np.ndarray
    support: Support
    answer_ids: TokenSequences
    trie: Trie
    terminator_ids: tuple[int, ...] = ()


def default_cache_dir() -> Path:
    """$CALFT_CACHE_DIR/prepared, else ~/.cache/calft/prepared (same root as calft.models)."""
    return Path(os.environ.get("CALFT_CACHE_DIR", Path.home() / ".cache" / "calft")) / "prepared"


# ---- cache key ---------------------------------------------------------------------------------
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides tokenization: the backend JSON (vocab, merges, normalizer,
    pre-tokenizer, added tokens) or the vocabulary, plus chat template and EOS. ~0.1 s for
    SmolLM2, memoized per tokenizer object (with its size and template re-checked)."""
    template = str(getattr(tokenizer, "chat_template", None))
    cheap = (type(tokenizer).__name__, len(tokenizer), template, tokenizer.eos_token_id)

    def digest() -> str:
        h = hashlib.sha256(repr(cheap).encode())
        backend = fast_backend(tokenizer)
        if backend is not None:
            h.update(backend.to_str().encode())
        else:
            h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
            h.update(repr(sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))).encode())
        return h.hexdigest()

    return memo_per_tokenizer(_FINGERPRINTS, tokenizer, cheap, digest)


def cache_key(tokenizer, specs: Sequence[PromptSpec], settings: DataSettings) -> str:
    h = hashlib.sha256()
    h.update(f"calft {calft.__version__} format {CACHE_FORMAT}\n".encode())
    here = Path(__file__).parent
    for name in _SOURCES:  # code changes in the data path invalidate old caches
        h.update(hashlib.sha256((here / name).read_bytes()).digest())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    # What the prompts render to (a probe prompt, answer prefix included) and what ends answers:
    # were anything render-time (a date) to leak into prompts, the key would change with it
    # instead of serving stale prompt ids.
    h.update(json.dumps([render_chat(tokenizer, "probe"), list(answer_format(tokenizer).terminator_ids)]).encode())
    if "reasoning_effort" in str(getattr(tokenizer, "chat_template", None)):
        h.update(f"reasoning_effort={reasoning_effort()}".encode())  # also visible in the probe render
    h.update(json.dumps(asdict(settings)).encode())
    h.update(json.dumps([[s.family_id, [[k, v] for k, v in s.params]] for s in specs]).encode())
    return h.hexdigest()[:32]


# ---- preparation ---------------------------------------------------------------------------------
def prepare_split(tokenizer, split: str, settings: DataSettings = DataSettings(), *, families=None,
                  max_specs: int | None = None, cache_dir=None, progress: bool = True) -> list[PreparedPrompt]:
    """`prepare_prompts` for the specs of `calft.splits.get_split(split, families, max_specs)`."""
    specs = get_split(split, families=families, max_specs=max_specs)
    return prepare_prompts(tokenizer, specs, settings, cache_dir=cache_dir, progress=progress)


def prepare_prompts(tokenizer, specs: Sequence[PromptSpec], settings: DataSettings = DataSettings(), *,
                    cache_dir=None, progress: bool = True, full_check: bool = False) -> list[PreparedPrompt]:
    """Prompt ids, support, answer tokens and trie for every spec (module docstring).

    cache_dir: None = `default_cache_dir()`, False = no cache, else a directory.
    full_check: tokenize every prompt + support string whole for the in-context check (slow;
    the default derivation is exact under assumptions that are verified as it goes).
    Raises ValueError with a readable report when a support string tokenizes differently in
    context than alone (docs/method.md, section 'Trie targets').
    """
    specs = list(specs)
    if not isinstance(settings, DataSettings):
        raise ValueError(f"settings must be a calft.data.DataSettings, got {type(settings).__name__}")
    terminator_ids(tokenizer)  # ValueError when nothing ends an answer
    if not specs:
        return []
    if cache_dir is False:
        return _unpack(_build(tokenizer, specs, settings, progress=progress, full_check=full_check), specs)
    folder = Path(default_cache_dir() if cache_dir is None else cache_dir)
    path = folder / f"{cache_key(tokenizer, specs, settings)}.safetensors"
    vocab_size = max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))
    prepared = _try_load(path, specs, vocab_size, warn=False)  # files appear by rename: no lock needed
    if prepared is not None:
        return prepared
    # One process builds, others wait for it and load its file (a lock per cache key).
    with file_lock(folder / f"{path.stem}.lock"):
        prepared = _try_load(path, specs, vocab_size, warn=True)
        if prepared is not None:
            return prepared
        remove_temps(folder, path.name)  # a killed builder's temp file (we hold the key's lock)
        arrays = _build(tokenizer, specs, settings, progress=progress, full_check=full_check)
        _save_atomic(path, arrays)
    return _unpack(arrays, specs)


def _try_load(path: Path, specs, vocab_size: int, *, warn: bool):
    """The cached prompts, or None when the file is missing, or damaged (a warning when `warn`:
    the caller then rebuilds it)."""
    if not path.is_file():
        return None
    try:
        return _load(path, specs, vocab_size)
    except Exception as err:  # a damaged, altered or foreign file: rebuild it
        if warn:
            warnings.warn(f"ignoring unreadable prepared-data cache {path} (rebuilding it): {err}")
        return None


def _build(tokenizer, specs, settings, *, progress: bool, full_check: bool) -> dict[str, np.ndarray]:
    """All prepared data of `specs` as flat arrays (the cache layout; `_unpack` makes objects)."""
    from tqdm.auto import tqdm

    kw = asdict(settings)
    supports = []
    for spec in tqdm(specs, desc="supports", unit="prompt", disable=not progress, leave=False):
        supports.append(build_support(spec.family_id, spec.params_dict, **kw))
    texts = [prompt_text(s.family_id, s.params_dict) for s in specs]
    rendered = [render_chat(tokenizer, t) for t in texts]
    terminator = np.asarray(terminator_ids(tokenizer), dtype=np.int64)
    prompt_ids, tails = encode_prompts(tokenizer, rendered)
    values = [v for s in supports for v in s.values]
    counts = np.array([len(s.values) for s in supports], dtype=np.int64)
    answers, answer_offsets = answers_in_context(tokenizer, rendered, prompt_ids, tails, values, counts,
                                                  full=full_check)

    group_offsets = np.zeros(len(specs) + 1, dtype=np.int64)
    np.cumsum(counts, out=group_offsets[1:])
    probs = np.concatenate([s.probs for s in supports])
    if terminator.size == 1:
        tries = build_tries_arrays(answers, answer_offsets, probs, group_offsets, eos_id=int(terminator[0]))
    else:  # a multi-token terminator: the whole chain after every answer
        chained, chained_offsets = append_terminator(answers, answer_offsets, terminator)
        tries = build_tries_arrays(chained, chained_offsets, probs, group_offsets)

    meta = {
        "format": CACHE_FORMAT,
        "terminator": terminator.tolist(),
        "supports": [[s.family_id, [[k, v] for k, v in s.params.items()], s.num_decimals, s.integer,
                      s.lower, s.upper, s.tail_mass] for s in supports],
    }
    text_blob = "\x00".join(texts).encode()
    prompt_offsets = np.zeros(len(specs) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in prompt_ids], out=prompt_offsets[1:])
    return {
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        "texts": np.frombuffer(text_blob, dtype=np.uint8),
        "prompt_tokens": np.concatenate([np.asarray(p, dtype=np.int64) for p in prompt_ids]),
        "prompt_offsets": prompt_offsets,
        "values": np.frombuffer("\n".join(values).encode(), dtype=np.uint8),
        "value_counts": counts,
        "value_probs": probs,
        "answer_tokens": answers,
        "answer_offsets": answer_offsets,
        **{f"trie_{k}": tries[k] for k in ("num_nodes", "row_ptr", "token_ids", "probs", "node_mass",
                                           "sequence_leaf")},
    }


def _unpack(a: dict[str, np.ndarray], specs: Sequence[PromptSpec]) -> list[PreparedPrompt]:
    meta = json.loads(a["meta"].tobytes())
    if meta["format"] != CACHE_FORMAT or len(meta["supports"]) != len(specs):
        raise ValueError("prepared data does not match the requested specs")
    terminator = tuple(int(t) for t in meta["terminator"])
    texts = a["texts"].tobytes().decode().split("\x00")
    values = a["values"].tobytes().decode().split("\n")
    counts = a["value_counts"]
    value_start = np.zeros(len(specs) + 1, dtype=np.int64)
    np.cumsum(counts, out=value_start[1:])
    if len(texts) != len(specs) or len(values) != value_start[-1]:
        raise ValueError("a prompt text or support string holds a separator character")
    tries = split_tries({"num_sequences": counts, **{k[5:]: v for k, v in a.items() if k.startswith("trie_")}})
    answers, answer_offsets = a["answer_tokens"], a["answer_offsets"]
    prompt_tokens, prompt_offsets, value_probs = a["prompt_tokens"], a["prompt_offsets"], a["value_probs"]
    out = []
    for p, spec in enumerate(specs):
        fid, params, decimals, integer, lower, upper, tail_mass = meta["supports"][p]
        v0, v1 = int(value_start[p]), int(value_start[p + 1])
        support = Support(fid, dict(params), decimals, tuple(values[v0:v1]), value_probs[v0:v1].copy(), integer,
                          lower, upper, tail_mass)
        out.append(PreparedPrompt(
            spec=spec,
            text=texts[p],
            prompt_ids=prompt_tokens[prompt_offsets[p]:prompt_offsets[p + 1]].copy(),
            support=support,
            answer_ids=TokenSequences(answers, answer_offsets[v0:v1 + 1]),
            trie=tries[p],
            terminator_ids=terminator,
        ))
    return out


# ---- cache file ----------------------------------------------------------------------------------
# The safetensors layout (8-byte little-endian header size, JSON header with dtype / shape /
# data_offsets per array and string metadata, then the raw arrays), written by hand so that
# loading is one mmap: every array is a read-only view, nothing is parsed or copied.
_DTYPES = {"I64": np.int64, "I32": np.int32, "F64": np.float64, "U8": np.uint8}
_CODES = {np.dtype(v).str: k for k, v in _DTYPES.items()}


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temp file in the same folder, then rename: readers never see a partial file."""
    meta = arrays["meta"].tobytes().decode()
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items() if k != "meta"}
    names = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))  # keeps every array aligned
    header, pos = {}, 0
    for k in names:
        header[k] = {"dtype": _CODES[arrays[k].dtype.str], "shape": list(arrays[k].shape),
                     "data_offsets": [pos, pos + arrays[k].nbytes]}
        pos += arrays[k].nbytes
    header["__metadata__"] = {"calft": meta, "sha256": _digest(_covered(header, meta, (
        memoryview(arrays[k]).cast("B") for k in names)))}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path) as f:  # temp file, fsync, rename
        f.write(len(blob).to_bytes(8, "little") + blob)
        for k in names:
            f.write(memoryview(arrays[k]).cast("B"))


def _covered(header: dict, meta: str, data_chunks):
    """What the digest covers: the metadata (supports' bounds, tail mass, parameters, terminator),
    every array's dtype / shape / offsets, then the array bytes."""
    layout = {k: v for k, v in header.items() if k != "__metadata__"}
    yield json.dumps([meta, layout], sort_keys=True).encode()
    yield from data_chunks


def _digest(chunks) -> str:
    """sha256 over the raw array bytes (in file order): a changed probability or id shows."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _load(path: Path, specs, vocab_size: int | None = None) -> list[PreparedPrompt]:
    """Map the file, check its digest and value ranges (ValueError on any mismatch), unpack."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    meta = header.pop("__metadata__")
    arrays, total = {}, 0
    for k, h in header.items():
        begin, end = h["data_offsets"]
        dtype = np.dtype(_DTYPES[h["dtype"]])
        arrays[k] = np.frombuffer(buf, dtype, (end - begin) // dtype.itemsize, 8 + size + begin).reshape(h["shape"])
        total = max(total, end)
    if len(buf) != 8 + size + total:
        raise ValueError(f"{path} has {len(buf)} bytes, its header describes {8 + size + total}")
    if _digest(_covered(header, meta.get("calft", ""), [memoryview(buf)[8 + size:]])) != meta.get("sha256"):
        raise ValueError(f"{path} does not match its sha256 digest (altered or damaged)")
    for k in ("prompt_tokens", "answer_tokens", "trie_token_ids"):
        a = arrays[k]
        if a.size and (a.min() < 0 or (vocab_size is not None and a.max() >= vocab_size)):
            raise ValueError(f"{path}: {k} holds token ids outside [0, {vocab_size})")
    for k in ("value_probs", "trie_probs"):
        if not np.all(np.isfinite(arrays[k]) & (arrays[k] >= 0)):
            raise ValueError(f"{path}: {k} holds negative or non-finite probabilities")
    arrays["meta"] = np.frombuffer(meta["calft"].encode(), dtype=np.uint8)
    return _unpack(arrays, specs)
