"""The rebuilt HumanEval-infilling suites: exact counts, known task ids, canonical answers pass."""

from __future__ import annotations

import pytest

from midfill.datasplit import stdlib_root
from midfill.evaluation.sandbox import Limits, run_program
from midfill.evaluation.suites import (
    body_lines,
    heldout_files,
    humaneval_multi_line,
    humaneval_single_line,
    line_em_tasks,
)


@pytest.fixture(scope="module")
def single():
    return humaneval_single_line()


@pytest.fixture(scope="module")
def multi():
    return humaneval_multi_line()


def test_counts_match_the_published_suites(single, multi) -> None:
    assert len(single) == 1033
    assert len(multi) == 5815
    assert len({t.task_id for t in single}) == 1033 and len({t.task_id for t in multi}) == 5815


def test_known_task_ids_and_positions(single, multi) -> None:
    by_id = {t.task_id: t for t in single}
    first = by_id["SingleLineInfilling/HumanEval/0/L0"]
    assert first.reference == "    for idx, elem in enumerate(numbers):\n"
    assert first.prefix.endswith('"""\n') and first.suffix.startswith("        for idx2, elem2")
    # HumanEval/0 has a blank line at index 6 of its solution: no task there, the next is L7.
    assert "SingleLineInfilling/HumanEval/0/L6" not in by_id
    assert by_id["SingleLineInfilling/HumanEval/0/L7"].reference == "    return False\n"
    for known in (
        "SingleLineInfilling/HumanEval/95/L17",
        "SingleLineInfilling/HumanEval/122/L0",
        "SingleLineInfilling/HumanEval/163/L0",
    ):
        assert known in by_id
    multi_ids = {t.task_id for t in multi}
    assert {"MultiLineInfilling/HumanEval/0/L0_L0", "MultiLineInfilling/HumanEval/0/L0_L7"} <= multi_ids


@pytest.mark.parametrize("index", [0, 100, 500, 1032])
def test_canonical_middle_passes_and_a_wrong_one_fails(single, index: int) -> None:
    task = single[index]
    limits = Limits(cpu_seconds=5, wall_seconds=10)
    assert run_program(task.prefix + task.reference + task.suffix + task.test, limits=limits).status == "passed"
    assert run_program(task.prefix + "    return None\n" + task.suffix + task.test, limits=limits).status != "passed"


def test_multi_line_canonical_passes(multi) -> None:
    task = next(t for t in multi if t.task_id == "MultiLineInfilling/HumanEval/0/L0_L7")
    assert task.prefix.endswith('"""\n') and task.suffix == ""
    assert run_program(task.prefix + task.reference + task.suffix + task.test).status == "passed"


def test_line_em_tasks_come_from_heldout_files() -> None:
    files = heldout_files(stdlib_root())
    assert 20 <= len(files) <= 60  # ~5% of the standard library
    tasks = line_em_tasks(files, limit=10)
    assert len(tasks) == 10 and tasks == line_em_tasks(files, limit=10)  # deterministic
    for task in tasks:
        indentation = task.prefix[task.prefix.rfind("\n") + 1 :]
        assert indentation and not indentation.strip(), task.task_id  # the cursor after the indentation
        assert task.suffix.startswith("\n") and "\n" not in task.reference and task.reference == task.reference.strip()


def test_line_em_holes_are_single_statements_inside_function_bodies() -> None:
    source = (
        "import os\n"
        "TOP_LEVEL_VALUE = 1\n"
        "class Box:\n"
        "    attribute = 'class body'\n"
        "    def method(self, x):\n"
        '        """A docstring line."""\n'
        "        total = x + 1\n"
        "        if total: return total  # one line, two statements\n"
        "        items = [\n"
        "            x,\n"
        "        ]\n"
        "        for item in items:\n"
        "            print(item, total)\n"
        "        x = 1; y = 2\n"
        "        return None\n"
        "        z = 3  # trailing comment\n"
        "def broken(:\n"
    )
    assert body_lines(source) == []  # does not parse
    lines = body_lines(source.rsplit("def broken", 1)[0])
    got = [source.split("\n")[i].strip() for i in lines]
    assert got == ["total = x + 1", "print(item, total)", "return None"]
