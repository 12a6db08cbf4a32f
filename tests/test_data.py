"""Prepared data: real SmolLM2 tokenizer sizes (docs/method.md, section 'Trie targets'), exactness of the piecewise
tokenization and in-context check against the tokenizer itself, and the on-disk cache."""


import numpy as np
import pytest

import calft.data as data
from calft.data import DataSettings, TokenSequences, prepare_prompts, prepare_split
from calft.prompts import prompt_token_ids, render_chat
from calft.tokenization import answer_token_ids, check_in_context_tokenization
from calft.splits import get_split
from calft.trie import build_trie, reference_build_trie

SOFT = DataSettings(num_decimals=5, max_bins=1001)
# Selected prompts with different shapes of strings: signs, 1-3 integer digits, integers.
SELECTED = ("gaussian", "cauchy", "lognormal", "binomial", "skellam")


def selected_specs(families=SELECTED):
    return [s for s in get_split("test_selected") if s.family_id in families]


def exact_tokens(tokenizer, values):
    return [list(ids) for ids in answer_token_ids(tokenizer, values)]


def as_lists(flat, offsets):
    return [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


@pytest.fixture(scope="module")
def selected(smollm2_tokenizer, tmp_path_factory):
    return prepare_prompts(smollm2_tokenizer, selected_specs(), SOFT,
                           cache_dir=tmp_path_factory.mktemp("prepared"), progress=False)


def test_selected_prompts_sizes_spec_section_4(selected, smollm2_tokenizer):
    tok = smollm2_tokenizer
    for prep in selected:
        trie = prep.trie
        branching = np.diff(trie.row_ptr).max()
        leaf_depth = trie.depth[trie.sequence_leaf]
        if not prep.support.integer:
            # docs/method.md, section 'Trie targets' says ~3.3k nodes (max ~7k); these supports give 3.8k-8.5k
            # (gaussian 5.2k, cauchy 8.1k, lognormal 8.5k: wide ranges share fewer digits).
            assert len(prep.support.values) == 1001
            assert 3000 <= trie.num_nodes <= 9000, (prep.spec, trie.num_nodes)
        # Paths of <= 11 steps including EOS ("-951.42651" + EOS), branching <= 11 (10 digits + EOS).
        assert leaf_depth.max() <= 11 and branching <= 11, (prep.spec, leaf_depth.max(), branching)
        assert np.all(prep.trie.sequence_leaf >= 0)
        # EOS closes every path, and q sums to 1 at every inner node.
        assert np.all(trie.parent_token[trie.sequence_leaf] == tok.eos_token_id)
        sums = np.add.reduceat(trie.probs, trie.row_ptr[:-1][np.diff(trie.row_ptr) > 0])
        np.testing.assert_allclose(sums, 1.0, rtol=1e-12)


def test_selected_prompts_match_tokenizer_and_reference(selected, smollm2_tokenizer):
    tok = smollm2_tokenizer
    for prep in selected:
        assert prep.prompt_ids.tolist() == prompt_token_ids(tok, prep.text)
        values = list(prep.support.values)
        assert [a.tolist() for a in prep.answer_ids] == exact_tokens(tok, values)  # SmolLM2: same alone
        assert [a.tolist() for a in prep.answer_ids] == answer_token_ids(tok, values, render_chat(tok, prep.text))
        ref = reference_build_trie([a.tolist() for a in prep.answer_ids], prep.support.probs, tok.eos_token_id)
        assert prep.trie == ref
        assert np.array_equal(prep.trie.depth, ref.depth) and np.array_equal(prep.trie.parent, ref.parent)
        # The in-context check, done the slow way on every support string: nothing differs.
        assert check_in_context_tokenization(tok, render_chat(tok, prep.text), values, full=True) == []


def test_cache_roundtrip_and_hit(smollm2_tokenizer, tmp_path, monkeypatch):
    specs = selected_specs(("gaussian", "binomial"))
    first = prepare_prompts(smollm2_tokenizer, specs, SOFT, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob(".tmp-*"))

    def no_build(*args, **kwargs):
        raise AssertionError("the second call should load the cache")

    monkeypatch.setattr(data, "_build", no_build)
    second = prepare_prompts(smollm2_tokenizer, specs, SOFT, cache_dir=tmp_path, progress=False)
    assert len(first) == len(second) == len(specs)
    for a, b in zip(first, second):
        assert a.spec == b.spec and a.text == b.text
        assert a.prompt_ids.dtype == b.prompt_ids.dtype == np.int64
        assert np.array_equal(a.prompt_ids, b.prompt_ids)
        for field in ("family_id", "params", "num_decimals", "values", "integer", "tail_mass"):
            assert getattr(a.support, field) == getattr(b.support, field), field
        assert a.support.probs.tobytes() == b.support.probs.tobytes()
        assert [x.tolist() for x in a.answer_ids] == [x.tolist() for x in b.answer_ids]
        for name in ("row_ptr", "token_ids", "probs", "node_mass", "sequence_leaf", "parent", "depth"):
            x, y = getattr(a.trie, name), getattr(b.trie, name)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
    # Another setting is another file; a damaged file is rebuilt with a warning.
    monkeypatch.undo()
    prepare_prompts(smollm2_tokenizer, specs, DataSettings(num_decimals=2), cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    files[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        again = prepare_prompts(smollm2_tokenizer, specs, SOFT, cache_dir=tmp_path, progress=False)
    assert again[0].trie == first[0].trie


def test_prepare_split_and_default_cache_dir(smollm2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("CALFT_CACHE_DIR", str(tmp_path))
    out = prepare_split(smollm2_tokenizer, "train", DataSettings(num_decimals=1, max_bins=50),
                        families=["exponential", "geometric"], max_specs=2, progress=False)
    assert [p.spec.family_id for p in out] == ["exponential"] * 2 + ["geometric"] * 2
    assert len(list((tmp_path / "prepared").glob("*.safetensors"))) == 1
    assert prepare_prompts(smollm2_tokenizer, [], SOFT) == []
    with pytest.raises(ValueError, match="DataSettings"):
        prepare_prompts(smollm2_tokenizer, out[0:1], {"num_decimals": 2})


# ---- piecewise tokenization == the tokenizer, on every path ------------------------------------
def test_token_sequences_acts_like_a_list():
    seqs = TokenSequences(np.arange(6), np.array([0, 2, 2, 6]))
    assert len(seqs) == 3 and [s.tolist() for s in seqs] == [[0, 1], [], [2, 3, 4, 5]]
    assert seqs[-1].tolist() == [2, 3, 4, 5] and [s.tolist() for s in seqs[1:]] == [[], [2, 3, 4, 5]]
    assert seqs.lengths().tolist() == [2, 0, 4]
    with pytest.raises(IndexError):
        seqs[3]
    with pytest.raises(ValueError):
        seqs[0][0] = 7  # read-only views
    assert build_trie(list(seqs), [1, 1, 1], eos_id=9).num_nodes == 10
