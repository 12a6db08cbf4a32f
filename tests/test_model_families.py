"""The paper's model families with their real tokenizers and chat templates (tests/vocabularies.py):
answer format, canonical in-context answer tokens, date-proof prompts, then a tiny random model
with each vocabulary: prepare, train 3 steps (path mode, soft and hard), score exactly against
brute force, sample. Marked slow (~10-20 s a family warm, + downloads cold); CI runs them."""

import datetime
import warnings

import numpy as np
import pytest
import torch

from vocabularies import load_family_tokenizer

import calft.scoring as ev
from calft.tree import SoftTargetKLLoss
from calft.batching import build_batch, build_tree_batch, epoch_plan, global_num_positions
from calft.data import DataSettings, prepare_prompts
from calft.losses import SparseTargets, linear_soft_target_kl
from calft.models import add_lora
from calft.prompts import FIXED_DATE, answer_format, render_chat
from calft.tokenization import answer_token_ids
from calft.sampling import generate_samples, stop_token_ids
from calft.splits import PromptSpec

pytestmark = pytest.mark.slow

# family -> (answer prefix, terminator, tokens per digit group, digits in the prompt's date)
EXPECTED = {
    "qwen3": ("", "<|im_end|>", 1, None),
    "llama3": ("", "<|eot_id|>", 3, FIXED_DATE.strftime("%d %b %Y")),
    "gemma3": ("", "<end_of_turn>", 1, None),  # the tokenizer's EOS is <eos>: not what ends a turn
    "gpt-oss": ("<|channel|>final<|message|>", "<|return|>", 3, FIXED_DATE.isoformat()),
    "mistral": ("", "</s>", 1, None),
    "phi3": ("", "<|end|>", 1, None),  # SentencePiece with a prefix space
}
SPECS = [PromptSpec("gaussian", (("mu", -3.5), ("sigma", 20.0))), PromptSpec("binomial", (("n", 30), ("p", 0.4))),
         PromptSpec("cauchy", (("x0", 0.0), ("gamma", 2.0)))]


@pytest.fixture(scope="module", params=list(EXPECTED))
def family(request):
    return request.param, load_family_tokenizer(request.param)


@pytest.fixture(scope="module")
def prepared(family, tmp_path_factory):
    _, tok = family
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback to the slow exact path
        return prepare_prompts(tok, SPECS, DataSettings(num_decimals=5, max_bins=1001),
                               cache_dir=tmp_path_factory.mktemp("prepared"), progress=False)


def tiny_model(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def test_answer_format_and_date(family):
    name, tok = family
    prefix, terminator, _, date = EXPECTED[name]
    fmt = answer_format(tok)
    assert fmt.answer_prefix == prefix and fmt.source == "template"
    assert fmt.terminator_ids == (tok.convert_tokens_to_ids(terminator),), fmt.describe(tok)
    rendered = render_chat(tok, "Generate exactly ONE random number.")
    assert rendered.endswith(prefix)
    today = datetime.date.today()
    if today != FIXED_DATE:  # the prompt renders the same on every day
        assert today.isoformat() not in rendered and today.strftime("%d %b %Y") not in rendered
    if date is not None:
        assert date in rendered


def test_prepare_in_context_and_terminator(family, prepared):
    name, tok = family
    _, terminator, group, _ = EXPECTED[name]
    term = tok.convert_tokens_to_ids(terminator)
    for prep in prepared:
        rendered = render_chat(tok, prep.text)
        assert prep.prompt_ids.tolist() == tok.encode(rendered, add_special_tokens=False)
        values = list(prep.support.values)
        # canonical tokens = tokens(prompt + s) minus tokens(prompt), checked on every string whole
        assert [a.tolist() for a in prep.answer_ids] == answer_token_ids(tok, values, rendered)
        whole = tok([rendered + v for v in values[::50]], add_special_tokens=False)["input_ids"]
        for ids, a in zip(whole, list(prep.answer_ids)[::50]):
            assert ids == prep.prompt_ids.tolist() + a.tolist()
        trie = prep.trie
        assert prep.terminator_ids == (term,)
        assert np.all(trie.parent_token[trie.sequence_leaf] == term)  # the trained terminator
    pieces = {tok.decode([t]) for p in prepared for a in p.answer_ids for t in a}
    assert max(len(t) for t in pieces if t.isdigit()) == group  # digit grouping of the vocabulary
    branching = max(int(np.diff(p.trie.row_ptr).max()) for p in prepared)
    assert branching > 100 if group == 3 else branching <= 11


def test_train_score_sample(family, prepared):
    name, tok = family
    term = answer_format(tok).terminator_ids
    model = add_lora(tiny_model(tok), r=4, alpha=8, dropout=0.0)  # default targets: all-linear
    objective = SoftTargetKLLoss(model)
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-2)
    plan = epoch_plan(prepared, seed=0, epoch=0, samples_per_prompt=2)
    for step, mode in enumerate(("soft", "hard", "soft")):  # path mode: 3 steps
        items = plan[2 * step:2 * step + 2]
        batch = build_batch(prepared, items, mode=mode, pad_id=tok.pad_token_id or 0, eos_id=term,
                            global_batch=2, global_positions=global_num_positions(prepared, items))
        loss = objective(batch)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for pack in (False, True):  # trie mode: every node of 2 prompts' tries in one tree forward
        batch = build_tree_batch(prepared, epoch_plan(prepared, seed=0, epoch=1)[:2], pad_id=tok.pad_token_id or 0,
                                 global_batch=2, max_nodes=-1, samples_per_prompt=1, seed=0, epoch=1, pack=pack)
        loss = objective(batch)
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in objective.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
    model.eval()
    # exact scoring vs brute force, on a small support (brute force = one full forward per string)
    small = prepare_prompts(tok, SPECS[:1], DataSettings(num_decimals=1, max_bins=12), cache_dir=False,
                            progress=False)[0]
    got = ev.exact_metrics(model, tok, small, return_log_probs=True)["log_m"]
    ref = ev.sequence_log_probs_ref(model, small.prompt_ids, small.answer_ids, term)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    logp = ev.support_log_probs(model, tok, small.text, small.support.values)
    np.testing.assert_allclose(logp, ref, rtol=0, atol=1e-4)
    assert term[-1] in stop_token_ids(model, tok)
    outs = generate_samples(model, tok, small.prompt_ids, 3, max_new_tokens=3, batch_size=3)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)


def test_exact_scoring_with_1000_children():
    """Llama-3's 3-digit tokens: the integers 0..999 are 1000 one-token answers under the root."""
    tok = load_family_tokenizer("llama3")
    model = tiny_model(tok, seed=1)
    rendered = render_chat(tok, "Generate exactly ONE random number.")
    values = [str(i) for i in range(1000)]
    answers = answer_token_ids(tok, values, rendered)
    assert all(len(a) == 1 for a in answers)
    trie = ev._answer_trie(tok, values, rendered)
    assert int(np.diff(trie.row_ptr)[0]) == 1000
    prompt = tok.encode(rendered, add_special_tokens=False)
    got = ev.node_log_mass(trie, ev.score_trie(model, prompt, trie))[trie.sequence_leaf]
    pick = np.arange(0, 1000, 97)
    ref = ev.sequence_log_probs_ref(model, prompt, [answers[i] for i in pick], answer_format(tok).terminator_ids)
    np.testing.assert_allclose(got[pick], ref, rtol=0, atol=1e-4)


def test_torch_loss_with_1000_targets_per_row():
    """K = 1000 entries in one sparse row (a Llama-3 / gpt-oss node): the torch path vs float64."""
    gen = torch.Generator().manual_seed(0)
    N, V, H, K = 3, 1537, 8, 1000
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    ids = [torch.randperm(V, generator=gen)[:k].sort().values for k in (K, 1, K)]
    probs = [torch.rand(len(i), generator=gen, dtype=torch.float64) for i in ids]
    probs = [p / p.sum() for p in probs]
    targets = SparseTargets(torch.tensor([0, K, K + 1, 2 * K + 1]), torch.cat(ids), torch.cat(probs).float())
    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss = linear_soft_target_kl(h32, w32, targets, reduction="sum", backend="torch")
    loss.backward()
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = torch.log_softmax(h64 @ w64.T, dim=-1)
    q = torch.zeros(N, V, dtype=torch.float64)
    for r in range(N):
        q[r, ids[r]] = probs[r].float().double()
    ref = (q * (torch.log(q.clamp_min(1e-300)) - logp)).sum()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item())), (loss.item(), ref.item())
    torch.testing.assert_close(h32.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w32.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_gpt_oss_moe_lora_default_targets():
    """all-linear works on a MoE model with no gate_proj/up_proj/down_proj modules."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=64)
    model = add_lora(GptOssForCausalLM(config))
    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= names, names


def test_batch_with_a_999_way_node():
    """Uniform(0, 1) at 3 decimals under Llama-3: after "0." one node has 999 children (the 3-digit
    tokens 001..999). The batch builder's sparse rows and the loss, against a dense float64 KL."""
    tok = load_family_tokenizer("llama3")
    prep = prepare_prompts(tok, [PromptSpec("uniform", (("a", 0), ("b", 1)))], DataSettings(num_decimals=3),
                           cache_dir=False, progress=False)[0]
    assert int(np.diff(prep.trie.row_ptr).max()) == 999
    model = tiny_model(tok, seed=2)
    items = np.array([[0, 10], [0, 500]])
    batch = build_batch([prep], items, mode="soft", pad_id=tok.pad_token_id, eos_id=prep.terminator_ids,
                        global_batch=2)
    rows = np.diff(batch.targets.row_ptr.numpy())
    assert rows.max() == 999
    with torch.no_grad():
        loss = SoftTargetKLLoss(model)(batch).double()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).double(), -1)[batch.gather_index]
    q = torch.zeros_like(logp)
    ptr = batch.targets.row_ptr
    for r in range(len(rows)):
        q[r, batch.targets.token_ids[ptr[r]:ptr[r + 1]]] = batch.targets.probs[ptr[r]:ptr[r + 1]].double()
    kl = (q * (torch.log(q.clamp_min(1e-300)) - logp)).sum(-1)
    ref = (batch.weights.double() * kl).sum()
    assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, ref.item()), (loss.item(), ref.item())


@pytest.mark.parametrize("name", ["phi3", "gemma3"])
def test_digit_isolated_vocabularies_take_the_fast_paths(name):
    """No BPE merge joins a digit to anything in these vocabularies: the skeleton-template path
    tokenizes "\\n" + value for Phi-3 (its normalizer prepends "▁") exactly like the tokenizer."""
    import calft.fast_tokenization as fast
    from calft.support import build_support

    tok = load_family_tokenizer(name)
    backend = tok.backend_tokenizer
    assert fast.digits_isolated(backend) is not None
    texts = ["\n" + v for v in build_support("gaussian", {"mu": -3.5, "sigma": 20}, num_decimals=5).values]
    flat, offsets = fast._template_tokenize(tok, backend, texts)
    assert [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(len(texts))] == \
        tok(texts, add_special_tokens=False)["input_ids"]


def test_gpt_oss_reasoning_effort_is_the_papers_and_keys_the_cache(tmp_path):
    """The real harmony template renders "Reasoning: low" (the artifact's setting), an override
    changes the rendering, and the prepared-data cache key follows it."""
    from calft.data import cache_key
    from calft.prompts import reasoning_effort, set_reasoning_effort

    tok = load_family_tokenizer("gpt-oss")
    assert reasoning_effort() == "low"
    low = render_chat(tok, "Generate exactly ONE random number.")
    settings = DataSettings(num_decimals=2, max_bins=101)
    key_low = cache_key(tok, SPECS, settings)
    assert "Reasoning: low" in low and "Reasoning: medium" not in low
    try:
        set_reasoning_effort("medium")
        medium = render_chat(tok, "Generate exactly ONE random number.")
        assert "Reasoning: medium" in medium and medium.replace("Reasoning: medium", "Reasoning: low") == low
        assert cache_key(tok, SPECS, settings) != key_low
        with pytest.raises(ValueError, match="one of low, medium, high"):
            set_reasoning_effort("extreme")
    finally:
        set_reasoning_effort("low")
    assert cache_key(tok, SPECS, settings) == key_low


def test_gemma3_own_template_renders_like_gemma2s_for_one_user_turn():
    """Gemma-3's own chat template (axolotl's wheel) is the one the family tests use; for the only
    conversation calft renders (one user turn, then the answer) it writes exactly what Gemma-2's does."""
    from vocabularies import gemma2_template, gemma3_own_template

    tok = load_family_tokenizer("gemma3")
    own, gemma2 = gemma3_own_template(), gemma2_template()
    assert tok.chat_template == own and own != gemma2
    for messages, gen in (([{"role": "user", "content": "Generate ONE number."}], True),
                          ([{"role": "user", "content": "Generate ONE number."},
                            {"role": "assistant", "content": "3.14"}], False)):
        a = tok.apply_chat_template(messages, chat_template=own, tokenize=False, add_generation_prompt=gen)
        b = tok.apply_chat_template(messages, chat_template=gemma2, tokenize=False, add_generation_prompt=gen)
        assert a == b
    assert a == "<bos><start_of_turn>user\nGenerate ONE number.<end_of_turn>\n<start_of_turn>model\n3.14<end_of_turn>\n"
