"""Build script: compiles csrc/ into calft._trie and installs kernels/ as calft.kernels."""
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
    packages=["calft", "calft.kernels"],
    package_dir={"calft": "calft", "calft.kernels": "kernels"},
    package_data={"calft": ["prompt_sets/*.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
