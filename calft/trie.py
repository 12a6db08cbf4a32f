"""Prefix tries over weighted token sequences: the soft targets of docs/method.md, section 'Trie targets'.

A support is a list of token sequences s_i (each canonical answer string, tokenized, with EOS
appended when `eos_id` is given) with weights w_i >= 0. With p_i = w_i / sum_j w_j, every prefix
v of a sequence with p_i > 0 is a node, and

    mass(v)  = sum of p_i over the sequences that pass through or end at v   (root: 1)
    q(t | v) = mass(child(v, t)) / mass(v)                                    (edge probability)

so q(. | v) sums to 1 at every node where no sequence ends (always, with EOS appended).
Zero-weight sequences are dropped; duplicate sequences share their nodes and add their mass.

Layout (CSR, `Trie`): nodes are numbered in BFS order (root 0, parents before children, the
children of a node ascending by token id); node v owns the edges row_ptr[v]:row_ptr[v+1] with
`token_ids` (ascending) and `probs` = q(t | v). By that numbering edge e always leads to node
e + 1, so no child array is stored (`Trie.child` materializes it on demand). The CSR therefore
costs 8 (row_ptr) + 8 (token id) + 8 (q) = 24 bytes per edge.

Builders, identical output (same BFS numbering, bit-identical floats):
    build_trie            one trie, C++ (calft._trie, csrc/trie.cpp)
    build_tries           many tries from flat arrays + offsets, C++, GIL released, threaded
    reference_build_trie  pure Python dict-of-dicts: the test oracle and the benchmark baseline
Both add the normalized weights of a node's sequences in ascending input order, starting at 0.0,
and compute q = mass(child) / mass(v) with the root's mass taken as exactly 1.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
from typing import Mapping, Sequence

import numpy as np

from calft import _trie

_CORE = ("row_ptr", "token_ids", "probs", "node_mass", "sequence_leaf")


def _readonly(a, dtype) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=dtype)
    a.setflags(write=False)
    return a


class Trie:
    """A prefix trie in CSR form (module docstring). N = num_nodes, E = N - 1 edges, S sequences.

    row_ptr int64[N+1], token_ids int64[E], probs float64[E] (q(t|v)), node_mass float64[N],
    sequence_leaf int64[S] (node where input sequence i ends, incl. EOS; -1 if dropped);
    derived: child int64[E] (= arange(1, N)), parent int64[N] (-1 at root),
    parent_token int64[N] (-1 at root), depth int64[N]. All arrays are read-only.
    """

    __slots__ = ("row_ptr", "token_ids", "probs", "node_mass", "sequence_leaf", "_parent", "_depth",
                 "_child", "_parent_token")

    def __init__(self, row_ptr, token_ids, probs, node_mass, sequence_leaf, parent=None, depth=None,
                 *, validate: bool = True):
        self.row_ptr = _readonly(row_ptr, np.int64)
        self.token_ids = _readonly(token_ids, np.int64)
        self.probs = _readonly(probs, np.float64)
        self.node_mass = _readonly(node_mass, np.float64)
        self.sequence_leaf = _readonly(sequence_leaf, np.int64)
        self._parent = None if parent is None else _readonly(parent, np.int64)
        self._depth = None if depth is None else _readonly(depth, np.int64)
        self._child = None
        self._parent_token = None
        if validate:
            self._validate()

    def _validate(self) -> None:
        n, e = self.num_nodes, self.num_edges
        rp = self.row_ptr
        if min(rp.ndim, self.token_ids.ndim, self.probs.ndim, self.node_mass.ndim, self.sequence_leaf.ndim) != 1:
            raise ValueError("trie arrays must be 1-D")
        if n < 1 or rp.shape[0] != n + 1 or self.token_ids.shape[0] != e or self.probs.shape[0] != e:
            raise ValueError(
                f"inconsistent trie arrays: {n} nodes need row_ptr[{n + 1}], token_ids[{max(n - 1, 0)}], "
                f"probs[{max(n - 1, 0)}]; got {rp.shape[0]}, {self.token_ids.shape[0]}, {self.probs.shape[0]}"
            )
        if rp[0] != 0 or rp[-1] != e or np.any(np.diff(rp) < 0):
            raise ValueError("row_ptr must start at 0, be non-decreasing and end at the number of edges")
        # Edge e -> node e+1 is a tree in BFS order iff every node's edges start at or after it.
        has_edges = np.diff(rp) > 0
        if np.any(rp[:-1][has_edges] < np.arange(n)[has_edges]):
            raise ValueError("row_ptr does not describe a BFS-ordered tree (a node's edge precedes it)")
        if np.any(self.token_ids < 0):
            raise ValueError("token_ids must be non-negative")
        rising = np.diff(self.token_ids) > 0
        starts = rp[1:-1]
        rising[starts[(starts > 0) & (starts < e)] - 1] = True  # no order across node boundaries
        if not rising.all():
            raise ValueError("token_ids must be strictly ascending within each node")
        leaf = self.sequence_leaf
        if np.any((leaf < -1) | (leaf >= n)):
            raise ValueError(f"sequence_leaf must hold node ids in [-1, {n})")
        if self._parent is not None and not np.array_equal(self._parent, self._derive_parent()):
            raise ValueError("parent does not match row_ptr")
        if self._depth is not None and not np.array_equal(self._depth, self._derive_depth()):
            raise ValueError("depth does not match row_ptr")

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return int(self.node_mass.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_sequences(self) -> int:
        return int(self.sequence_leaf.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays this object currently stores (derived ones once materialized)."""
        arrays = [getattr(self, name) for name in _CORE]
        arrays += [a for a in (self._parent, self._depth, self._child, self._parent_token) if a is not None]
        return int(sum(a.nbytes for a in arrays))

    @property
    def csr_nbytes(self) -> int:
        """Bytes of the CSR proper: row_ptr + token_ids + probs (child is implicit)."""
        return int(self.row_ptr.nbytes + self.token_ids.nbytes + self.probs.nbytes)

    # ---- derived arrays (computed on first access, then cached) ------------------------------
    def _derive_parent(self) -> np.ndarray:
        parent = np.empty(self.num_nodes, dtype=np.int64)
        parent[0] = -1
        parent[1:] = np.repeat(np.arange(self.num_nodes, dtype=np.int64), np.diff(self.row_ptr))
        return parent

    def _derive_depth(self) -> np.ndarray:
        # BFS levels are contiguous: the children of nodes [a, b) are nodes row_ptr[a]+1 .. row_ptr[b].
        depth = np.empty(self.num_nodes, dtype=np.int64)
        a, b, d = 0, 1, 0
        while a < b:
            depth[a:b] = d
            a, b, d = b, int(self.row_ptr[b]) + 1, d + 1
        return depth

    @property
    def parent(self) -> np.ndarray:
        if self._parent is None:
            self._parent = _readonly(self._derive_parent(), np.int64)
        return self._parent

    @property
    def depth(self) -> np.ndarray:
        if self._depth is None:
            self._depth = _readonly(self._derive_depth(), np.int64)
        return self._depth

    @property
    def child(self) -> np.ndarray:
        """child[e] = e + 1: the node edge e leads to (BFS numbering)."""
        if self._child is None:
            self._child = _readonly(np.arange(1, self.num_nodes, dtype=np.int64), np.int64)
        return self._child

    @property
    def parent_token(self) -> np.ndarray:
        """Token on the edge into each node (-1 at the root): parent_token[v] = token_ids[v-1]."""
        if self._parent_token is None:
            self._parent_token = _readonly(np.concatenate([[-1], self.token_ids]), np.int64)
        return self._parent_token

    # ---- queries -----------------------------------------------------------------------------
    def node_of(self, prefix: Sequence[int]) -> int:
        """Node id of a token prefix (root for an empty prefix); ValueError if it is not in the trie."""
        v = 0
        for j, t in enumerate(prefix):
            lo, hi = int(self.row_ptr[v]), int(self.row_ptr[v + 1])
            k = lo + int(np.searchsorted(self.token_ids[lo:hi], t))
            if k == hi or self.token_ids[k] != t:
                raise ValueError(f"prefix {[int(x) for x in prefix]} is not in the trie: no edge for token "
                                 f"{int(t)} at position {j}")
            v = k + 1
        return v

    def targets(self, prefix: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, q float64) of the soft target after `prefix`, ids ascending (read-only views)."""
        v = self.node_of(prefix)
        lo, hi = self.row_ptr[v], self.row_ptr[v + 1]
        return self.token_ids[lo:hi], self.probs[lo:hi]

    def path_nodes(self, i: int) -> np.ndarray:
        """Nodes visited BEFORE each token of input sequence i (root first): int64[len_i (+1 EOS)].

        These are the nodes whose targets supervise sequence i; path_nodes(i)[j] is the prefix of
        its first j tokens.
        """
        if not -self.num_sequences <= i < self.num_sequences:
            raise IndexError(f"sequence index {i} out of range for {self.num_sequences} sequences")
        leaf = int(self.sequence_leaf[i])
        if leaf < 0:
            raise ValueError(f"sequence {i} had zero probability and is not in the trie")
        out = np.empty(int(self.depth[leaf]), dtype=np.int64)
        v = leaf
        for j in range(out.shape[0] - 1, -1, -1):
            v = int(self.parent[v])
            out[j] = v
        return out

    # ---- (de)serialization -------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The stored core arrays (what `from_arrays` needs); derived arrays are recomputed."""
        return {name: getattr(self, name) for name in _CORE}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], *, validate: bool = True) -> "Trie":
        missing = [name for name in _CORE if name not in arrays]
        if missing:
            raise ValueError(f"missing trie arrays: {', '.join(missing)}")
        return cls(*(arrays[name] for name in _CORE), arrays.get("parent"), arrays.get("depth"),
                   validate=validate)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Trie):
            return NotImplemented
        return all(np.array_equal(getattr(self, n), getattr(other, n)) for n in _CORE)

    __hash__ = None

    def __repr__(self) -> str:
        return (f"Trie(num_nodes={self.num_nodes}, num_sequences={self.num_sequences}, "
                f"max_depth={int(self.depth.max())}, nbytes={self.nbytes})")


# ---- input conversion (shared by every builder, so their errors agree) -----------------------
def _check_counts(num_sequences: int, num_probs: int) -> None:
    if num_sequences != num_probs:
        raise ValueError(f"got {num_sequences} sequences but {num_probs} probs")


def _as_probs(probs) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"probs must be 1-D, got shape {p.shape}")
    return np.ascontiguousarray(p)


def _as_int64(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.size == 0:
        return np.zeros(a.shape, dtype=np.int64)
    if a.dtype.kind not in "iub":  # bools are the integers 0 and 1, as in Python
        raise TypeError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    if a.dtype == np.uint64 and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds a token id above 2**63 - 1")
    return np.ascontiguousarray(a, dtype=np.int64)


def _flatten(sequences) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int64[T], seq_offsets int64[S+1]) from a 2-D array or a list of sequences."""
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
        s, l = sequences.shape
        return _as_int64(sequences, "sequences").reshape(-1), np.arange(s + 1, dtype=np.int64) * l
    seqs = list(sequences)
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if all(isinstance(x, np.ndarray) for x in seqs):
        parts = [_as_int64(x, "sequences") for x in seqs if x.size]
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    else:
        flat = list(itertools.chain.from_iterable(seqs))
        tokens = _as_int64(np.array(flat) if flat else np.zeros(0, dtype=np.int64), "sequences")
    return tokens, offsets


def _num_threads(num_threads: int | None) -> int:
    if num_threads is not None:
        return int(num_threads)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---- C++ builders ----------------------------------------------------------------------------
def build_trie(sequences, probs, eos_id: int | None = None) -> Trie:
    """The trie of `sequences` (list of token-id lists, or 2-D int array) weighted by `probs`.

    probs: non-negative finite weights (normalized internally); eos_id: appended to every
    sequence when given. Bad input raises ValueError naming the offending index.
    """
    p = _as_probs(probs)
    eos = None if eos_id is None else int(eos_id)
    if isinstance(sequences, (list, tuple)) and not any(isinstance(s, np.ndarray) for s in sequences):
        # lists of lists: the C++ binding reads them directly (no flattening in Python)
        _check_counts(len(sequences), p.shape[0])
        try:
            return Trie(**_trie.build_trie_lists(sequences, p, eos), validate=False)
        except (TypeError, OverflowError):
            pass  # a non-integer token: the path below raises the canonical error
    tokens, offsets = _flatten(sequences)
    _check_counts(offsets.shape[0] - 1, p.shape[0])
    out = _trie.build_trie(tokens, offsets, p, eos)
    return Trie(**out, validate=False)


def build_tries_arrays(flat_tokens, seq_offsets, probs, group_offsets, eos_id: int | None = None,
                       num_threads: int | None = None) -> dict[str, np.ndarray]:
    """`build_tries` without the objects: the tries' core arrays concatenated in group order
    (indices local to each trie) plus num_nodes[G] and num_sequences[G] (`split_tries` layout)."""
    tokens = _as_int64(flat_tokens, "flat_tokens").reshape(-1)
    offsets = _as_int64(seq_offsets, "seq_offsets").reshape(-1)
    groups = _as_int64(group_offsets, "group_offsets").reshape(-1)
    p = _as_probs(probs)
    out = _trie.build_tries(tokens, offsets, p, groups, None if eos_id is None else int(eos_id),
                            _num_threads(num_threads))
    out["num_sequences"] = np.diff(groups)
    return out


def split_tries(arrays: Mapping[str, np.ndarray]) -> list[Trie]:
    """Trie objects (read-only views, no copies) over concatenated arrays: trie g owns
    num_nodes[g] + 1 row_ptr entries, num_nodes[g] - 1 edges, num_nodes[g] nodes and
    num_sequences[g] sequence_leaf entries."""
    n = np.asarray(arrays["num_nodes"], dtype=np.int64)
    s = np.asarray(arrays["num_sequences"], dtype=np.int64)
    node0 = np.concatenate([[0], np.cumsum(n)]).tolist()
    seq0 = np.concatenate([[0], np.cumsum(s)]).tolist()
    rp, tok, q, mass, leaf = (arrays[k] for k in _CORE)
    out = []
    for g in range(n.shape[0]):
        a, b, e = node0[g], node0[g + 1], node0[g] - g  # trie g's edges start after g fewer edges
        out.append(Trie(rp[a + g:b + g + 1], tok[e:e + b - a - 1], q[e:e + b - a - 1], mass[a:b],
                        leaf[seq0[g]:seq0[g + 1]], validate=False))
    return out


def build_tries(flat_tokens, seq_offsets, probs, group_offsets, eos_id: int | None = None,
                num_threads: int | None = None) -> list[Trie]:
    """One trie per group g over sequences group_offsets[g]:group_offsets[g+1] (flat input).

    Sequence i is flat_tokens[seq_offsets[i]:seq_offsets[i+1]] with weight probs[i]; each
    trie's sequence_leaf is indexed relative to its group. Runs in C++ with the GIL released,
    over `num_threads` threads (default: the CPUs this process may use).
    """
    return split_tries(build_tries_arrays(flat_tokens, seq_offsets, probs, group_offsets, eos_id, num_threads))


# ---- pure-Python reference -------------------------------------------------------------------
class _Node:
    __slots__ = ("children", "mass")

    def __init__(self):
        self.children: dict[int, _Node] = {}
        self.mass = 0.0


def _token(t, i: int, j: int) -> int:
    if not isinstance(t, (numbers.Integral, np.bool_)):
        raise TypeError(f"sequences must hold integer token ids, got {type(t).__name__} at sequences[{i}][{j}]")
    t = int(t)
    if t < 0:
        raise ValueError(f"sequences[{i}][{j}] = {t} is a negative token id")
    return t


def reference_build_trie(sequences, probs, eos_id: int | None = None) -> Trie:
    """Pure-Python dict-of-dicts builder with exactly the output (and errors) of `build_trie`."""
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
        sequences = sequences.tolist()
    seqs = [list(s.tolist() if isinstance(s, np.ndarray) else s) for s in sequences]
    weights = [float(w) for w in _as_probs(probs)]
    _check_counts(len(seqs), len(weights))
    if eos_id is not None and int(eos_id) < 0:
        raise ValueError(f"eos_id = {int(eos_id)} is a negative token id")
    for i, (seq, w) in enumerate(zip(seqs, weights)):  # same order as the C++ validation
        if not math.isfinite(w):
            raise ValueError(f"probs[{i}] is not finite")
        if w < 0.0:
            raise ValueError(f"probs[{i}] is negative")
        seqs[i] = [_token(t, i, j) for j, t in enumerate(seq)]
    total = 0.0
    for w in weights:  # left to right, like the C++ loop (not math.fsum, not Python 3.12's sum)
        total += w
    if total == 0.0:
        raise ValueError("all probs are zero")
    if not math.isfinite(total):
        raise ValueError("the sum of probs overflows")

    root = _Node()
    ends: list[_Node | None] = []
    for seq, w in zip(seqs, weights):
        p = w / total
        if not p > 0.0:
            ends.append(None)
            continue
        node = root
        for t in seq + ([int(eos_id)] if eos_id is not None else []):
            node = node.children.setdefault(t, _Node())
            node.mass += p
        ends.append(node)
    root.mass = 1.0

    # BFS numbering, children ascending by token id.
    order, ids = [root], {id(root): 0}
    row_ptr, token_ids, edge_probs, parent, depth = [0], [], [], [-1], [0]
    for v, node in enumerate(order):  # `order` grows while we walk it: a BFS queue
        for t in sorted(node.children):
            c = node.children[t]
            ids[id(c)] = len(order)
            order.append(c)
            token_ids.append(t)
            edge_probs.append(c.mass / node.mass)
            parent.append(v)
            depth.append(depth[v] + 1)
        row_ptr.append(len(token_ids))
    leaf = [-1 if n is None else ids[id(n)] for n in ends]
    return Trie(row_ptr, np.array(token_ids, dtype=np.int64), np.array(edge_probs, dtype=np.float64),
                np.array([n.mass for n in order], dtype=np.float64), leaf, parent, depth, validate=False)
