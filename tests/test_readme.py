"""The README's library block runs as written (support -> trie -> targets -> fused loss)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_block_runs():
    text = README.read_text()
    section = text[text.index("## The library in ten lines"):text.index("## How it works")]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["loss"].item() > 0 and scope["hidden"].grad is not None
    assert abs(float(scope["q"].sum()) - 1) < 1e-9


def test_readme_points_inside_the_repository():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert not target.startswith(("http", "..")) and (README.parent / target).exists(), target
