"""calft.prompts: the prompt text (docs/method.md, section 'Prompts') and chat rendering."""

import copy
import re

import pytest

from calft.families import FAMILIES, get_family
from calft.prompts import (
    format_param,
    prompt_text,
    answer_format,
    prompt_token_ids,
    render_chat,
)
from calft.splits import SPLITS, get_split


@pytest.mark.parametrize(
    "x,text",
    [
        (30, "30"), (30.0, "30"), (2.8999999999999995, "2.9"), (0.5743491774985174, "0.5743"),
        (-4.3, "-4.3"), (0.125, "0.125"), (10.5, "10.5"), (1e-05, "0.00001"), (12345.6, "12350"),
        (-0.0, "0"), (1.0000000001, "1"), (0.1 + 0.2, "0.3"), (123456789, "123456789"),
    ],
)
def test_format_param(x, text):
    assert format_param(x) == text


def test_format_param_rejects_non_numbers():
    with pytest.raises(ValueError, match="real number"):
        format_param("3")


def test_prompt_text_exact():
    assert prompt_text("uniform", {"a": 3.5, "b": 10.5}) == (
        "Generate exactly ONE random number from a Uniform distribution with parameters "
        "a=3.5, b=10.5. Output ONLY the number."
    )
    assert prompt_text("hypergeometric", {"N": 20.0, "M": 100.0, "K": 50}) == (
        "Generate exactly ONE random number from a Hypergeometric distribution with parameters "
        "M=100, K=50, N=20. Output ONLY the number."
    )
    assert "from an Exponential distribution with parameters lambda=7." in prompt_text("exponential", {"lambda": 7})
    assert "from a Gamma distribution" in prompt_text("gamma", {"alpha": 7, "beta": 7})
    assert "from an Inverse Gaussian distribution" in prompt_text("inverse_gaussian", {"mu": 5, "lambda": 7})
    assert "from an F-Distribution distribution" in prompt_text("f_distribution", {"d1": 12, "d2": 24})
    assert "parameters a=2.5, c=6, b=9.5." in prompt_text("triangular", {"a": 2.5, "b": 9.5, "c": 6})


def test_prompt_text_validates():
    with pytest.raises(ValueError, match="gaussian: parameter 'sigma'"):
        prompt_text("gaussian", {"mu": 0, "sigma": 0})


def test_every_split_prompt_reads_naturally():
    params_re = re.compile(r"with parameters (.*)\. Output ONLY the number\.$")
    for name in SPLITS:
        for spec in get_split(name):
            text = prompt_text(spec.family_id, spec.params_dict)
            family = get_family(spec.family_id)
            assert text.startswith("Generate exactly ONE random number from a")
            assert f" {family.display} distribution with parameters " in text
            for bad in ("99999", "0000000", "e-", "e+", "nan", "inf", "a E", "a I", "an G"):
                assert bad not in text, (text, bad)
            listed = params_re.search(text).group(1).split(", ")
            assert [item.split("=")[0] for item in listed] == list(family.param_names)
            for item, (key, value) in zip(listed, spec.params):
                printed = item.split("=")[1]
                assert not printed.endswith(".0") and float(printed) == value, (text, key)
                if isinstance(value, int):  # counts print as plain integers
                    assert re.fullmatch(r"\d+", printed), text


class _StubTokenizer:
    """Records apply_chat_template calls; the template text decides enable_thinking."""

    def __init__(self, chat_template):
        self.chat_template = chat_template
        self.calls = []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append((messages, kwargs))
        return "<u>" + messages[0]["content"] + "</u><a>"


def test_render_chat_switches(tiny_tokenizer):
    plain = _StubTokenizer(None)
    assert render_chat(plain, "hello") == "hello" and not plain.calls
    tok = copy.deepcopy(tiny_tokenizer)
    # thinking off where the template has the switch; the date fixed, whichever way it is read
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}{% if add_generation_prompt %}"
        "<|im_start|>{% if enable_thinking is defined and enable_thinking is false %}nothink {% endif %}"
        "{{ strftime_now('%Y-%m-%d') }} {{ date_string }}{% endif %}")
    assert render_chat(tok, "hello") == "<|im_start|>hello<|im_end|><|im_start|>nothink 2024-07-26 26 Jul 2024"
    assert answer_format(tok).terminator_ids == (tok.convert_tokens_to_ids("<|im_end|>"),)


def test_smollm2_rendering_and_prompt_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = prompt_text("gaussian", {"mu": 3.5, "sigma": 3})
    rendered = render_chat(tok, text)
    assert rendered.endswith("<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n")
    ids = prompt_token_ids(tok, text)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids[1] != im_start  # the template's own start token, once
    assert ids.count(im_start) == rendered.count("<|im_start|>")


def test_families_have_prompt_vocabulary():
    for family in FAMILIES.values():
        assert family.display[0].isupper() and all(re.fullmatch(r"[A-Za-z]\w*", p) for p in family.param_names)
