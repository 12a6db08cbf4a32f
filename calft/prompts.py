"""Prompt text, chat rendering, and the in-context tokenization check (SPEC.md sections 1 and 4).

    Generate exactly ONE random number from a {Display} distribution with parameters
    {k1}={v1}, {k2}={v2}. Output ONLY the number.

Numbers print in a short canonical form (`format_number`): integers as integers, everything else
with at most 4 significant digits, no trailing zeros, no exponent ("2.9", not
"2.8999999999999995"; "30", not "30.0"). The article follows pronunciation: "an Exponential",
"an Inverse Gaussian", "an F-Distribution" (said "eff"), but "a Uniform" (said "you").

The prompt is one user turn rendered with the tokenizer's chat template
(`add_generation_prompt=True`; `enable_thinking=False` when the template knows that switch) and
tokenized with `add_special_tokens=False`: the template already holds its special tokens.

The trie targets assume tokens(prompt) + tokens(s) == tokens(prompt + s) for every support
string s (each answer is tokenized on its own). `check_in_context_tokenization` verifies that
and reports, per mismatching string, the differing token pieces.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from calft.families import get_family

# Display names whose first sound differs from their first letter's vowel/consonant class.
_ARTICLE_EXCEPTIONS = {"Uniform": "a", "F-Distribution": "an"}


def format_number(x: float | int) -> str:
    """Canonical short form: ints (and integral floats) as ints, else <= 4 significant digits.

    >>> format_number(30.0), format_number(2.8999999999999995), format_number(0.5743491774985174)
    ('30', '2.9', '0.5743')
    """
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise ValueError(f"format_number expects a real number, got {x!r}")
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    short = float(f"{x:.4g}")  # 4 significant digits
    if short.is_integer() and abs(short) < 1e15:
        return str(int(short))
    text = np.format_float_positional(short, trim="-")  # never an exponent
    return "0" if text in ("-0", "0") else text


def article(display: str) -> str:
    """'a' or 'an' before a display name, by its first sound."""
    if display in _ARTICLE_EXCEPTIONS:
        return _ARTICLE_EXCEPTIONS[display]
    return "an" if display[:1].upper() in "AEIOU" else "a"


def prompt_text(family_id: str, params: Mapping[str, float]) -> str:
    """The user-turn text of SPEC.md section 1 (parameters validated, printed in prompt order)."""
    family = get_family(family_id)
    values = family.validate(params)
    listed = ", ".join(f"{k}={format_number(v)}" for k, v in values.items())
    return (
        f"Generate exactly ONE random number from {article(family.display)} {family.display} distribution "
        f"with parameters {listed}. Output ONLY the number."
    )


def render_chat(tokenizer, text: str) -> str:
    """`text` as one user turn in the tokenizer's chat template, ready for the answer.

    Falls back to the plain text when the tokenizer has no chat template.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return text
    kwargs = {}
    if "enable_thinking" in str(template):
        kwargs["enable_thinking"] = False  # Qwen3-style switch: answer directly, no <think> block
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, **kwargs
    )


def _encode_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts (`add_special_tokens=False`).

    Fast tokenizers go straight to the Rust backend's batch encoder: ~12 us per short string
    instead of ~80 us through `tokenizer(...)`, which builds Python BatchEncoding objects (1001
    support strings: 12 ms vs 82 ms for SmolLM2). Same ids; tests compare both paths.
    """
    texts = list(texts)
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [enc.ids for enc in encode(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def prompt_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of the chat-rendered prompt (`add_special_tokens=False`, SPEC.md section 1 fix)."""
    return list(tokenizer.encode(render_chat(tokenizer, text), add_special_tokens=False))


def answer_token_ids(tokenizer, values: Sequence[str]) -> list[list[int]]:
    """Token ids of each answer string on its own (`add_special_tokens=False`, no EOS)."""
    return _encode_many(tokenizer, list(values))


@dataclass(frozen=True)
class TokenizationMismatch:
    """One support string whose in-context tokens differ from prompt tokens + its own tokens."""

    value: str
    expected: tuple[int, ...]  # tokens(prompt) + tokens(value)
    got: tuple[int, ...]  # tokens(prompt + value)

    def first_difference(self) -> int:
        """Index of the first differing token."""
        n = min(len(self.expected), len(self.got))
        return next((i for i in range(n) if self.expected[i] != self.got[i]), n)

    def describe(self, tokenizer=None) -> str:
        """One line: the string, then expected vs got token pieces from the first difference."""
        i = self.first_difference()
        exp, got = self.expected[i:], self.got[i:]
        if tokenizer is not None:
            exp_s = [tokenizer.decode([t]) for t in exp]
            got_s = [tokenizer.decode([t]) for t in got]
            return f"{self.value!r}: from token {i}, expected {exp_s} {list(exp)} but in context got {got_s} {list(got)}"
        return f"{self.value!r}: from token {i}, expected {list(exp)} but in context got {list(got)}"


def _special_strings(tokenizer) -> list[str]:
    """Text of every special (added) token: the tokenizer splits the input at these first."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok.content))
    return [t for t in found if t]


def _split_at_last_special(tokenizer, rendered_prompt: str) -> int:
    """Start of the last special-token occurrence in the prompt (0 when there is none)."""
    starts = [rendered_prompt.rfind(t) for t in _special_strings(tokenizer)]
    return max([0] + [i for i in starts if i > 0])


def check_in_context_tokenization(
    tokenizer, rendered_prompt: str, values: Sequence[str], *, full: bool = False
) -> list[TokenizationMismatch]:
    """All support strings s with tokens(prompt + s) != tokens(prompt) + tokens(s).

    `rendered_prompt` is the chat-rendered text (`render_chat`). Empty list = all consistent.

    Fast path (full=False): HF tokenizers cut the text at special tokens first and tokenize the
    pieces independently, so with the prompt split as head + tail at the start of its last
    special token, tokens(prompt + s) = tokens(head) + tokens(tail + s). Only the short
    tail + s is tokenized per value (~40x less work for a chat prompt). The split is used only
    after checking tokens(prompt) == tokens(head) + tokens(tail); otherwise, or with full=True,
    every prompt + s is tokenized whole. The reported token lists are always whole-prompt ones.
    """
    values = list(values)
    prompt_ids = tuple(tokenizer.encode(rendered_prompt, add_special_tokens=False))
    cut = 0 if full else _split_at_last_special(tokenizer, rendered_prompt)
    head_ids: tuple[int, ...] = ()
    if cut > 0:
        head_ids = tuple(tokenizer.encode(rendered_prompt[:cut], add_special_tokens=False))
        tail_ids = tuple(tokenizer.encode(rendered_prompt[cut:], add_special_tokens=False))
        if head_ids + tail_ids != prompt_ids:  # the tokenizer does not split there: check whole
            cut, head_ids = 0, ()
    tail = rendered_prompt[cut:]
    alone = _encode_many(tokenizer, values)
    together = _encode_many(tokenizer, [tail + v for v in values])
    out = []
    for value, ids, in_context in zip(values, alone, together):
        expected = prompt_ids + tuple(ids)
        got = head_ids + tuple(in_context)
        if got != expected:
            out.append(TokenizationMismatch(value, expected, got))
    return out


def assert_in_context_tokenization(
    tokenizer, rendered_prompt: str, values: Sequence[str], *, max_report: int = 10, full: bool = False
) -> None:
    """Raise `ValueError` listing the mismatches of `check_in_context_tokenization`, if any."""
    mismatches = check_in_context_tokenization(tokenizer, rendered_prompt, values, full=full)
    if not mismatches:
        return
    lines = [m.describe(tokenizer) for m in mismatches[:max_report]]
    more = len(mismatches) - len(lines)
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise ValueError(
        f"in-context tokenization differs from standalone tokenization for {len(mismatches)} of "
        f"{len(values)} support strings (prompt ends with {rendered_prompt[-40:]!r}):\n  "
        + "\n  ".join(lines)
        + tail
    )
