"""The package's shape: every calft module imports, no module-level import circle, no file over
~600 lines (one job per file, readable in one sitting)."""
import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "calft"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
SCRIPTS = {"train"}  # runs when imported (python -m calft.train): parsed, not imported


def module_imports(name: str) -> set[str]:
    """calft modules that `name` imports at module level (not inside functions)."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("calft.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "calft":
                found |= {a.name for a in node.names}
            elif node.module.startswith("calft."):
                found.add(node.module.split(".")[1])
    return found & set(MODULES)


@pytest.mark.parametrize("name", sorted(set(MODULES) - SCRIPTS))
def test_every_module_imports(name):
    importlib.import_module(f"calft.{name}")


def test_no_import_circle():
    graph = {m: module_imports(m) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for dep in sorted(graph[m]):
            visit(dep, path + [m])
        state[m] = 2

    for m in MODULES:
        visit(m, [])


def test_files_stay_readable_in_one_sitting():
    sizes = {m: len((PACKAGE / f"{m}.py").read_text().splitlines()) for m in MODULES}
    assert max(sizes.values()) <= 620, {m: n for m, n in sizes.items() if n > 620}
