// calft trie builder: the algorithm only (no Python headers; bindings live in bindings.cpp).
//
// A support is a list of token sequences s_i with weights w_i >= 0. The trie has one node per
// distinct prefix of a positive-weight sequence (with `eos_id` appended to every sequence when
// given). With normalized weights p_i = w_i / sum_j w_j:
//     mass(v)  = sum of p_i over the sequences whose tokens pass through or end at prefix v
//     q(t | v) = mass(child(v, t)) / mass(v)          (conditional edge probability)
// Nodes are numbered in BFS order (root 0, a node's children ascending by token id), and edges
// are stored in CSR order, so edge e always leads to node e + 1 (no child array is stored).
//
// Determinism: every mass is summed in ascending input-sequence order, starting from 0.0, after
// normalizing each weight on its own; the root mass is exactly 1. The pure-Python reference in
// calft/trie.py follows the same order and therefore produces bit-identical floats.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace calft {

// A read-only view of a contiguous array (C++17 has no std::span).
template <typename T>
struct Span {
    const T* data = nullptr;
    int64_t size = 0;
    const T& operator[](int64_t i) const { return data[i]; }
};

// Bad input. The message names the offending index; the bindings raise it as ValueError.
class TrieInputError : public std::invalid_argument {
public:
    explicit TrieInputError(const std::string& what) : std::invalid_argument(what) {}
};

// One trie in CSR form. N nodes, E = N - 1 edges.
struct TrieArrays {
    std::vector<int64_t> row_ptr;        // [N + 1]: node v owns edges row_ptr[v] .. row_ptr[v+1]-1
    std::vector<int64_t> token_ids;      // [E]: ascending within a node; edge e -> node e + 1
    std::vector<double> probs;           // [E]: q(t | v)
    std::vector<double> node_mass;       // [N]: mass(v), root = 1
    std::vector<int64_t> sequence_leaf;  // [S]: node where sequence i ends, -1 if its weight is 0
    // parent and depth follow from row_ptr (calft.trie.Trie derives them when asked).
};

// Flat input: sequence i is tokens[seq_offsets[i] .. seq_offsets[i+1]), with weight weights[i].
struct SequenceBatch {
    Span<int64_t> tokens;
    Span<int64_t> seq_offsets;  // [S + 1]
    Span<double> weights;       // [S]
};

// Checks the flat input (offsets, weights, token ids, eos_id) and the group offsets; throws
// TrieInputError naming the first offending index. Every group must have a positive total weight.
void validate_batch(const SequenceBatch& batch, Span<int64_t> group_offsets,
                    std::optional<int64_t> eos_id);

// Builds the trie of sequences [first, last) of a validated batch. Indices in sequence_leaf
// are relative to `first`.
TrieArrays build_trie_range(const SequenceBatch& batch, int64_t first, int64_t last,
                            std::optional<int64_t> eos_id);

// Validates, then builds one trie per group g over sequences [group_offsets[g],
// group_offsets[g+1]). Groups are spread over `num_threads` std::threads (<= 1: this thread).
std::vector<TrieArrays> build_tries(const SequenceBatch& batch, Span<int64_t> group_offsets,
                                    std::optional<int64_t> eos_id, int num_threads);

}  // namespace calft
