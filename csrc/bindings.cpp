// pybind11 bindings of the trie builder: validate and convert numpy arrays, then call trie.h.
// Errors from the builder (calft::TrieInputError, a std::invalid_argument) become ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <thread>

#include "trie.h"

#define STRINGIFY(x) #x
#define MACRO_STRINGIFY(x) STRINGIFY(x)

namespace py = pybind11;

namespace {

// c_style without forcecast: safe casts only (int32 -> int64 is fine, float -> int64 is an error).
using Int64Array = py::array_t<int64_t, py::array::c_style>;
using Float64Array = py::array_t<double, py::array::c_style>;

template <typename T>
calft::Span<T> as_span(const py::array_t<T, py::array::c_style>& a, const char* name) {
    if (a.ndim() != 1) {
        throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(a.ndim()) + "-D");
    }
    return {a.data(), static_cast<int64_t>(a.shape(0))};
}

// Hands a vector's buffer to numpy without copying; the capsule owns (and frees) the vector.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
    auto owned = std::make_unique<std::vector<T>>(std::move(v));
    const auto size = static_cast<py::ssize_t>(owned->size());
    T* data = owned->data();
    py::capsule owner(owned.get(), [](void* p) { delete static_cast<std::vector<T>*>(p); });
    owned.release();
    return py::array_t<T>(size, data, owner);
}

py::dict to_dict(calft::TrieArrays&& t) {
    py::dict d;
    d["row_ptr"] = to_numpy(std::move(t.row_ptr));
    d["token_ids"] = to_numpy(std::move(t.token_ids));
    d["probs"] = to_numpy(std::move(t.probs));
    d["node_mass"] = to_numpy(std::move(t.node_mass));
    d["sequence_leaf"] = to_numpy(std::move(t.sequence_leaf));
    return d;
}

// Concatenates the tries (each array in group order, indices local to their trie) so that
// Python gets 6 arrays instead of 5 per trie. The copy runs without the GIL.
py::dict build_tries(const Int64Array& tokens, const Int64Array& seq_offsets, const Float64Array& probs,
                     const Int64Array& group_offsets, std::optional<int64_t> eos_id, int num_threads) {
    const calft::SequenceBatch batch{as_span(tokens, "tokens"), as_span(seq_offsets, "seq_offsets"),
                                     as_span(probs, "probs")};
    const auto groups = as_span(group_offsets, "group_offsets");
    if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    std::vector<calft::TrieArrays> tries;
    {
        py::gil_scoped_release release;
        tries = calft::build_tries(batch, groups, eos_id, num_threads);
    }
    py::ssize_t nodes = 0, leaves = 0;
    py::array_t<int64_t> num_nodes(static_cast<py::ssize_t>(tries.size()));
    for (size_t g = 0; g < tries.size(); ++g) {
        num_nodes.mutable_data()[g] = static_cast<int64_t>(tries[g].node_mass.size());
        nodes += num_nodes.mutable_data()[g];
        leaves += static_cast<py::ssize_t>(tries[g].sequence_leaf.size());
    }
    const auto num_groups = static_cast<py::ssize_t>(tries.size());
    py::array_t<int64_t> row_ptr(nodes + num_groups), token_ids(nodes - num_groups), leaf(leaves);
    py::array_t<double> edge_probs(nodes - num_groups), node_mass(nodes);
    int64_t *rp = row_ptr.mutable_data(), *tok = token_ids.mutable_data(), *sl = leaf.mutable_data();
    double *ep = edge_probs.mutable_data(), *nm = node_mass.mutable_data();
    {
        py::gil_scoped_release release;
        for (auto& t : tries) {
            rp = std::copy(t.row_ptr.begin(), t.row_ptr.end(), rp);
            tok = std::copy(t.token_ids.begin(), t.token_ids.end(), tok);
            ep = std::copy(t.probs.begin(), t.probs.end(), ep);
            nm = std::copy(t.node_mass.begin(), t.node_mass.end(), nm);
            sl = std::copy(t.sequence_leaf.begin(), t.sequence_leaf.end(), sl);
            t = calft::TrieArrays{};  // free as we go
        }
    }
    py::dict d;
    d["num_nodes"] = num_nodes;
    d["row_ptr"] = row_ptr;
    d["token_ids"] = token_ids;
    d["probs"] = edge_probs;
    d["node_mass"] = node_mass;
    d["sequence_leaf"] = leaf;
    return d;
}

// One trie over every sequence of `batch` (validated first), built without the GIL.
py::dict build_one(const calft::SequenceBatch& batch, std::optional<int64_t> eos_id) {
    const int64_t group_offsets[2] = {0, batch.weights.size};
    calft::TrieArrays trie;
    {
        py::gil_scoped_release release;
        calft::validate_batch(batch, {group_offsets, 2}, eos_id);
        trie = calft::build_trie_range(batch, 0, batch.weights.size, eos_id);
    }
    return to_dict(std::move(trie));
}

py::dict build_trie(const Int64Array& tokens, const Int64Array& seq_offsets, const Float64Array& probs,
                    std::optional<int64_t> eos_id) {
    const calft::SequenceBatch batch{as_span(tokens, "tokens"), as_span(seq_offsets, "seq_offsets"),
                                     as_span(probs, "probs")};
    return build_one(batch, eos_id);
}

// Flattens a Python sequence of token-id sequences (lists or tuples of ints) straight into the
// flat layout, with the C API's borrowed item arrays: no intermediate Python objects, where
// list(itertools.chain(...)) + np.array took ~70% of a list-input build. A non-integer token
// raises TypeError (an int beyond int64: OverflowError); calft.trie then reports it its own way.
void flatten_lists(py::handle sequences, std::vector<int64_t>& tokens, std::vector<int64_t>& offsets) {
    auto outer = py::reinterpret_steal<py::object>(
        PySequence_Fast(sequences.ptr(), "sequences must be a sequence of token-id sequences"));
    if (!outer) throw py::error_already_set();
    const Py_ssize_t num_seqs = PySequence_Fast_GET_SIZE(outer.ptr());
    PyObject** seqs = PySequence_Fast_ITEMS(outer.ptr());
    offsets.resize(static_cast<size_t>(num_seqs) + 1);
    offsets[0] = 0;
    tokens.reserve(static_cast<size_t>(num_seqs) * 10);
    for (Py_ssize_t i = 0; i < num_seqs; ++i) {
        auto inner = py::reinterpret_steal<py::object>(
            PySequence_Fast(seqs[i], "each sequence must be a sequence of token ids"));
        if (!inner) throw py::error_already_set();
        const Py_ssize_t len = PySequence_Fast_GET_SIZE(inner.ptr());
        PyObject** items = PySequence_Fast_ITEMS(inner.ptr());
        for (Py_ssize_t j = 0; j < len; ++j) {
            PyObject* t = items[j];
            if (PyFloat_Check(t)) throw py::type_error("token ids must be integers");
            // PyLong_AsLongLong accepts ints and anything with __index__ (bools, numpy integers)
            const long long v = PyLong_AsLongLong(t);
            if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
            tokens.push_back(static_cast<int64_t>(v));
        }
        offsets[static_cast<size_t>(i) + 1] = static_cast<int64_t>(tokens.size());
    }
}

py::dict build_trie_lists(py::handle sequences, const Float64Array& probs, std::optional<int64_t> eos_id) {
    std::vector<int64_t> tokens, offsets;
    flatten_lists(sequences, tokens, offsets);
    const calft::SequenceBatch batch{{tokens.data(), static_cast<int64_t>(tokens.size())},
                                     {offsets.data(), static_cast<int64_t>(offsets.size())},
                                     as_span(probs, "probs")};
    return build_one(batch, eos_id);
}

}  // namespace

PYBIND11_MODULE(_trie, m) {
    m.doc() = "calft C++ trie builder (see csrc/trie.h). Use calft.trie, not this module directly.";
    m.def("build_trie", &build_trie, py::arg("tokens"), py::arg("seq_offsets"), py::arg("probs"),
          py::arg("eos_id") = py::none(),
          "Build one prefix trie over weighted token sequences given as flat arrays.\n\n"
          "Sequence i is tokens[seq_offsets[i]:seq_offsets[i+1]] (int64) with weight probs[i]\n"
          "(float64, >= 0, normalized internally); eos_id, when given, is appended to each.\n"
          "Returns a dict of numpy arrays: row_ptr[N+1], token_ids[E], probs[E] (q(t|v) =\n"
          "mass(child)/mass(v)), node_mass[N], sequence_leaf[S]; nodes in BFS order, edge e\n"
          "leads to node e+1. Bad input raises ValueError naming the index.");
    m.def("build_trie_lists", &build_trie_lists, py::arg("sequences"), py::arg("probs"),
          py::arg("eos_id") = py::none(),
          "Build one prefix trie from a Python sequence of token-id lists (or tuples).\n\n"
          "Same result as build_trie on the flattened input; the lists are read in C++ (no\n"
          "intermediate arrays). A non-integer token raises TypeError, an int beyond int64\n"
          "OverflowError; the other checks are build_trie's (ValueError naming the index).");
    m.def("build_tries", &build_tries, py::arg("tokens"), py::arg("seq_offsets"), py::arg("probs"),
          py::arg("group_offsets"), py::arg("eos_id") = py::none(), py::arg("num_threads") = 0,
          "Build one trie per group g over sequences group_offsets[g]:group_offsets[g+1].\n\n"
          "Same input layout as build_trie. Returns one dict of the tries' arrays concatenated in\n"
          "group order (indices local to each trie) plus num_nodes[G]: trie g has num_nodes[g]+1\n"
          "row_ptr entries, num_nodes[g]-1 edges, and one sequence_leaf per sequence of group g.\n"
          "Validates everything first, then builds with the GIL released on num_threads\n"
          "std::threads (<= 0: one per hardware thread).");
#ifdef CALFT_VERSION_INFO
    m.attr("__version__") = MACRO_STRINGIFY(CALFT_VERSION_INFO);
#else
    m.attr("__version__") = "dev";
#endif
}
