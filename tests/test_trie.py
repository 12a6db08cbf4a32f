"""C++ trie builder vs the pure-Python reference (and both vs brute-force prefix sums)."""

import math
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calft.trie import Trie, build_trie, build_tries, reference_build_trie

HYP = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Small alphabets force shared prefixes, prefix relations and duplicates; the big ids check int64.
TOKENS = st.one_of(st.integers(0, 4), st.integers(0, 2**40))
WEIGHTS = st.one_of(st.just(0.0), st.just(1.0), st.floats(1e-300, 1e3), st.floats(0.0, 1.0))


@st.composite
def supports(draw, max_sequences=12):
    """(sequences, probs, eos_id) with stems shared between sequences, duplicates, zero weights."""
    stems = draw(st.lists(st.lists(TOKENS, max_size=4), min_size=1, max_size=3))
    n = draw(st.integers(1, max_sequences))
    seqs = []
    for _ in range(n):
        if seqs and draw(st.integers(0, 5)) == 0:
            seqs.append(list(draw(st.sampled_from(seqs))))  # exact duplicate
        else:
            seqs.append(draw(st.sampled_from(stems)) + draw(st.lists(TOKENS, max_size=4)))
    probs = draw(st.lists(WEIGHTS, min_size=n, max_size=n))
    if sum(probs) == 0.0:
        probs[draw(st.integers(0, n - 1))] = draw(st.floats(1e-3, 10.0))
    eos = draw(st.one_of(st.none(), st.integers(0, 5), st.just(2**40 + 1)))
    return seqs, probs, eos


def assert_same(a: Trie, b: Trie):
    for name in ("row_ptr", "token_ids", "probs", "node_mass", "sequence_leaf", "parent", "depth",
                 "parent_token", "child"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{name} differs:\n{x}\n{y}"


def brute_force_mass(seqs, probs, eos):
    """{prefix tuple: mass} from scratch (no trie): the independent oracle for node_mass."""
    total = math.fsum(probs)
    mass = defaultdict(float)
    for s, w in zip(seqs, probs):
        full = tuple(s) + (() if eos is None else (eos,))
        if w / total > 0:
            for j in range(len(full) + 1):
                mass[full[:j]] += w / total
    return mass


def prefixes(trie: Trie) -> list[tuple]:
    """Token prefix of every node, by walking parents."""
    out = [()]
    for v in range(1, trie.num_nodes):
        out.append(out[trie.parent[v]] + (int(trie.parent_token[v]),))
    return out


@HYP
@given(supports())
def test_cpp_equals_reference(case):
    seqs, probs, eos = case
    assert_same(build_trie(seqs, probs, eos), reference_build_trie(seqs, probs, eos))


@HYP
@given(supports())
def test_structure_mass_targets_paths(case):
    seqs, probs, eos = case
    trie = build_trie(seqs, probs, eos)
    n = trie.num_nodes
    # BFS order: depth and parent non-decreasing, children ascending, edge e -> node e + 1.
    assert np.all(np.diff(trie.depth) >= 0) and np.all(np.diff(trie.parent[1:]) >= 0)
    assert np.array_equal(trie.child, np.arange(1, n))
    assert np.array_equal(trie.depth[1:], trie.depth[trie.parent[1:]] + 1)
    # Nodes are exactly the prefixes of positive-weight sequences, with brute-force masses.
    oracle = brute_force_mass(seqs, probs, eos)
    pre = prefixes(trie)
    assert sorted(pre) == sorted(oracle)
    for v, prefix in enumerate(pre):
        assert trie.node_of(prefix) == v
        assert math.isclose(trie.node_mass[v], oracle[prefix], rel_tol=1e-12), (v, prefix)
    assert trie.node_mass[0] == 1.0
    # q(t|v) = mass(child)/mass(v); they sum to 1 minus the mass of sequences ending at v.
    ends = np.zeros(n)
    total = math.fsum(probs)
    for s, w, leaf in zip(seqs, probs, trie.sequence_leaf):
        if leaf >= 0:
            ends[leaf] += w / total
    for v in range(n):
        ids, q = trie.targets(pre[v])
        assert np.all(np.diff(ids) > 0)
        assert np.allclose(q, trie.node_mass[trie.child[trie.row_ptr[v]:trie.row_ptr[v + 1]]] / trie.node_mass[v])
        expected = 1.0 - ends[v] / trie.node_mass[v]
        assert math.isclose(q.sum(), expected, rel_tol=1e-9, abs_tol=1e-9), (v, q.sum(), expected)
        if eos is not None and len(ids) and all(eos not in s for s in seqs):  # EOS only at the end
            assert math.isclose(q.sum(), 1.0, rel_tol=1e-9)
    # sequence_leaf and path_nodes: the nodes before each token (+EOS) of sequence i.
    for i, (s, w) in enumerate(zip(seqs, probs)):
        full = list(s) + ([] if eos is None else [eos])
        if w / total > 0:
            assert trie.sequence_leaf[i] == trie.node_of(full)
            path = trie.path_nodes(i)
            assert path.tolist() == [trie.node_of(full[:j]) for j in range(len(full))]
        else:
            assert trie.sequence_leaf[i] == -1
            with pytest.raises(ValueError, match=f"sequence {i} had zero probability"):
                trie.path_nodes(i)


@settings(max_examples=40, deadline=None)
@given(st.lists(supports(max_sequences=6), min_size=1, max_size=5), st.one_of(st.none(), st.integers(0, 9)),
       st.sampled_from([1, 2, 3]))
def test_build_tries_equals_per_prompt(groups, eos, threads):
    flat, offsets, probs, group_offsets = [], [0], [], [0]
    for seqs, p, _ in groups:
        for s in seqs:
            flat += s
            offsets.append(len(flat))
        probs += p
        group_offsets.append(len(probs))
    tries = build_tries(np.array(flat, dtype=np.int64), offsets, probs, group_offsets, eos, num_threads=threads)
    assert len(tries) == len(groups)
    for trie, (seqs, p, _) in zip(tries, groups):
        assert_same(trie, build_trie(seqs, p, eos))


# ---- bad input: both builders raise the same ValueError, naming the offending index ----------
FAULTS = ("negative_weight", "nan_weight", "inf_weight", "negative_token", "all_zero", "count", "eos")


@HYP
@given(supports(), st.sampled_from(FAULTS), st.data())
def test_bad_input_same_error(case, fault, data):
    seqs, probs, eos = case
    seqs, probs = [list(s) for s in seqs], list(probs)
    i = data.draw(st.integers(0, len(seqs) - 1))
    if fault == "negative_weight":
        probs[i], expected = -data.draw(st.floats(1e-300, 1e300)), f"probs\\[{i}\\] is negative"
    elif fault in ("nan_weight", "inf_weight"):
        probs[i] = {"nan_weight": math.nan, "inf_weight": data.draw(st.sampled_from([math.inf, -math.inf]))}[fault]
        expected = f"probs\\[{i}\\] is not finite"
    elif fault == "negative_token":
        seqs[i] = seqs[i] + [-data.draw(st.integers(1, 2**40))]
        expected = f"sequences\\[{i}\\]\\[{len(seqs[i]) - 1}\\] = -\\d+ is a negative token id"
    elif fault == "all_zero":
        probs, expected = [0.0] * len(probs), "all probs are zero"
    elif fault == "count":
        probs, expected = probs + [1.0], f"got {len(seqs)} sequences but {len(seqs) + 1} probs"
    else:
        eos, expected = -3, "eos_id = -3 is a negative token id"
    messages = []
    for builder in (build_trie, reference_build_trie):
        with pytest.raises(ValueError, match=expected) as err:
            builder(seqs, probs, eos)
        messages.append(str(err.value))
    assert messages[0] == messages[1], messages


def test_bad_flat_input_names_index():
    tokens, probs = np.array([1, 2, 3]), np.array([0.5, 0.5])
    with pytest.raises(ValueError, match=r"seq_offsets\[2\] = 1 is smaller than seq_offsets\[1\] = 2"):
        build_tries(tokens, [0, 2, 1], probs, [0, 2])
    with pytest.raises(ValueError, match=r"seq_offsets\[0\] = 1, expected 0"):
        build_tries(tokens, [1, 2, 3], probs, [0, 2])
    with pytest.raises(ValueError, match=r"seq_offsets\[2\] = 2 does not match len\(tokens\) = 3"):
        build_tries(tokens, [0, 1, 2], probs, [0, 2])
    with pytest.raises(ValueError, match=r"seq_offsets has 2 entries, expected 3"):
        build_tries(tokens, [0, 3], probs, [0, 2])
    with pytest.raises(ValueError, match=r"group_offsets\[2\] = 1 is smaller than group_offsets\[1\]"):
        build_tries(tokens, [0, 1, 3], probs, [0, 2, 1, 2])
    with pytest.raises(ValueError, match=r"group 1: all probs are zero"):
        build_tries(tokens, [0, 1, 3], [1.0, 0.0], [0, 1, 2])
    with pytest.raises(TypeError, match="integer token ids"):
        build_tries(tokens.astype(float), [0, 1, 3], probs, [0, 2])
    for builder in (build_trie, reference_build_trie):
        with pytest.raises(TypeError, match="integer token ids"):
            builder([[1, 2.5]], [1.0])
        with pytest.raises(ValueError, match="overflows"):
            builder([[1], [2]], [1e308, 1e308])


# ---- fixed cases -----------------------------------------------------------------------------
def test_small_example_by_hand():
    # "12", "13", "1" (prefix of the others), duplicate "12" with zero weight; eos = 9.
    trie = build_trie([[1, 2], [1, 3], [1], [1, 2]], [0.5, 0.25, 0.25, 0.0], eos_id=9)
    assert trie.row_ptr.tolist() == [0, 1, 4, 5, 6, 6, 6, 6]
    assert trie.token_ids.tolist() == [1, 2, 3, 9, 9, 9]
    assert trie.probs.tolist() == [1.0, 0.5, 0.25, 0.25, 1.0, 1.0]
    assert trie.node_mass.tolist() == [1.0, 1.0, 0.5, 0.25, 0.25, 0.5, 0.25]
    assert trie.sequence_leaf.tolist() == [5, 6, 4, -1]
    assert trie.path_nodes(0).tolist() == [0, 1, 2] and trie.path_nodes(2).tolist() == [0, 1]
    ids, q = trie.targets([1])
    assert ids.tolist() == [2, 3, 9] and q.tolist() == [0.5, 0.25, 0.25]
    with pytest.raises(ValueError, match="no edge for token 7 at position 1"):
        trie.targets([1, 7])


def test_single_long_and_large_ids():
    big = [2**40 - k for k in range(500)]
    for builder in (build_trie, reference_build_trie):
        single = builder([[5]], [3.0], eos_id=2**40)
        assert single.num_nodes == 3 and single.probs.tolist() == [1.0, 1.0]
        long = builder([big, big[:250]], [1.0, 3.0])
        assert long.num_nodes == 501 and long.depth.max() == 500
        assert long.sequence_leaf.tolist() == [500, 250]
    assert_same(build_trie([big, big[:250]], [1.0, 3.0]), reference_build_trie([big, big[:250]], [1.0, 3.0]))


def test_input_forms_agree():
    seqs = [[3, 1, 2], [3, 1, 4], [0, 0, 0]]
    probs = [0.2, 0.3, 0.5]
    ref = reference_build_trie(seqs, probs, 7)
    for form in (np.array(seqs), [np.array(s, dtype=np.int32) for s in seqs], tuple(map(tuple, seqs))):
        assert_same(build_trie(form, np.array(probs), 7), ref)
        assert_same(reference_build_trie(form, probs, 7), ref)


def test_list_input_read_in_cpp():
    """Lists (or tuples) of Python ints, numpy ints and bools go straight to the C++ binding;
    anything else falls back to the array path and its errors."""
    seqs = [[3, 1, 2], (3, np.int64(1), 4), [0, False, True], []]
    probs = [0.2, 0.3, 0.4, 0.1]
    ref = reference_build_trie([[int(t) for t in q] for q in seqs], probs, 7)
    assert_same(build_trie(seqs, probs, 7), ref)
    with pytest.raises(TypeError, match="integer token ids"):
        build_trie([[1, 2.5]], [1.0])
    with pytest.raises((TypeError, ValueError)):
        build_trie([[1, 2**70]], [1.0])
    with pytest.raises(ValueError, match="got 2 sequences but 1 probs"):
        build_trie([[1], [2]], [1.0])


def test_arrays_roundtrip_readonly_and_validation():
    trie = build_trie([[1, 2, 3], [1, 2], [4]], [1, 2, 3], eos_id=0)
    again = Trie.from_arrays({k: v.copy() for k, v in trie.to_arrays().items()})
    assert again == trie
    assert_same(again, trie)  # parent/depth re-derived from row_ptr
    with pytest.raises(ValueError):
        trie.probs[0] = 0.5  # read-only
    bad = dict(trie.to_arrays(), token_ids=trie.token_ids[[1, 0, *range(2, trie.num_edges)]])
    with pytest.raises(ValueError, match="ascending"):
        Trie.from_arrays(bad)
    bad = dict(trie.to_arrays(), row_ptr=np.r_[trie.row_ptr[:-1], trie.row_ptr[-1] + 1])
    with pytest.raises(ValueError, match="row_ptr"):
        Trie.from_arrays(bad)
    with pytest.raises(ValueError, match="missing trie arrays: probs"):
        Trie.from_arrays({k: v for k, v in trie.to_arrays().items() if k != "probs"})


def test_csr_bytes_per_edge_16384_bins():
    # 16384 five-decimal strings tokenized digit by digit (SmolLM2-like), + EOS.
    values = [f"{x:.5f}" for x in np.linspace(-3.0, 3.0, 16384)]
    seqs = [[ord(c) for c in v] for v in values]
    trie = build_trie(seqs, np.full(len(seqs), 1.0), eos_id=0)
    assert 24_000 <= trie.num_nodes <= 120_000
    assert trie.csr_nbytes / trie.num_edges <= 24.01
    assert trie.csr_nbytes / trie.num_edges <= 32.0
