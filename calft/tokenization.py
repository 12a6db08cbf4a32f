"""What a tokenizer gives for calft's prompts and answers: the one fast-backend getter, batch
encoding, special tokens, and the in-context tokenization check (docs/method.md, section 'Trie
targets').

An answer's canonical tokens are those the model sees after the prompt: tokens(prompt + s) minus
tokens(prompt) (`answer_token_ids(..., rendered_prompt)`). That needs tokens(prompt + s) to start
with tokens(prompt); `check_in_context_tokenization` lists the strings where it does not, with the
differing token pieces. calft.fast_tokenization gives the same ids for millions of support
strings at once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence


def fast_backend(tokenizer):
    """The Rust `tokenizers.Tokenizer` behind a fast HF tokenizer, else None (the one place that asks)."""
    return getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None


def memo_per_tokenizer(store: "weakref.WeakKeyDictionary", tokenizer, key, compute):
    """compute(), remembered per tokenizer object while `key` (what the value depends on) is
    unchanged: store maps tokenizer -> (key, value). A tokenizer that cannot be weakly referenced
    is not remembered."""
    try:
        memo = store.get(tokenizer)
    except TypeError:
        return compute()
    if memo is not None and memo[0] == key:
        return memo[1]
    value = compute()
    store[tokenizer] = (key, value)
    return value


def encode_with_offsets(tokenizer, text: str):
    """(ids, char offsets or None) of text, add_special_tokens=False."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), list(enc["offset_mapping"])
    return list(tokenizer.encode(text, add_special_tokens=False)), None


def encode_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts (`add_special_tokens=False`).

    Fast tokenizers go straight to the Rust backend's batch encoder: ~12 us per short string
    instead of ~80 us through `tokenizer(...)`, which builds Python BatchEncoding objects (1001
    support strings: 12 ms vs 82 ms for SmolLM2). Same ids; tests compare both paths.
    """
    texts = list(texts)
    if not texts:
        return []
    backend = fast_backend(tokenizer)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [enc.ids for enc in encode(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def answer_token_ids(tokenizer, values: Sequence[str], rendered_prompt: str | None = None) -> list[list[int]]:
    """Token ids of each answer string (no special tokens, no terminator).

    With `rendered_prompt` (the canonical answer tokens, docs/method.md, section 'Trie targets'): the tokens the model
    sees after the prompt, tokens(prompt + s) minus tokens(prompt). Tokenizers that add a prefix
    space to a text's start (SentencePiece: Llama-2, Phi-3) give different tokens for s alone.
    ValueError (`assert_in_context_tokenization`'s report) where tokens(prompt + s) does not start
    with tokens(prompt): then s has no clean split from the prompt. Without it: each string alone.
    """
    values = list(values)
    if rendered_prompt is None:
        return encode_many(tokenizer, values)
    answers, mismatches = _in_context(tokenizer, rendered_prompt, values)
    if mismatches:
        raise _mismatch_error(tokenizer, rendered_prompt, values, mismatches)
    return answers


@dataclass(frozen=True)
class TokenizationMismatch:
    """A support string s for which tokens(prompt + s) does not start with tokens(prompt)."""

    value: str
    expected: tuple[int, ...]  # tokens(prompt)
    got: tuple[int, ...]  # tokens(prompt + value)

    def first_difference(self) -> int:
        """Index of the first prompt token that prompt + value tokenizes differently."""
        n = min(len(self.expected), len(self.got))
        return next((i for i in range(n) if self.expected[i] != self.got[i]), n)

    def describe(self, tokenizer=None) -> str:
        """One line: the string, then the prompt's tokens vs prompt + string's, from the first difference."""
        i = self.first_difference()
        exp, got = self.expected[i:], self.got[i:]
        if tokenizer is not None:
            exp_s = [tokenizer.decode([t]) for t in exp]
            got_s = [tokenizer.decode([t]) for t in got]
            return (f"{self.value!r}: from token {i}, the prompt ends with {exp_s} {list(exp)} but prompt + "
                    f"string has {got_s} {list(got)}")
        return f"{self.value!r}: from token {i}, the prompt ends with {list(exp)} but prompt + string has {list(got)}"


_SPECIALS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vocab_size(tokenizer) -> int:
    """Vocabulary size with added tokens, cheaply (len() of a fast HF tokenizer builds a dict)."""
    backend = fast_backend(tokenizer)
    return backend.get_vocab_size(with_added_tokens=True) if backend is not None else len(tokenizer)


def _special_strings(tokenizer) -> list[str]:
    """Text of every special (added) token: the tokenizer splits the input at these first.

    Memoized per tokenizer (and its size): collecting Gemma's ~6,250 special tokens through
    `added_tokens_decoder` costs ~26 ms, which was paid on every prompt."""
    def collect() -> list[str]:
        found = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(tok, "special", False):
                found.add(str(tok.content))
        return [t for t in found if t]

    return memo_per_tokenizer(_SPECIALS, tokenizer, vocab_size(tokenizer), collect)


def _split_at_last_special(tokenizer, rendered_prompt: str, prompt_ids=None, offsets=None) -> int:
    """End of the last special token in the prompt (0 when there is none): the prompt's tail
    (what follows it) is the only part that prompt + s can tokenize differently."""
    if offsets is not None:
        special = _special_ids(tokenizer)
        k = next((k for k in range(len(prompt_ids) - 1, -1, -1) if prompt_ids[k] in special), None)
        return 0 if k is None else int(offsets[k][1])
    ends = [i + len(t) for t in _special_strings(tokenizer) for i in [rendered_prompt.rfind(t)] if i >= 0]
    return max([0] + ends)


_SPECIAL_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _special_ids(tokenizer) -> set[int]:
    """Ids of `_special_strings` (memoized the same way)."""
    return memo_per_tokenizer(_SPECIAL_IDS, tokenizer, vocab_size(tokenizer), lambda: {
        int(i) for i in tokenizer.convert_tokens_to_ids(_special_strings(tokenizer)) if i is not None})


def _in_context(tokenizer, rendered_prompt: str, values: list[str], *, full: bool = False):
    """(answers, mismatches): tokens(prompt + s) minus tokens(prompt) for every s that splits cleanly.

    Fast path (full=False): HF tokenizers cut the text at special tokens first and tokenize the
    pieces independently, so with the prompt split as head + tail at the end of its last special
    token, tokens(prompt + s) = tokens(head) + tokens(tail + s). Only the short tail + s is
    tokenized per value (~40x less work for a chat prompt). The split is used only after checking
    tokens(prompt) == tokens(head) + tokens(tail); otherwise, or with full=True, every prompt + s
    is tokenized whole. The reported token lists are always whole-prompt ones.
    """
    prompt_ids, offsets = encode_with_offsets(tokenizer, rendered_prompt)
    prompt_ids = tuple(prompt_ids)
    cut = 0 if full else _split_at_last_special(tokenizer, rendered_prompt, prompt_ids, offsets)
    head_ids: tuple[int, ...] = ()
    if cut > 0:
        head_ids = tuple(tokenizer.encode(rendered_prompt[:cut], add_special_tokens=False))
        tail_ids = tuple(tokenizer.encode(rendered_prompt[cut:], add_special_tokens=False)) if cut < len(rendered_prompt) else ()
        if head_ids + tail_ids != prompt_ids:  # the tokenizer does not split there: tokenize whole
            cut, head_ids = 0, ()
    tail = rendered_prompt[cut:]
    answers, mismatches = [], []
    n = len(prompt_ids)
    for value, in_context in zip(values, encode_many(tokenizer, [tail + v for v in values])):
        got = head_ids + tuple(in_context)
        if got[:n] == prompt_ids:
            answers.append(list(got[n:]))
        else:
            mismatches.append(TokenizationMismatch(value, prompt_ids, got))
    return answers, mismatches


def check_in_context_tokenization(
    tokenizer, rendered_prompt: str, values: Sequence[str], *, full: bool = False
) -> list[TokenizationMismatch]:
    """All support strings s whose tokens(prompt + s) does not start with tokens(prompt).

    `rendered_prompt` is the chat-rendered text (`render_chat`). Empty list = every string has
    canonical in-context tokens (`answer_token_ids(..., rendered_prompt)`). full=True tokenizes
    every prompt + s whole instead of the prompt's tail + s (same result; for tests).
    """
    return _in_context(tokenizer, rendered_prompt, list(values), full=full)[1]


def _mismatch_error(tokenizer, rendered_prompt, values, mismatches, max_report: int = 10) -> ValueError:
    lines = [m.describe(tokenizer) for m in mismatches[:max_report]]
    more = len(mismatches) - len(lines)
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return ValueError(
        f"{len(mismatches)} of {len(values)} support strings do not split cleanly from the prompt: "
        f"tokens(prompt + s) does not start with tokens(prompt), so s has no canonical in-context tokens "
        f"(prompt ends with {rendered_prompt[-40:]!r}):\n  " + "\n  ".join(lines) + tail
    )


def assert_in_context_tokenization(
    tokenizer, rendered_prompt: str, values: Sequence[str], *, max_report: int = 10, full: bool = False
) -> None:
    """Raise `ValueError` listing the mismatches of `check_in_context_tokenization`, if any."""
    values = list(values)
    mismatches = check_in_context_tokenization(tokenizer, rendered_prompt, values, full=full)
    if mismatches:
        raise _mismatch_error(tokenizer, rendered_prompt, values, mismatches, max_report)
