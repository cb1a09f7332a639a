"""House rule: no function in `src/vlmoe` is longer than 60 lines, counted from its `def` line
to its last line (docstring included, decorators not)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "vlmoe"
MAX_LINES = 60


def function_lengths(root: Path) -> list[tuple[str, int]]:
    """Every function and method under `root` as ("path.py::Qual.name", lines), in file order,
    the path relative to `root`'s parent. Nested functions are listed on their own and also
    count toward their enclosing function."""
    found: list[tuple[str, int]] = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        _walk(tree, path.relative_to(root.parent).as_posix() + "::", found)
    return found


def _walk(node: ast.AST, prefix: str, found: list[tuple[str, int]]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            found.append((prefix + child.name, child.end_lineno - child.lineno + 1))
            _walk(child, prefix + child.name + ".", found)
        elif isinstance(child, ast.ClassDef):
            _walk(child, prefix + child.name + ".", found)
        else:
            _walk(child, prefix, found)


def test_the_counter_counts_def_to_last_line(tmp_path: Path) -> None:
    # a hand-made package: the counter itself must be right before its verdict means anything
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (pkg / "m.py").write_text(
        "import functools\n\n"
        "@functools.cache\n"
        f'def long():\n    """doc."""\n{body}\n\n\n'
        "class C:\n    def short(self):\n        return 1\n"
    )
    assert function_lengths(pkg) == [("pkg/m.py::long", 63), ("pkg/m.py::C.short", 2)]


def test_no_function_in_src_is_longer_than_60_lines() -> None:
    lengths = function_lengths(SRC)
    assert len(lengths) > 100  # the walk really saw the package
    too_long = [f"{name}: {n} lines" for name, n in lengths if n > MAX_LINES]
    assert not too_long, f"{len(too_long)} functions over {MAX_LINES} lines:\n" + "\n".join(
        too_long
    )
