"""String Seed of Thought (SSoT): the prompting baseline the paper compares fine-tuning with.

SSoT (Misaki et al., 2025) asks the model, in a system prompt, to first write a long random-looking
string, then reason about how to turn that string into its random choice, then give the answer in
tags:
    <random_string>...</random_string> <thinking>...</thinking> <answer>...</answer>
The paper's artifact (`inference/ssot*.py`) uses two system prompts: one for sampling from a
stated distribution (structured numeric sampling) and one for tasks with many valid answers (open
random generation); the user turn is the benchmark's own prompt, unchanged. calft's prompts below
follow the same protocol and steps, worded for calft. The answer is what stands between the first
<answer> and </answer> (strict extraction, the artifact's setting); an output without a closed
answer tag yields "" (an empty answer: a parse failure in structured sampling, not counted as an
output in open generation).

SSoT needs room to write its seed and reasoning before the answer, so the paper suite gives it a
larger generation budget than the bare prompts (calft.paper_suite); outputs cut off before
</answer> count as failures, as in the artifact.
"""
from __future__ import annotations

import re

ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)

_STEPS = """Follow these steps for every request:
1. Write the random seed string between <random_string> and </random_string>.
2. Reason step by step between <thinking> and </thinking>. {use_seed} Use all of the string's characters, so as much of its randomness as possible reaches the answer.
3. Give only the final answer between <answer> and </answer>.

Always answer in exactly this format:
<random_string>
...
</random_string>
<thinking>
...
</thinking>
<answer>
...
</answer>"""

SYSTEM_PROMPTS = {
    # sampling from a stated probability distribution (structured numeric sampling)
    "numeric": (
        "You are a helpful assistant that gives careful, well-reasoned answers. When a task involves "
        "chance or asks for something random, first write a long, complex random string to act as a "
        "seed. It should look arbitrary: no visible structure, pattern or meaning.\n\n"
        "When the user asks you to sample from a probability distribution, base every random decision "
        "on that seed string, exactly as written.\n\n"
        + _STEPS.format(use_seed="Make every probabilistic decision from the seed string, exactly as written.")
    ),
    # tasks with many acceptable answers (open random generation)
    "open": (
        "You are a helpful assistant that gives careful, well-reasoned answers. When a task has many "
        "acceptable answers, give ONE answer, chosen so that your answers vary from one request to the "
        "next. To choose it, first write a long, complex random string to act as a seed. It should look "
        "arbitrary: no visible structure, pattern or meaning.\n\n"
        "When a question allows several answers, base every choice on that seed string, exactly as "
        "written.\n\n"
        + _STEPS.format(use_seed="Use the seed string to pick ONE answer among the many possible ones.")
    ),
}


def ssot_prompt_ids(tokenizer, user_text: str, mode: str) -> list[int]:
    """Token ids of the system prompt of `mode` plus the user turn, chat-rendered for the answer."""
    from calft.prompts import render_chat

    if mode not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown SSoT mode {mode!r}; known: {', '.join(SYSTEM_PROMPTS)}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("SSoT needs a chat template with a system turn; this tokenizer has no chat template")
    rendered = render_chat(tokenizer, user_text, system=SYSTEM_PROMPTS[mode])
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def extract_answer(text: str) -> str:
    """The text inside the first closed <answer> tag, stripped; "" when there is none."""
    m = ANSWER_RE.search(text)
    return m.group(1).strip() if m else ""
