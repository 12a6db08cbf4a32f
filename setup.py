"""Build script: compiles csrc/ into calft._trie and installs kernels/ as calft.kernels.

kernels/ has no __init__.py on purpose: a regular package named `kernels` at the repository root
would shadow Hugging Face's `kernels` package (which transformers imports) whenever Python runs
from the root. In a checkout, calft/kernels is a symbolic link to ../kernels, so `calft.kernels`
imports there as a namespace package (editable installs too); a wheel copies the files in."""
import re
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent
# The version is defined once, in calft/__init__.py; the extension gets it as a macro.
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "calft" / "__init__.py").read_text()).group(1)

ext_modules = [
    Pybind11Extension(
        "calft._trie",
        ["csrc/trie.cpp", "csrc/bindings.cpp"],
        include_dirs=["csrc"],
        define_macros=[("CALFT_VERSION_INFO", VERSION)],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    version=VERSION,
    packages=["calft", "calft.kernels", "calft.prompt_sets", "calft.benchmark_data.noveltybench"],
    package_dir={"calft": "calft", "calft.kernels": "kernels"},
    package_data={"calft.prompt_sets": ["*.json"],
                  "calft.benchmark_data.noveltybench": ["curated.jsonl", "LICENSE", "SOURCE.md"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
