"""Prompt text, chat rendering, and the in-context tokenization check (SPEC.md sections 1 and 4).

    Generate exactly ONE random number from a {Display} distribution with parameters
    {k1}={v1}, {k2}={v2}. Output ONLY the number.

Numbers print in a short canonical form (`format_number`): integers as integers, everything else
with at most 4 significant digits, no trailing zeros, no exponent ("2.9", not
"2.8999999999999995"; "30", not "30.0"). The article follows pronunciation: "an Exponential",
"an Inverse Gaussian", "an F-Distribution" (said "eff"), but "a Uniform" (said "you").

The prompt is one user turn rendered with the tokenizer's chat template
(`add_generation_prompt=True`; `enable_thinking=False` when the template knows that switch; a
fixed date where it prints one) followed by the template's answer prefix, and tokenized with
`add_special_tokens=False`: the template already holds its special tokens.

`answer_format` reads off the template where the answer goes (text between the generation prompt
and the assistant's content, e.g. gpt-oss's channel header) and which tokens end it (the first
special token after the content: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|return|>`,
`</s>`). Training, the trie, exact scoring and sampling's stop criterion all use it.

An answer's canonical tokens are those the model sees after the prompt: tokens(prompt + s) minus
tokens(prompt) (`answer_token_ids(..., rendered_prompt)`). That needs tokens(prompt + s) to start
with tokens(prompt); `check_in_context_tokenization` lists the strings where it does not, with the
differing token pieces.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import re
import weakref
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


# ---- answer format: where the answer goes and what ends it, read off the chat template ---------
# A fixed "today" for templates that print the date (Llama-3.x: "Today Date: 26 Jul 2024", its own
# fallback; gpt-oss: "Current date: 2024-07-26"): a prompt renders the same on every day, so
# cached prompt ids and a later evaluation agree.
FIXED_DATE = datetime.date(2024, 7, 26)
# Stands in for the answer when the template renders a whole assistant turn: private-use
# characters that no template prints, so where it lands is unambiguous.
_PLACEHOLDER = "\ue000calft-answer\ue001"


_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(["'])(.*?)\1\s*\)""")


def fixed_date_template(template: str) -> str:
    """The template with every `strftime_now("<format>")` call (transformers' clock-reading
    global) replaced by FIXED_DATE printed in that format, as a string literal."""
    return _STRFTIME_CALL.sub(lambda m: json.dumps(FIXED_DATE.strftime(m.group(2))), template)


# gpt-oss's harmony template writes "Reasoning: <effort>" into its system message (its default is
# "medium"); the paper's artifact renders every gpt-oss prompt with reasoning_effort="low".
REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_REASONING_EFFORT = "low"
_reasoning_effort = DEFAULT_REASONING_EFFORT


def set_reasoning_effort(effort: str) -> None:
    """The reasoning effort that templates with a `reasoning_effort` variable (gpt-oss) render,
    for every prompt of this process (training, scoring, sampling and the data cache key)."""
    global _reasoning_effort
    if effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")
    _reasoning_effort = effort


def reasoning_effort() -> str:
    return _reasoning_effort


def template_kwargs(template: str) -> dict:
    """Extra variables for rendering: thinking off where the template has the switch, a fixed date,
    the reasoning effort where the template reads one (gpt-oss)."""
    kwargs = {}
    if "reasoning_effort" in template:
        kwargs["reasoning_effort"] = _reasoning_effort
    if "date_string" in template:
        kwargs["date_string"] = FIXED_DATE.strftime("%d %b %Y")
    if "enable_thinking" in template:
        kwargs["enable_thinking"] = False  # Qwen3-style switch: answer directly, no <think> block
    return kwargs


@dataclass(frozen=True)
class AnswerFormat:
    """How an answer sits in the chat template (one definition for training, scoring, sampling).

    answer_prefix: text the template writes between the generation prompt and the assistant's
        content (gpt-oss: "<|channel|>final<|message|>"; "" for most). It is part of the prompt.
    terminator_text / terminator_ids: the text right after the answer up to and including the
        first special token, and its tokens: what ends the answer (Qwen "<|im_end|>", Llama-3
        "<|eot_id|>", Gemma "<end_of_turn>", gpt-oss "<|return|>", Mistral "</s>"). Without a
        chat template, or when the template writes no special token after the answer, it is the
        tokenizer's EOS. A multi-token terminator (text before the special token) is appended
        whole to every answer: the trie then ends each string with a chain of those tokens.
    source: where the terminator came from ("template" or "eos").
    """

    answer_prefix: str
    terminator_text: str
    terminator_ids: tuple[int, ...]
    source: str

    def describe(self, tokenizer=None) -> str:
        pieces = [tokenizer.decode([t]) for t in self.terminator_ids] if tokenizer is not None else None
        return (f"answer prefix {self.answer_prefix!r}, terminator {self.terminator_text!r} = "
                f"{list(self.terminator_ids)}{' ' + str(pieces) if pieces else ''} (from the {self.source})")


_FORMATS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


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


def _apply(tokenizer, messages, *, add_generation_prompt: bool) -> str:
    template = str(tokenizer.chat_template)
    return tokenizer.apply_chat_template(messages, chat_template=fixed_date_template(template), tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_kwargs(template))


def answer_format(tokenizer) -> AnswerFormat:
    """The AnswerFormat of a tokenizer's chat template (memoized per tokenizer and template).

    Renders one user turn twice: with the generation prompt, and followed by an assistant turn
    whose content is a placeholder. The text between the generation prompt and the placeholder is
    the answer prefix; the tokens after the placeholder, up to the first special token, end it.
    """
    template = getattr(tokenizer, "chat_template", None)
    key = (str(template), tokenizer.eos_token_id)  # not len(tokenizer): ~2 ms a call on Gemma
    return memo_per_tokenizer(_FORMATS, tokenizer, key, lambda: _derive_answer_format(tokenizer, template))


def _derive_answer_format(tokenizer, template) -> AnswerFormat:
    eos = tokenizer.eos_token_id
    eos_format = AnswerFormat("", "" if eos is None else str(tokenizer.eos_token), () if eos is None else (int(eos),),
                              "eos")
    if not template:
        return eos_format
    user = {"role": "user", "content": "Generate exactly ONE random number."}
    generation = _apply(tokenizer, [user], add_generation_prompt=True)
    try:
        whole = _apply(tokenizer, [user, {"role": "assistant", "content": _PLACEHOLDER}], add_generation_prompt=False)
    except Exception as err:  # a template that cannot render an assistant turn
        raise ValueError(f"the chat template cannot render an assistant answer ({type(err).__name__}: {err}); "
                         "calft needs it to find where the answer goes and what ends it") from err
    if whole.count(_PLACEHOLDER) != 1:
        raise ValueError("the chat template does not print the assistant's content verbatim, once: cannot "
                         "tell where the answer goes")
    before, after = whole.split(_PLACEHOLDER)
    if before.startswith(generation):
        prefix = before[len(generation):]  # e.g. gpt-oss's "<|channel|>final<|message|>"
    elif generation.startswith(before):
        prefix = ""  # the generation prompt already holds more (Qwen3's empty <think></think> block)
    else:
        raise ValueError(
            "the chat template renders the assistant turn with a different beginning than its generation "
            f"prompt:\n  generation prompt ends {generation[-80:]!r}\n  assistant turn starts {before[-80:]!r}")
    enc = _encode_with_offsets(tokenizer, after)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                if getattr(t, "special", False)}
    first = next((k for k, t in enumerate(enc[0]) if t in special), None)
    if first is None:  # nothing special ends the turn: the tokenizer's EOS does
        return AnswerFormat(prefix, eos_format.terminator_text, eos_format.terminator_ids, "eos")
    ids, offsets = enc[0][:first + 1], enc[1]
    text = after[:offsets[first][1]] if offsets is not None else tokenizer.decode(ids)
    return AnswerFormat(prefix, text, tuple(int(t) for t in ids), "template")


def _encode_with_offsets(tokenizer, text: str):
    """(ids, char offsets or None) of text, add_special_tokens=False."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), list(enc["offset_mapping"])
    return list(tokenizer.encode(text, add_special_tokens=False)), None


def terminator_ids(tokenizer) -> tuple[int, ...]:
    """The tokens that end every answer (`answer_format(tokenizer).terminator_ids`)."""
    ids = answer_format(tokenizer).terminator_ids
    if not ids:
        raise ValueError("the tokenizer has no EOS token and its chat template ends no answer: cannot "
                         "tell where an answer ends")
    return ids


def render_chat(tokenizer, text: str) -> str:
    """`text` as one user turn in the tokenizer's chat template, ready for the answer.

    The generation prompt (thinking disabled, a fixed date: `template_kwargs`) plus the template's
    answer prefix (`answer_format`). Falls back to the plain text when there is no chat template.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return text
    rendered = _apply(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    return rendered + answer_format(tokenizer).answer_prefix


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


def answer_token_ids(tokenizer, values: Sequence[str], rendered_prompt: str | None = None) -> list[list[int]]:
    """Token ids of each answer string (no special tokens, no terminator).

    With `rendered_prompt` (the canonical answer tokens, SPEC.md section 4): the tokens the model
    sees after the prompt, tokens(prompt + s) minus tokens(prompt). Tokenizers that add a prefix
    space to a text's start (SentencePiece: Llama-2, Phi-3) give different tokens for s alone.
    ValueError (`assert_in_context_tokenization`'s report) where tokens(prompt + s) does not start
    with tokens(prompt): then s has no clean split from the prompt. Without it: each string alone.
    """
    values = list(values)
    if rendered_prompt is None:
        return _encode_many(tokenizer, values)
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


def _size(tokenizer) -> int:
    """Vocabulary size with added tokens, cheaply (len() of a fast HF tokenizer builds a dict)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
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

    return memo_per_tokenizer(_SPECIALS, tokenizer, _size(tokenizer), collect)


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
    return memo_per_tokenizer(_SPECIAL_IDS, tokenizer, _size(tokenizer), lambda: {
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
    prompt_ids, offsets = _encode_with_offsets(tokenizer, rendered_prompt)
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
    for value, in_context in zip(values, _encode_many(tokenizer, [tail + v for v in values])):
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
