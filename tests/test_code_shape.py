"""The shape rules of the source tree: no function longer than 80 lines, no class longer than 300.

Argparse tables are the one exception: a function that only declares a command's options may be longer,
and is named here with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "pyrovm"
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 300
#: qualified names (module path:function) of argparse tables
ARGPARSE_TABLES: set[str] = {"cli.py:_add_run_arguments"}


def _too_long() -> list[str]:
    found: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()

        def walk(node: ast.AST, prefix: str, rel: str = rel) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    assert child.end_lineno is not None
                    lines = child.end_lineno - child.lineno + 1
                    name = f"{rel}:{prefix}{child.name}"
                    limit = MAX_CLASS_LINES if isinstance(child, ast.ClassDef) else MAX_FUNCTION_LINES
                    if lines > limit and name not in ARGPARSE_TABLES:
                        found.append(f"{name} is {lines} lines (limit {limit})")
                    walk(child, f"{prefix}{child.name}.")

        walk(ast.parse(path.read_text()), "")
    return found


def test_no_function_or_class_too_long() -> None:
    assert _too_long() == []


def test_the_checker_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"def f():\n{body}\n")
    fn = tree.body[0]
    assert fn.end_lineno is not None and fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
