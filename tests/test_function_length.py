"""Product functions stay short enough to read in one screen: over MAX_LINES lines (signature,
docstring and body), a function says why in its docstring or a comment, with the words in REASON.
Split a long one into named steps instead where the steps are real (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ["platform/midfill", "operators", "serving", "trainer"]
MAX_LINES = 65
REASON = "Long only"


def long_functions(paths: list[Path]) -> list[str]:
    """`file:line name (N lines)` for every function over MAX_LINES lines that gives no reason."""
    found = []
    for path in paths:
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = node.end_lineno - node.lineno + 1
            text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            if length > MAX_LINES and REASON not in text:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_product_functions_are_short_or_say_why() -> None:
    paths = sorted(p for folder in PRODUCT for p in (ROOT / folder).rglob("*.py"))
    offenders = long_functions(paths)
    assert not offenders, f"over {MAX_LINES} lines without a reason ({REASON!r}):\n" + "\n".join(offenders)


def test_the_check_counts_whole_functions(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n")
    (tmp_path / "said.py").write_text(f"def said():\n    # {REASON} because it is a table.\n{body}\n")
    assert long_functions([tmp_path / "long.py", tmp_path / "said.py"]) == [f"long.py:1 long ({MAX_LINES + 1} lines)"]
