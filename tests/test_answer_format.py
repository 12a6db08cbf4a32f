"""calft.prompts.answer_format on synthetic templates (tiny tokenizer, fast): a multi-token
terminator through preparation (a chain in the trie), the batch builder and exact scoring."""

import copy

import numpy as np
import pytest
import torch

import calft.scoring as ev
from calft.tree import SoftTargetKLLoss
from calft.batching import build_batch, global_num_positions
from calft.data import DataSettings, prepare_prompts
from calft.models import load_model
from calft.prompts import answer_format, render_chat, terminator_ids
from calft.splits import PromptSpec

SPEC = PromptSpec("binomial", (("n", 12), ("p", 0.3)))


def with_template(tok, template):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def chained(tiny_tokenizer):
    # The answer is followed by "!" and then the end-of-turn token: a 2-token terminator.
    return with_template(tiny_tokenizer, (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}!{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))


def test_answer_format_variants(tiny_tokenizer, chained):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    fmt = answer_format(tiny_tokenizer)
    assert (fmt.answer_prefix, fmt.terminator_ids, fmt.source) == ("", (im_end,), "template")
    fmt = answer_format(chained)
    assert fmt.terminator_text == "!<|im_end|>" and fmt.terminator_ids[-1] == im_end and len(fmt.terminator_ids) == 2
    # a header between the generation prompt and the answer (gpt-oss's channel) joins the prompt
    header = with_template(tiny_tokenizer, (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if m['role'] == 'assistant' %}<|im_end|>final\n"
        "{% else %}\n{% endif %}{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"))
    assert answer_format(header).answer_prefix == "<|im_end|>final\n"
    assert render_chat(header, "hi").endswith("<|im_start|>assistant<|im_end|>final\n")
    # nothing special after the answer: the tokenizer's EOS ends it
    plain = with_template(tiny_tokenizer, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert answer_format(plain).terminator_ids == (tiny_tokenizer.eos_token_id,)
    assert answer_format(plain).source == "eos"
    broken = with_template(tiny_tokenizer, "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    with pytest.raises(ValueError, match="verbatim"):
        answer_format(broken)


def test_multi_token_terminator_trains_and_scores(chained, tiny_model_dir):
    term = terminator_ids(chained)
    prep = prepare_prompts(chained, [SPEC], DataSettings(num_decimals=1, max_bins=20), cache_dir=False,
                           progress=False)[0]
    trie = prep.trie
    assert prep.terminator_ids == term
    lens = prep.answer_ids.lengths()
    # the chain: every string ends with both terminator tokens
    assert np.array_equal(trie.depth[trie.sequence_leaf], lens + 2)
    assert np.all(trie.parent_token[trie.sequence_leaf] == term[1])
    assert np.all(trie.parent_token[trie.parent[trie.sequence_leaf]] == term[0])
    model = load_model(str(tiny_model_dir))
    items = np.array([[0, 0], [0, 3]])
    for mode in ("soft", "hard"):
        batch = build_batch([prep], items, mode=mode, pad_id=chained.pad_token_id, eos_id=term, global_batch=2,
                            global_positions=global_num_positions([prep], items, len(term)))
        assert batch.gather_index.numel() == int(lens[0] + lens[3] + 4)
        assert torch.isfinite(SoftTargetKLLoss(model)(batch))
    got = ev.exact_metrics(model, chained, prep, return_log_probs=True)["log_m"]
    ref = ev.sequence_log_probs_ref(model, prep.prompt_ids, prep.answer_ids, term)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ev.support_log_probs(model, chained, prep.text, prep.support.values), ref,
                               rtol=0, atol=1e-6)
