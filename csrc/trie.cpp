// calft trie builder. See trie.h for the definitions; this file has the algorithm.
//
// Construction is an MSD radix sort fused with BFS numbering. The sequences under a node form a
// contiguous range of `order` (sequence indices). Processing the nodes of depth d in id order,
// each node's range is sorted by (token at depth d, sequence index), with -1 for the sequences
// that end at the node; equal tokens then form contiguous child ranges, created in ascending
// token order. Children of depth-d nodes therefore get consecutive ids after all depth-d nodes
// (BFS), and the CSR edge of each child is appended in the same order (edge e -> node e + 1).
// Cost: O(total tokens * log(branching)) time, O(nodes + sequences) memory, no hashing.
#include "trie.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

namespace calft {

namespace {

std::string at(const char* name, int64_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

void check_offsets(Span<int64_t> offsets, const char* name, int64_t expected_size,
                   int64_t expected_last, const char* last_name) {
    if (offsets.size != expected_size) {
        throw TrieInputError(std::string(name) + " has " + std::to_string(offsets.size) +
                             " entries, expected " + std::to_string(expected_size));
    }
    if (offsets[0] != 0) {
        throw TrieInputError(at(name, 0) + " = " + std::to_string(offsets[0]) + ", expected 0");
    }
    for (int64_t i = 1; i < offsets.size; ++i) {
        if (offsets[i] < offsets[i - 1]) {
            throw TrieInputError(at(name, i) + " = " + std::to_string(offsets[i]) + " is smaller than " +
                                 at(name, i - 1) + " = " + std::to_string(offsets[i - 1]));
        }
    }
    if (offsets[offsets.size - 1] != expected_last) {
        throw TrieInputError(at(name, offsets.size - 1) + " = " + std::to_string(offsets[offsets.size - 1]) +
                             " does not match " + last_name + " = " + std::to_string(expected_last));
    }
}

}  // namespace

void validate_batch(const SequenceBatch& batch, Span<int64_t> group_offsets,
                    std::optional<int64_t> eos_id) {
    const int64_t num_sequences = batch.weights.size;
    check_offsets(batch.seq_offsets, "seq_offsets", num_sequences + 1, batch.tokens.size, "len(tokens)");
    if (group_offsets.size < 1) throw TrieInputError("group_offsets is empty");
    check_offsets(group_offsets, "group_offsets", group_offsets.size, num_sequences, "len(probs)");
    if (eos_id && *eos_id < 0) {
        throw TrieInputError("eos_id = " + std::to_string(*eos_id) + " is a negative token id");
    }
    // Per sequence in input order: its weight, then its tokens (the reference checks alike).
    for (int64_t i = 0; i < num_sequences; ++i) {
        const double w = batch.weights[i];
        if (!std::isfinite(w)) throw TrieInputError(at("probs", i) + " is not finite");
        if (w < 0.0) throw TrieInputError(at("probs", i) + " is negative");
        const int64_t begin = batch.seq_offsets[i];
        for (int64_t j = begin; j < batch.seq_offsets[i + 1]; ++j) {
            if (batch.tokens[j] < 0) {
                throw TrieInputError(at("sequences", i) + "[" + std::to_string(j - begin) + "] = " +
                                     std::to_string(batch.tokens[j]) + " is a negative token id");
            }
        }
    }
    const int64_t num_groups = group_offsets.size - 1;
    for (int64_t g = 0; g < num_groups; ++g) {
        double total = 0.0;
        for (int64_t i = group_offsets[g]; i < group_offsets[g + 1]; ++i) total += batch.weights[i];
        const std::string where = num_groups == 1 ? "" : "group " + std::to_string(g) + ": ";
        if (total == 0.0) throw TrieInputError(where + "all probs are zero");
        if (!std::isfinite(total)) throw TrieInputError(where + "the sum of probs overflows");
    }
}

TrieArrays build_trie_range(const SequenceBatch& batch, int64_t first, int64_t last,
                            std::optional<int64_t> eos_id) {
    const int64_t n = last - first;

    // 1. Normalize each weight on its own; sequences whose normalized weight is 0 are dropped.
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) total += batch.weights[first + i];
    std::vector<double> p(static_cast<size_t>(n));
    std::vector<int64_t> order;  // sequence indices (relative to first), sorted range by range
    order.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
        p[i] = batch.weights[first + i] / total;
        if (p[i] > 0.0) order.push_back(i);
    }
    // Key of sequence i at depth d: its token, the appended eos, or -1 once it has ended.
    const int64_t* offsets = batch.seq_offsets.data + first;
    const auto key = [&](int64_t i, int64_t d) -> int64_t {
        const int64_t at = offsets[i] + d;
        return at < offsets[i + 1] ? batch.tokens[at] : (at == offsets[i + 1] && eos_id ? *eos_id : -1);
    };

    TrieArrays out;
    out.sequence_leaf.assign(static_cast<size_t>(n), -1);
    out.row_ptr.push_back(0);
    out.node_mass.push_back(1.0);  // the root holds all the (normalized) mass by definition
    const auto add_child = [&](int64_t token, double mass, double mass_v) {
        out.token_ids.push_back(token);
        out.probs.push_back(mass / mass_v);
        out.node_mass.push_back(mass);
    };

    // 2. Level by level. cur[k] = range of `order` under node level_first + k.
    std::vector<std::pair<int64_t, int64_t>> cur{{0, static_cast<int64_t>(order.size())}}, next;
    std::vector<std::pair<int64_t, int64_t>> keyed;  // (token at depth d or -1, sequence index)
    int64_t level_first = 0;
    for (int64_t d = 0; !cur.empty(); ++d) {
        next.clear();
        for (size_t k = 0; k < cur.size(); ++k) {
            const int64_t v = level_first + static_cast<int64_t>(k);
            const double mass_v = out.node_mass[v];
            const auto [lo, hi] = cur[k];
            if (hi - lo == 1) {  // one sequence below: a chain (most nodes of a support trie)
                const int64_t i = order[lo], token = key(i, d);
                if (token < 0) {
                    out.sequence_leaf[i] = v;
                } else {
                    add_child(token, p[i], mass_v);  // 0.0 + p[i] == p[i]: same sum as below
                    next.emplace_back(lo, hi);
                }
                out.row_ptr.push_back(static_cast<int64_t>(out.token_ids.size()));
                continue;
            }
            keyed.clear();
            for (int64_t r = lo; r < hi; ++r) keyed.emplace_back(key(order[r], d), order[r]);
            if (!std::is_sorted(keyed.begin(), keyed.end())) std::sort(keyed.begin(), keyed.end());
            const int64_t m = hi - lo;
            for (int64_t r = 0; r < m; ++r) order[lo + r] = keyed[r].second;

            int64_t r = 0;
            for (; r < m && keyed[r].first == -1; ++r) out.sequence_leaf[keyed[r].second] = v;
            while (r < m) {
                const int64_t token = keyed[r].first;
                const int64_t start = r;
                double mass = 0.0;  // ascending sequence index: the reference sums in this order
                for (; r < m && keyed[r].first == token; ++r) mass += p[keyed[r].second];
                add_child(token, mass, mass_v);
                next.emplace_back(lo + start, lo + r);
            }
            out.row_ptr.push_back(static_cast<int64_t>(out.token_ids.size()));
        }
        level_first += static_cast<int64_t>(cur.size());
        std::swap(cur, next);
    }
    // The arrays are handed to numpy without a copy: drop the growth slack first.
    out.token_ids.shrink_to_fit();
    out.probs.shrink_to_fit();
    out.node_mass.shrink_to_fit();
    out.row_ptr.shrink_to_fit();
    return out;
}

std::vector<TrieArrays> build_tries(const SequenceBatch& batch, Span<int64_t> group_offsets,
                                    std::optional<int64_t> eos_id, int num_threads) {
    validate_batch(batch, group_offsets, eos_id);  // single-threaded: deterministic errors
    const int64_t num_groups = group_offsets.size - 1;
    std::vector<TrieArrays> tries(static_cast<size_t>(num_groups));

    // Dynamic scheduling: group sizes vary a lot (2 to 16384 sequences).
    std::atomic<int64_t> next_group{0};
    std::exception_ptr failure;  // only std::bad_alloc can get here after validation
    std::mutex failure_mutex;
    const auto worker = [&]() {
        try {
            for (int64_t g; (g = next_group.fetch_add(1)) < num_groups;) {
                tries[g] = build_trie_range(batch, group_offsets[g], group_offsets[g + 1], eos_id);
            }
        } catch (...) {
            const std::lock_guard<std::mutex> lock(failure_mutex);
            if (!failure) failure = std::current_exception();
            next_group.store(num_groups);
        }
    };
    const int64_t extra_threads = std::min<int64_t>(std::max(num_threads, 1), num_groups) - 1;
    std::vector<std::thread> threads;
    for (int64_t t = 0; t < extra_threads; ++t) threads.emplace_back(worker);
    worker();
    for (auto& thread : threads) thread.join();
    if (failure) std::rethrow_exception(failure);
    return tries;
}

}  // namespace calft
