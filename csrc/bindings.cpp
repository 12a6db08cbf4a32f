#include <pybind11/pybind11.h>
#define STRINGIFY(x) #x
#define MACRO_STRINGIFY(x) STRINGIFY(x)
PYBIND11_MODULE(_trie, m) {
#ifdef CALFT_VERSION_INFO
    m.attr("__version__") = MACRO_STRINGIFY(CALFT_VERSION_INFO);
#endif
}
