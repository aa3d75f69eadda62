"""The house rules of #17, checked on every run: no module over 600 lines, no function over 80.

A function may run longer only when the line right above its `def` (or its first decorator)
is a comment starting `# long:` that says why it can't be split. The limits are on source
lines as written, docstrings and comments included: that is what a reader has to read.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "omlx_actors"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
WAIVER = "# long:"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def long_modules() -> list[str]:
    return [f"{p.relative_to(PACKAGE.parent)}: {n} lines"
            for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]


def long_functions(source: str, name: str) -> list[str]:
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        length = node.end_lineno - node.lineno + 1
        waived = first >= 2 and lines[first - 2].strip().startswith(WAIVER)
        if length > MAX_FUNCTION_LINES and not waived:
            found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_is_over_600_lines():
    assert long_modules() == []


def test_no_function_is_over_80_lines_without_a_reason():
    found = [f for p in _modules()
             for f in long_functions(p.read_text(), str(p.relative_to(PACKAGE.parent)))]
    assert found == []


def test_the_function_rule_catches_a_long_function_and_honours_a_waiver():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    long_def = f"def grown():\n{body}"
    assert long_functions(long_def, "m") == [f"m:1 grown: {MAX_FUNCTION_LINES + 1} lines"]
    assert long_functions(f"# long: one table, read top to bottom\n{long_def}", "m") == []
    assert long_functions(f"def short():\n{body[: body.index(chr(10)) + 1]}", "m") == []
