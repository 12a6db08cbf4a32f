"""Optional dependencies of the paper suite: one import helper with a one-line error.

The paper suite's benchmarks need packages the core of calft does not (rouge-score for
NoveltyBench's partition, reasoning-gym for the retention items); they come with the `paper`
extra: pip install -e ".[paper]".
"""
from __future__ import annotations

import importlib

EXTRA = "paper"


class MissingDependency(ValueError):
    """An optional package is not installed (a ValueError: the CLIs print it as one line)."""


def require(module: str, package: str, needed_for: str):
    """Import `module` or raise MissingDependency naming the package and the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{needed_for} needs the package {package!r}, which is not installed: "
                                f"pip install {package} (or: pip install -e \".[{EXTRA}]\")") from None
