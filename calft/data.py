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

Tokenizing ~1.65M support strings (train split, 5 decimals, 1001 bins) one by one with a fast
HF tokenizer costs ~10 us each, ~20 s, and the in-context check of SPEC.md section 4 doubles
that. `tokenize_values` / `_answers_in_context` do it piecewise instead, with the same result:
  1. A fast tokenizer encodes a string as concat(model(piece) for piece in pre_tokenize(
     normalize(s))), the model running on each pre-token independently.
  2. Support strings hold only digits and a few other ASCII characters ('-', '.'). Group them
     by skeleton (every digit replaced by '0'); the pre-tokenizer's cut points are taken from
     the skeleton (it splits by character class; checked below).
  3. Each piece is tokenized once (memo). For a BPE model whose vocabulary has no token made of
     two or more digits (SmolLM2, Qwen, Gemma), an all-digit piece is exactly one token per
     digit: a merge inside it would create such a token. Otherwise pieces go to the model.
     A vocabulary in which no token but the digits holds a digit (Gemma) never merges a digit
     with anything: a piece's tokens are its skeleton's, each digit token swapped for the real one.
     Where no BPE merge produces a digit at all, the same holds for whole strings through the
     normalizer (`_template_tokenize`: Phi-3 / Llama-2, whose normalizer prepends "▁").
  4. Answers in context (SPEC.md section 4), for every support string s: HF cuts the text at
     added tokens first, so with tail = the text after the prompt's last added token (e.g.
     "assistant\n"; "" after Mistral's [/INST] or Gemma's "\n"), tokens(prompt + s) =
     tokens(head) + tokens(tail + s), and the answer is tokens(tail + s) minus tokens(tail).
     Where pre_tokenize(tail + K) = pre_tokenize(tail) + pre_tokenize(K) (K = skeleton of s,
     checked once per (tail, skeleton) pair) that is tokens(s) alone; otherwise tail + s is
     tokenized (steps 2-3) and tokens(tail) taken off. A string whose tokens(tail + s) does not
     start with tokens(tail) has no clean split: a ValueError reports it.
Every assumption is verified where it is used, and spot checks compare against the tokenizer
itself (~4000 evenly spaced strings and the first of each skeleton; the whole prompt + string
for 2 strings per prompt); any failure falls back to the exact per-string path.
Train split, SmolLM2: ~1 s instead of ~60 s, identical tokens for all 1.65M strings.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import calft
from calft.fileio import atomic_write, remove_temps
from calft.splits import PromptSpec, get_split
from calft.support import Support, build_support
from calft.trie import Trie, build_tries_arrays, split_tries

CACHE_FORMAT = 4  # bump when the file layout changes (2: sha256 digest in the metadata; 3: terminator;
# 4: the digest covers the metadata and the array layout too)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte-fallback tokens
_SOURCES = ("families.py", "support.py", "prompts.py", "trie.py", "data.py")


@dataclass(frozen=True)
class DataSettings:
    """How supports are discretized (SPEC.md section 3); defaults = the paper's soft recipe."""

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
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is not None:
            h.update(backend.to_str().encode())
        else:
            h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
            h.update(repr(sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))).encode())
        return h.hexdigest()

    from calft.prompts import memo_per_tokenizer

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
    from calft.prompts import answer_format, reasoning_effort, render_chat

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
    context than alone (SPEC.md section 4).
    """
    specs = list(specs)
    if not isinstance(settings, DataSettings):
        raise ValueError(f"settings must be a calft.data.DataSettings, got {type(settings).__name__}")
    from calft.prompts import terminator_ids

    terminator_ids(tokenizer)  # ValueError when nothing ends an answer
    if not specs:
        return []
    if cache_dir is False:
        return _unpack(_build(tokenizer, specs, settings, progress=progress, full_check=full_check), specs)
    from calft.checkpoint import file_lock

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

    from calft.prompts import prompt_text, render_chat, terminator_ids

    kw = asdict(settings)
    supports = []
    for spec in tqdm(specs, desc="supports", unit="prompt", disable=not progress, leave=False):
        supports.append(build_support(spec.family_id, spec.params_dict, **kw))
    texts = [prompt_text(s.family_id, s.params_dict) for s in specs]
    rendered = [render_chat(tokenizer, t) for t in texts]
    terminator = np.asarray(terminator_ids(tokenizer), dtype=np.int64)
    prompt_ids, tails = _encode_prompts(tokenizer, rendered)
    values = [v for s in supports for v in s.values]
    counts = np.array([len(s.values) for s in supports], dtype=np.int64)
    answers, answer_offsets = _answers_in_context(tokenizer, rendered, prompt_ids, tails, values, counts,
                                                  full=full_check)

    group_offsets = np.zeros(len(specs) + 1, dtype=np.int64)
    np.cumsum(counts, out=group_offsets[1:])
    probs = np.concatenate([s.probs for s in supports])
    if terminator.size == 1:
        tries = build_tries_arrays(answers, answer_offsets, probs, group_offsets, eos_id=int(terminator[0]))
    else:  # a multi-token terminator: the whole chain after every answer
        chained, chained_offsets = _append_terminator(answers, answer_offsets, terminator)
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


# ---- tokenization (module docstring, steps 1-4) --------------------------------------------------
def _backend(tokenizer):
    """The Rust `tokenizers.Tokenizer` behind a fast HF tokenizer, else None."""
    return getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None


def _encode_prompts(tokenizer, rendered: list[str]) -> tuple[list[np.ndarray], list[str | None]]:
    """Token ids of each rendered prompt, and its tail: the text after its last added (special or
    not) token ("" when the prompt ends with one), when tokens(prompt) verifiably ends with
    tokens(tail) (None otherwise)."""
    backend = _backend(tokenizer)
    if backend is None:
        return [np.asarray(tokenizer.encode(r, add_special_tokens=False), dtype=np.int64) for r in rendered], \
            [None] * len(rendered)
    # HF cuts the text at every added token (special or not) before anything else: Gemma's "\n"
    # is one, so its prompts end with one and the values are tokenized alone.
    special = set(backend.get_added_tokens_decoder())
    tail_ids: dict[str, list[int]] = {}
    ids_out, tails = [], []
    for r, enc in zip(rendered, backend.encode_batch(rendered, add_special_tokens=False)):
        ids = enc.ids
        ids_out.append(np.asarray(ids, dtype=np.int64))
        k = next((k for k in range(len(ids) - 1, -1, -1) if ids[k] in special), None)
        tail = None if k is None else r[enc.offsets[k][1]:]
        if tail:
            if tail not in tail_ids:
                tail_ids[tail] = backend.encode(tail, add_special_tokens=False).ids
            tail = tail if ids[k + 1:] == tail_ids[tail] else None
        elif tail == "" and k != len(ids) - 1:
            tail = None
        tails.append(tail)  # "" = the prompt ends with a special token (Mistral's [/INST])
    return ids_out, tails


def _exact_tokenize(tokenizer, values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct string through the tokenizer itself (slow, ~10 us per string)."""
    from calft.prompts import answer_token_ids

    distinct = list(dict.fromkeys(values))
    table = dict(zip(distinct, answer_token_ids(tokenizer, distinct)))
    seqs = [table[v] for v in values]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in seqs], out=offsets[1:])
    flat = np.fromiter((t for seq in seqs for t in seq), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


class _Skeletons:
    """Support strings grouped by skeleton (every digit replaced by '0').

    chars: uint8[n, width] NUL-padded ASCII; names[g]: skeleton g; inverse[i]: skeleton of
    string i; order/bounds: the strings of skeleton g are order[bounds[g]:bounds[g+1]].
    """

    def __init__(self, chars, names, inverse, order, bounds):
        self.chars, self.names, self.inverse, self.order, self.bounds = chars, names, inverse, order, bounds

    @classmethod
    def of(cls, values: list[str]) -> "_Skeletons | None":
        """None when the strings are not plain ASCII without NULs (then nothing is piecewise)."""
        try:
            fixed = np.array(values, dtype=bytes)  # "S<width>", NUL-padded, built in C
        except UnicodeEncodeError:
            return None
        n = len(values)
        chars = fixed.view(np.uint8).reshape(n, -1) if fixed.dtype.itemsize else np.zeros((n, 1), np.uint8)
        if np.count_nonzero(chars) != sum(map(len, values)):
            return None  # a NUL inside a string
        skel = np.zeros((n, -(-chars.shape[1] // 8) * 8), dtype=np.uint8)
        skel[:, :chars.shape[1]] = np.where((chars >= 48) & (chars <= 57), 48, chars)
        # Exact integer key: factorize each 8-byte word (few distinct values), then combine.
        key = np.zeros(n, dtype=np.int64)
        for word in skel.view(np.uint64).T:
            distinct = np.unique(word)
            key = key * len(distinct) + np.searchsorted(distinct, word)
        distinct = np.unique(key)
        inverse = np.searchsorted(distinct, key).astype(np.uint16 if len(distinct) < 2**16 else np.int64)
        order = np.argsort(inverse, kind="stable")  # radix sort for uint16
        bounds = np.zeros(len(distinct) + 1, dtype=np.int64)
        np.cumsum(np.bincount(inverse, minlength=len(distinct)), out=bounds[1:])
        names = [bytes(skel[i]).rstrip(b"\0").decode() for i in order[bounds[:-1]]]
        return cls(chars, names, inverse, order, bounds)


class _Pieces:
    """Tokenizes digit strings piecewise (module docstring, steps 2-3); `usable` is False when
    the tokenizer does not fit the argument."""

    def __init__(self, backend):
        self.backend, self.memo = backend, {}
        model, norm, pre = backend.model, backend.normalizer, backend.pre_tokenizer
        digits = "0123456789"
        self.usable = (norm is None or norm.normalize_str(digits) == digits) and (
            pre is None or "".join(t for t, _ in pre.pre_tokenize_str(digits)) == digits)
        self.digit_lut = None  # byte -> token id, when no BPE merge can join two digits
        self.isolated = False  # no BPE merge can join a digit to anything
        if type(model).__name__ == "BPE" and not model.dropout and not model.continuing_subword_prefix \
                and not model.end_of_word_suffix:
            vocab = backend.get_vocab(with_added_tokens=False)
            if all(d in vocab for d in digits) and not any(len(k) > 1 and k.isascii() and k.isdigit() for k in vocab):
                self.digit_lut = np.zeros(256, dtype=np.int64)
                self.digit_lut[48:58] = [vocab[d] for d in digits]
                # No token but the digits themselves holds a digit (byte-fallback "<0x31>" aside):
                # no merge ever joins a digit to anything, so a digit splits a piece into parts
                # tokenized independently (Gemma, whose pre-tokenizer keeps "model\n1.5" whole).
                # Added tokens (Gemma's "<unused12>") are matched before the model runs, never merged.
                added = {t.content for t in backend.get_added_tokens_decoder().values()}
                self.isolated = not any(len(k) > 1 and any(c in digits for c in k) and not _BYTE_TOKEN.fullmatch(k)
                                        and k not in added for k in vocab)

    def splits(self, skeleton: str):
        """Pre-token cut points of a skeleton, or None if the pieces are not plain substrings."""
        norm, pre = self.backend.normalizer, self.backend.pre_tokenizer
        if norm is not None and norm.normalize_str(skeleton) != skeleton:
            return None
        pieces = [(skeleton, (0, len(skeleton)))] if pre is None else pre.pre_tokenize_str(skeleton)
        if any(text != skeleton[a:b] for text, (a, b) in pieces):
            return None
        return [(a, b) for _, (a, b) in pieces]

    def tokens(self, piece: str) -> np.ndarray:
        if piece not in self.memo:
            self.memo[piece] = np.array([t.id for t in self.backend.model.tokenize(piece)], dtype=np.int64)
        return self.memo[piece]

    def char_lut(self, names: list[str], cuts) -> np.ndarray | None:
        """byte -> token id when every piece of every skeleton is one token per character, the
        token of that character alone (digit-level tokenizers); else None."""
        if self.digit_lut is None:
            return None
        lut = self.digit_lut.copy()
        for name, pieces in zip(names, cuts):
            if [i for a, b in pieces for i in range(a, b)] != list(range(len(name))):
                return None  # the pieces must tile the string (no character dropped or repeated)
            for a, b in pieces:
                piece = name[a:b]
                if set(piece) == {"0"}:
                    continue
                if "0" in piece:  # digits share a piece with other characters: merges may differ
                    return None
                toks = self.tokens(piece)
                singles = [self.tokens(c) for c in piece]
                if len(toks) != len(piece) or any(t.size != 1 or t[0] != k for t, k in zip(singles, toks)):
                    return None
                for c, k in zip(piece, toks):
                    lut[ord(c)] = k
        return lut

    def piece_tokens(self, sub: np.ndarray, shape: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(tokens int64[m, T], mask bool[m, T] or None = all valid) of one piece column block."""
        m = sub.shape[0]
        digit_pos = [j for j, c in enumerate(shape) if c == "0"]
        if self.digit_lut is not None and len(digit_pos) == len(shape):
            return self.digit_lut[sub], None  # one token per digit
        if not digit_pos:  # the same piece in every string
            return np.broadcast_to(self.tokens(shape), (m, self.tokens(shape).size)), None
        if self.isolated:  # the skeleton's tokens, each digit token swapped for the real digit's
            toks = self.backend.model.tokenize(shape)
            slot = {t.offsets[0]: k for k, t in enumerate(toks)
                    if t.offsets[1] - t.offsets[0] == 1 and t.id == self.digit_lut[48]}
            if all(j in slot for j in digit_pos):
                table = np.tile(np.array([t.id for t in toks], dtype=np.int64), (m, 1))
                table[:, [slot[j] for j in digit_pos]] = self.digit_lut[sub[:, digit_pos]]
                return table, None
        if len(digit_pos) <= 18:
            key = ((sub[:, digit_pos] - 48).astype(np.int64) * 10 ** np.arange(len(digit_pos))).sum(1)
        else:
            key = np.ascontiguousarray(sub).view(np.dtype((np.void, sub.shape[1]))).ravel()
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        toks = [self.tokens(bytes(sub[i]).decode()) for i in first]
        lens = np.array([t.size for t in toks], dtype=np.int64)
        table = np.zeros((len(toks), max(int(lens.max()), 1)), dtype=np.int64)
        for u, t in enumerate(toks):
            table[u, :t.size] = t
        inverse = inverse.reshape(-1)
        return table[inverse], np.arange(table.shape[1]) < lens[inverse][:, None]


def tokenize_values(tokenizer, values: list[str], *, exact: bool = False, skeletons=None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 tokens, offsets int64[n+1]): tokens of each string alone, no special tokens.

    Equal to `calft.prompts.answer_token_ids`; piecewise when the tokenizer allows it (module
    docstring), with spot checks against the tokenizer, else (or with exact=True) string by string.
    """
    values = list(values)
    backend = _backend(tokenizer)
    sk = None if exact or backend is None or not values else skeletons or _Skeletons.of(values)
    pieces = None if sk is None else _Pieces(backend)
    if pieces is None or not pieces.usable or _added_token_may_occur(backend, sk.names):
        return _exact_tokenize(tokenizer, values)
    cuts = [pieces.splits(name) for name in sk.names]
    if any(c is None for c in cuts):
        return _exact_tokenize(tokenizer, values)
    lut = pieces.char_lut(sk.names, cuts)
    if lut is not None:  # every character is its own token: one lookup, already in input order
        valid = sk.chars != 0
        flat = lut[sk.chars[valid]]
    else:  # general case: one padded matrix, rows in skeleton order, then back in input order
        flat, valid = _tokenize_grouped(pieces, sk, cuts)
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(valid.sum(1), out=offsets[1:])

    # Spot checks: ~4000 evenly spaced strings and the first string of every skeleton.
    from calft.prompts import answer_token_ids

    probe = np.unique(np.r_[np.linspace(0, len(values) - 1, min(len(values), 4000)).astype(np.int64),
                            sk.order[sk.bounds[:-1]]])
    for i, ids in zip(probe.tolist(), answer_token_ids(tokenizer, [values[i] for i in probe])):
        if flat[offsets[i]:offsets[i + 1]].tolist() != list(ids):
            warnings.warn(f"piecewise tokenization of {values[i]!r} differs from the tokenizer's; "
                          "tokenizing every support string on its own (slow)")
            return _exact_tokenize(tokenizer, values)
    return flat, offsets


def _tokenize_grouped(pieces: _Pieces, sk: _Skeletons, cuts) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 tokens, valid bool[n, T]) of every string, skeleton group by skeleton group.
    Masked entries read row by row give each string's tokens in order, holes and all."""
    blocks, width = [], 1
    chars = sk.chars[sk.order]
    for g, name in enumerate(sk.names):
        block = chars[sk.bounds[g]:sk.bounds[g + 1]]
        parts = [pieces.piece_tokens(block[:, a:b], name[a:b]) for a, b in cuts[g]]
        blocks.append(parts)
        width = max(width, sum(t.shape[1] for t, _ in parts))
    n = sk.chars.shape[0]
    small = pieces.backend.get_vocab_size(with_added_tokens=True) < 2**31
    tokens = np.zeros((n, width), dtype=np.int32 if small else np.int64)
    valid = np.zeros((n, width), dtype=bool)
    for g, parts in enumerate(blocks):
        r0, r1, c = sk.bounds[g], sk.bounds[g + 1], 0
        for toks, mask in parts:
            tokens[r0:r1, c:c + toks.shape[1]] = toks
            valid[r0:r1, c:c + toks.shape[1]] = True if mask is None else mask
            c += toks.shape[1]
    unsorted = np.empty_like(sk.order)
    unsorted[sk.order] = np.arange(n)
    tokens, valid = tokens[unsorted], valid[unsorted]
    return tokens[valid].astype(np.int64), valid


def _added_token_may_occur(backend, names: list[str]) -> bool:
    """True if some added token is made only of characters that can occur in the values."""
    charset = set("".join(names)) | set("0123456789")
    return any(t.content and set(t.content) <= charset for t in backend.get_added_tokens_decoder().values())


def _answers_in_context(tokenizer, rendered, prompt_ids, tails, values, counts, *, full: bool
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 tokens, offsets int64[n+1]): the canonical tokens of every support string after
    its prompt, tokens(prompt + s) minus tokens(prompt) (SPEC.md section 4; module docstring,
    step 4). ValueError with a readable report where a string does not split cleanly."""
    from calft.prompts import answer_token_ids

    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    per_prompt: list = [None] * len(rendered)  # p -> (flat tokens, lengths)
    by_tail: dict[str, list[int]] = {}
    for p, tail in enumerate(tails):
        if not full and tail is not None:
            by_tail.setdefault(tail, []).append(p)
    backend = _backend(tokenizer)
    for tail, group in by_tail.items():
        idx = np.concatenate([np.arange(starts[p], starts[p + 1]) for p in group])
        flat, lens, clean = _tail_answers(tokenizer, backend, tail, [values[i] for i in idx])
        # Spot checks against the whole prompt + string: the first and middle string of each prompt.
        row = np.concatenate([[0], np.cumsum(counts[group])])
        probes = [(p, row[k] + d) for k, p in enumerate(group) for d in {0, int(counts[p]) // 2} if counts[p]]
        texts = [rendered[p] + values[idx[r]] for p, r in probes]
        flat_start = np.concatenate([[0], np.cumsum(lens)])
        trusted = True
        for (p, r), ids in zip(probes, _encode_batch(tokenizer, texts)):
            want = prompt_ids[p].tolist() + flat[flat_start[r]:flat_start[r + 1]].tolist()
            if clean[r] and ids != want:
                warnings.warn(f"in-context spot check failed for {values[idx[r]]!r}; tokenizing every support "
                              "string with its whole prompt (slow)")
                trusted = False
                break
        if not trusted:
            continue
        for k, p in enumerate(group):
            a, b = row[k], row[k + 1]
            if clean[a:b].all():
                per_prompt[p] = (flat[flat_start[a]:flat_start[b]], lens[a:b])
    failing = []
    for p in range(len(rendered)):
        if per_prompt[p] is not None:
            continue
        try:
            seqs = answer_token_ids(tokenizer, values[starts[p]:starts[p + 1]], rendered[p])
        except ValueError as err:
            failing.append((p, err))
            continue
        per_prompt[p] = (np.fromiter((t for q in seqs for t in q), dtype=np.int64),
                         np.array([len(q) for q in seqs], dtype=np.int64))
    if failing:
        p, err = failing[0]
        raise ValueError(f"{len(failing)} of {len(rendered)} prompts fail the in-context tokenization check "
                         f"(SPEC.md section 4); the first one (#{p}):\n{err}")
    flat = np.concatenate([f for f, _ in per_prompt]) if per_prompt else np.zeros(0, np.int64)
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    if per_prompt:
        np.cumsum(np.concatenate([n for _, n in per_prompt]), out=offsets[1:])
    return flat.astype(np.int64), offsets


def _tail_answers(tokenizer, backend, tail: str, values: list[str]):
    """(flat, lengths, clean bool[n]): tokens(tail + s) minus tokens(tail) for each s; clean[i] is
    False where tokens(tail + s) does not start with tokens(tail).

    Strings whose skeleton K meets the tail at a pre-token boundary (pre_tokenize(tail + K) =
    pre_tokenize(tail) + pre_tokenize(K), nothing normalized) are tokenized alone: tokens(tail + s)
    = tokens(tail) + tokens(s) (SmolLM2, Qwen, Llama-3 after "assistant\n"). The others (Gemma,
    whose pre-tokenizer keeps "model\n-1.5" one piece) are tokenized as tail + s, then the tail's
    tokens are taken off."""
    n = len(values)
    tail_ids = np.asarray(tokenizer.encode(tail, add_special_tokens=False) if tail else [], dtype=np.int64)
    alone = np.ones(n, dtype=bool) if not tail else np.zeros(n, dtype=bool)
    sk = _Skeletons.of(values) if tail and backend is not None else None
    if sk is not None:
        pieces = _Pieces(backend)
        for g, name in enumerate(sk.names):
            if _boundary_is_clean(pieces, tail, name):
                alone[sk.order[sk.bounds[g]:sk.bounds[g + 1]]] = True
    parts = []  # (string indices, flat tokens, lengths)
    if alone.any():
        which = np.nonzero(alone)[0]
        flat, offsets = tokenize_values(tokenizer, [values[i] for i in which],
                                        skeletons=sk if alone.all() else None)
        parts.append((which, flat, np.diff(offsets), np.ones(which.size, dtype=bool)))
    if not alone.all():
        which = np.nonzero(~alone)[0]
        texts = [tail + values[i] for i in which]
        fast = _template_tokenize(tokenizer, backend, texts)
        flat, offsets = fast if fast is not None else tokenize_values(tokenizer, texts)
        lens = np.diff(offsets)
        n_tail = tail_ids.size
        clean = lens >= n_tail
        for j in range(n_tail):  # every tokens(tail + s) starts with tokens(tail)
            clean[clean] &= flat[offsets[:-1][clean] + j] == tail_ids[j]
        pos = np.arange(flat.size) - np.repeat(offsets[:-1], lens)
        parts.append((which, flat[pos >= n_tail], lens - n_tail, clean))
    if len(parts) == 1 and parts[0][0].size == n:
        return parts[0][1], parts[0][2], parts[0][3]
    lens = np.zeros(n, dtype=np.int64)
    clean = np.zeros(n, dtype=bool)
    for which, _, part_lens, part_clean in parts:
        lens[which], clean[which] = part_lens, part_clean
    starts = np.concatenate([[0], np.cumsum(lens)])
    flat = np.empty(int(starts[-1]), dtype=np.int64)
    for which, part_flat, part_lens, _ in parts:  # scatter each part's tokens to their strings' slots
        dest = np.repeat(starts[which], part_lens) + (np.arange(part_flat.size) - np.repeat(
            np.concatenate([[0], np.cumsum(part_lens)[:-1]]), part_lens))
        flat[dest] = part_flat
    return flat, lens, clean


def _digits_isolated(backend) -> np.ndarray | None:
    """byte -> token id of each digit when no BPE merge ever produces a token holding a digit
    (so a digit is always its own token and splits the text around it); else None."""
    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        return None
    vocab, digits = model["vocab"], "0123456789"
    if not all(d in vocab for d in digits):
        return None
    for merge in model["merges"]:
        pair = merge if isinstance(merge, list) else merge.split(" ")
        if any(c in digits for c in "".join(pair)):
            return None
    lut = np.zeros(256, dtype=np.int64)
    lut[48:58] = [vocab[d] for d in digits]
    return lut


def _template_tokenize(tokenizer, backend, texts: list[str]):
    """(flat, offsets) for a digit-isolated vocabulary whose normalizer or pre-tokenizer the
    piecewise path cannot follow (Phi-3 / Llama-2: a prefix "▁"): per skeleton, the tokenizer's
    own tokens of the skeleton, each digit's token swapped for the real digit's. Spot-checked
    against the tokenizer; None when it does not apply."""
    if backend is None or not texts:
        return None
    sk = _Skeletons.of(texts)
    lut = None if sk is None else _digits_isolated(backend)
    if lut is None:
        return None
    n = len(texts)
    tables = []
    for g, (name, enc) in enumerate(zip(sk.names, backend.encode_batch(sk.names, add_special_tokens=False))):
        digit_pos = [j for j, c in enumerate(name) if c == "0"]
        slot = {a: k for k, (tok, (a, b)) in enumerate(zip(enc.ids, enc.offsets)) if b - a == 1 and tok == lut[48]}
        if not all(j in slot for j in digit_pos) or len(slot) != len(digit_pos):
            return None
        rows = sk.order[sk.bounds[g]:sk.bounds[g + 1]]
        table = np.tile(np.asarray(enc.ids, dtype=np.int64), (rows.size, 1))
        table[:, [slot[j] for j in digit_pos]] = lut[sk.chars[rows][:, digit_pos]]
        tables.append((rows, table))
    lens = np.zeros(n, dtype=np.int64)
    for rows, table in tables:
        lens[rows] = table.shape[1]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = np.empty(int(offsets[-1]), dtype=np.int64)
    for rows, table in tables:
        flat[(offsets[rows][:, None] + np.arange(table.shape[1])).ravel()] = table.ravel()
    probe = np.unique(np.r_[np.linspace(0, n - 1, min(n, 4000)).astype(np.int64), sk.order[sk.bounds[:-1]]])
    for i, enc in zip(probe.tolist(), backend.encode_batch([texts[i] for i in probe], add_special_tokens=False)):
        if flat[offsets[i]:offsets[i + 1]].tolist() != enc.ids:
            return None
    return flat, offsets


def _boundary_is_clean(pieces: _Pieces, tail: str, skeleton: str) -> bool:
    """pre_tokenize(tail + K) == pre_tokenize(tail) + pre_tokenize(K) (shifted), nothing normalized."""
    norm, pre = pieces.backend.normalizer, pieces.backend.pre_tokenizer
    if pre is None or pieces.splits(skeleton) is None:
        return False
    if norm is not None and (norm.normalize_str(tail + skeleton) != tail + skeleton
                             or norm.normalize_str(tail) != tail):
        return False
    shift = len(tail)
    expected = pre.pre_tokenize_str(tail) + [(t, (a + shift, b + shift))
                                             for t, (a, b) in pre.pre_tokenize_str(skeleton)]
    return pre.pre_tokenize_str(tail + skeleton) == expected


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = _backend(tokenizer)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def _append_terminator(flat: np.ndarray, offsets: np.ndarray, terminator: np.ndarray):
    """Every sequence followed by all the terminator's tokens (a multi-token terminator)."""
    lens = np.diff(offsets)
    t = terminator.size
    out_offsets = offsets + t * np.arange(offsets.size)
    out = np.empty(flat.size + t * lens.size, dtype=np.int64)
    pos = np.arange(flat.size) + t * np.repeat(np.arange(lens.size), lens)
    out[pos] = flat
    for j in range(t):
        out[out_offsets[1:] - t + j] = terminator[j]
    return out, out_offsets


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
