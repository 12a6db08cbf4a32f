"""calft.prompts: SPEC.md section 1 text, chat rendering, tokenization, in-context check."""

import copy
import re

import pytest

from calft.families import FAMILIES, get_family
from calft.prompts import (
    answer_token_ids,
    assert_in_context_tokenization,
    check_in_context_tokenization,
    format_number,
    prompt_text,
    answer_format,
    prompt_token_ids,
    render_chat,
)
from calft.splits import SPLITS, get_split
from calft.support import build_support


@pytest.mark.parametrize(
    "x,text",
    [
        (30, "30"), (30.0, "30"), (2.8999999999999995, "2.9"), (0.5743491774985174, "0.5743"),
        (-4.3, "-4.3"), (0.125, "0.125"), (10.5, "10.5"), (1e-05, "0.00001"), (12345.6, "12350"),
        (-0.0, "0"), (1.0000000001, "1"), (0.1 + 0.2, "0.3"), (123456789, "123456789"),
    ],
)
def test_format_number(x, text):
    assert format_number(x) == text


def test_format_number_rejects_non_numbers():
    with pytest.raises(ValueError, match="real number"):
        format_number("3")


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


@pytest.mark.parametrize("fixture", ["smollm2_tokenizer", "tiny_tokenizer"])
def test_answer_ids_match_plain_tokenizer_call(fixture, request):
    tok = request.getfixturevalue(fixture)
    values = ["0", "-12.50", "3.14159", "1000", "-0.00001", "42"]
    want = tok(values, add_special_tokens=False)["input_ids"]
    assert answer_token_ids(tok, values) == want
    assert all(tok.eos_token_id not in ids for ids in want)
    assert answer_token_ids(tok, []) == []


def test_answer_ids_slow_path():
    class Slow:
        is_fast = False

        def __call__(self, texts, add_special_tokens):
            assert add_special_tokens is False
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    assert answer_token_ids(Slow(), ["12", "3"]) == [[49, 50], [51]]


def test_in_context_tokenization_smollm2_selected(smollm2_tokenizer):
    """SPEC.md section 4: the check must pass on every selected prompt at 2 and 5 decimals."""
    tok = smollm2_tokenizer
    checked = 0
    for spec in get_split("test_selected") + get_split("ood_selected"):
        rendered = render_chat(tok, prompt_text(spec.family_id, spec.params_dict))
        for d in (2, 5):
            values = build_support(spec.family_id, spec.params_dict, num_decimals=d).values
            assert check_in_context_tokenization(tok, rendered, values) == []
            checked += len(values)
    assert checked > 40_000


@pytest.mark.parametrize("fixture", ["smollm2_tokenizer", "tiny_tokenizer"])
def test_fast_check_equals_full_check(fixture, request):
    tok = request.getfixturevalue(fixture)
    rendered = render_chat(tok, prompt_text("skellam", {"mu1": 10.5, "mu2": 10.5}))
    values = list(build_support("skellam", {"mu1": 10.5, "mu2": 10.5}).values)
    values += ["-0.25", "3.5", " 7", "x"]
    # a word whose tokens change when it is cut in two: prompt ends with the head, value = rest
    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    head, rest = next(
        (w[:i], w[i:]) for w in ("hello", "distribution", "parameters", "Generate") for i in range(1, len(w))
        if ids(w) != ids(w[:i]) + ids(w[i:])
    )
    values.append(rest)
    mismatching = 0
    for prompt in (rendered, rendered + head, rendered + "12"):
        fast = check_in_context_tokenization(tok, prompt, values)
        full = check_in_context_tokenization(tok, prompt, values, full=True)
        assert fast == full
        for m in full:  # the whole-prompt token lists, independently
            assert m.got == tuple(tok(prompt + m.value, add_special_tokens=False)["input_ids"])
            assert m.expected == tuple(ids(prompt))
            assert m.got[:len(m.expected)] != m.expected
        mismatching += len(full)
    assert check_in_context_tokenization(tok, rendered, values) == []
    assert mismatching >= 1


def test_mismatch_report_is_readable(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rendered = render_chat(tok, prompt_text("poisson", {"lambda": 4})) + "hel"
    mismatches = check_in_context_tokenization(tok, rendered, ["lo", "1", "p"])
    assert [m.value for m in mismatches] == ["lo", "p"]
    with pytest.raises(ValueError) as info:
        assert_in_context_tokenization(tok, rendered, ["lo", "1", "p"])
    msg = str(info.value)
    assert "2 of 3 support strings do not split cleanly" in msg
    assert "'lo': from token" in msg and "the prompt ends with ['hel']" in msg and "has ['hello']" in msg
    assert_in_context_tokenization(tok, rendered[:-3], ["1", "2.5"])  # consistent: no error


def test_families_have_prompt_vocabulary():
    for family in FAMILIES.values():
        assert family.display[0].isupper() and all(re.fullmatch(r"[A-Za-z]\w*", p) for p in family.param_names)
