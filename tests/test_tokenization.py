"""calft.tokenization and calft.fast_tokenization: answer ids, the in-context check, and the
piecewise fast path, each against the tokenizer itself."""

import re
import warnings

import numpy as np
import pytest

import calft.fast_tokenization as fast
from calft.fast_tokenization import tokenize_values
from calft.prompts import prompt_text, render_chat
from calft.splits import get_split
from calft.support import build_support
from calft.tokenization import answer_token_ids, assert_in_context_tokenization, check_in_context_tokenization


def exact_tokens(tokenizer, values):
    return [list(ids) for ids in answer_token_ids(tokenizer, values)]


def as_lists(flat, offsets):
    return [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def numbers(seed=0):
    rng = np.random.default_rng(seed)
    vals = [f"{x:.{d}f}" for d in (0, 1, 3, 5) for x in rng.normal(0, 10.0 ** rng.integers(0, 4), 300)]
    vals += [str(k) for k in rng.integers(-50, 5000, 200)]
    vals += ["0", "-0.00001", "123456789012345678901234", "-98765432109876543210.5", "7"]
    return vals


@pytest.fixture(scope="module")
def multidigit_tokenizer(tmp_path_factory):
    """Byte-level BPE trained on numbers: merges digits into multi-digit tokens (no digit split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(numbers(seed)) for seed in range(5)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<s>")
    fast.chat_template = "<s>user\n{{ messages[0]['content'] }}<eos>\n<s>assistant\n"
    return fast


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """SentencePiece-style (prefix '▁' on the first piece): the piecewise path must not apply."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"])
    tok.train_from_iterator([" ".join(numbers(seed)) for seed in range(3)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize("name", ["smollm2", "tiny", "multidigit", "metaspace"])
def test_tokenize_values_equals_tokenizer(name, request):
    tok = request.getfixturevalue({"smollm2": "smollm2_tokenizer", "tiny": "tiny_tokenizer",
                                   "multidigit": "multidigit_tokenizer", "metaspace": "metaspace_tokenizer"}[name])
    values = numbers(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the spot checks must not have caught a difference
        flat, offsets = tokenize_values(tok, values)
    assert flat.dtype == offsets.dtype == np.int64
    assert as_lists(flat, offsets) == exact_tokens(tok, values)
    if name == "multidigit":  # merges exist, so the memo path (not one token per digit) ran
        assert fast._Pieces(tok.backend_tokenizer).digit_lut is None
    if name in ("smollm2", "tiny"):
        assert fast._Pieces(tok.backend_tokenizer).digit_lut is not None


def test_tokenize_values_grouped_path(smollm2_tokenizer, monkeypatch):
    """The general (per-skeleton, per-piece) path, forced on a digit-level tokenizer."""
    monkeypatch.setattr(fast._Pieces, "char_lut", lambda self, names, cuts: None)
    values = numbers(4)
    assert as_lists(*tokenize_values(smollm2_tokenizer, values)) == exact_tokens(smollm2_tokenizer, values)
    monkeypatch.setattr(fast._Pieces, "__init__", lambda self, backend: (
        setattr(self, "backend", backend), setattr(self, "memo", {}), setattr(self, "usable", True),
        setattr(self, "digit_lut", None), setattr(self, "isolated", False)) and None)
    assert as_lists(*tokenize_values(smollm2_tokenizer, values)) == exact_tokens(smollm2_tokenizer, values)


def test_tokenize_values_fallbacks(smollm2_tokenizer):
    tok = smollm2_tokenizer
    odd = ["1.5", "ü2", "3"]  # not ASCII -> the exact path
    assert as_lists(*tokenize_values(tok, odd)) == exact_tokens(tok, odd)
    values = numbers(2)[:200]
    assert as_lists(*tokenize_values(tok, values, exact=True)) == exact_tokens(tok, values)
    assert as_lists(*tokenize_values(tok, [])) == []


# ---- in-context check ----------------------------------------------------------------------------
def run_check(tok, rendered, values, full=False):
    prompt_ids, tails = fast.encode_prompts(tok, [rendered])
    flat, offsets = fast.answers_in_context(tok, [rendered], prompt_ids, tails, values, np.array([len(values)]),
                                             full=full)
    assert as_lists(flat, offsets) == answer_token_ids(tok, values, rendered)
    return tails[0]


def test_in_context_check_passes_for_chat_prompt(smollm2_tokenizer):
    rendered = render_chat(smollm2_tokenizer, "Generate exactly ONE random number.")
    assert run_check(smollm2_tokenizer, rendered, numbers(3)) == "assistant\n"


@pytest.mark.parametrize("rendered", ["<|im_start|>assistant ", "The number is "])
def test_in_context_mismatch_is_reported(smollm2_tokenizer, rendered):
    # After a trailing space, SmolLM2 merges " -" into one token, so "-3.5" tokenizes differently
    # in context than alone; digits have no such merge. With and without a special token before.
    with pytest.raises(ValueError, match=r"(?s)1 of 1 prompts fail.*1 of 3 support strings do not split cleanly") as err:
        run_check(smollm2_tokenizer, rendered, ["5", "12", "-3.5"])
    assert "'-3.5': from token" in str(err.value) and "' -'" in str(err.value)


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
    """docs/method.md, section 'Trie targets': the check must pass on every selected prompt at 2 and 5 decimals."""
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
