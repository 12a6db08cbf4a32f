"""Prompt text, chat rendering, and the answer format (docs/method.md, section 'Prompts').

    Generate exactly ONE random number from a {Display} distribution with parameters
    {k1}={v1}, {k2}={v2}. Output ONLY the number.

Numbers print in a short canonical form (`format_param`): integers as integers, everything else
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

Tokenizing answers in context (and checking that they split cleanly from the prompt) is
calft.tokenization's job.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import re
import weakref
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from calft.families import get_family
from calft.tokenization import encode_with_offsets, memo_per_tokenizer

# Display names whose first sound differs from their first letter's vowel/consonant class.
_ARTICLE_EXCEPTIONS = {"Uniform": "a", "F-Distribution": "an"}


def format_param(x: float | int) -> str:
    """Canonical short form: ints (and integral floats) as ints, else <= 4 significant digits.

    >>> format_param(30.0), format_param(2.8999999999999995), format_param(0.5743491774985174)
    ('30', '2.9', '0.5743')
    """
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise ValueError(f"format_param expects a real number, got {x!r}")
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
    """The user-turn text of docs/method.md, section 'Prompts' (parameters validated, printed in prompt order)."""
    family = get_family(family_id)
    values = family.validate(params)
    listed = ", ".join(f"{k}={format_param(v)}" for k, v in values.items())
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
    enc = encode_with_offsets(tokenizer, after)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                if getattr(t, "special", False)}
    first = next((k for k, t in enumerate(enc[0]) if t in special), None)
    if first is None:  # nothing special ends the turn: the tokenizer's EOS does
        return AnswerFormat(prefix, eos_format.terminator_text, eos_format.terminator_ids, "eos")
    ids, offsets = enc[0][:first + 1], enc[1]
    text = after[:offsets[first][1]] if offsets is not None else tokenizer.decode(ids)
    return AnswerFormat(prefix, text, tuple(int(t) for t in ids), "template")


def terminator_ids(tokenizer) -> tuple[int, ...]:
    """The tokens that end every answer (`answer_format(tokenizer).terminator_ids`)."""
    ids = answer_format(tokenizer).terminator_ids
    if not ids:
        raise ValueError("the tokenizer has no EOS token and its chat template ends no answer: cannot "
                         "tell where an answer ends")
    return ids


def render_chat(tokenizer, text: str, system: str | None = None) -> str:
    """`text` as one user turn in the tokenizer's chat template, ready for the answer.

    The generation prompt (thinking disabled, a fixed date: `template_kwargs`) plus the template's
    answer prefix (`answer_format`). Falls back to the plain text when there is no chat template.
    `system`: a system turn before the user turn (the SSoT baseline, calft/ssot.py); training never
    uses one.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return text
    messages = [{"role": "system", "content": system}] if system is not None else []
    rendered = _apply(tokenizer, [*messages, {"role": "user", "content": text}], add_generation_prompt=True)
    return rendered + answer_format(tokenizer).answer_prefix


def prompt_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of the chat-rendered prompt (`add_special_tokens=False`, docs/method.md, section 'Prompts' fix)."""
    return list(tokenizer.encode(render_chat(tokenizer, text), add_special_tokens=False))


