"""The sandbox contains hostile completions: the evaluator survives and records the failure."""

from __future__ import annotations

import os
from pathlib import Path

from midfill.evaluation.sandbox import Limits, run_program

FAST = Limits(cpu_seconds=2, wall_seconds=5, memory_bytes=512 << 20, file_bytes=1 << 20)


def test_a_correct_program_passes_and_a_wrong_one_fails() -> None:
    assert run_program("assert sum([1, 2]) == 3\n", limits=FAST).status == "passed"
    failed = run_program("assert sum([1, 2]) == 4\n", limits=FAST)
    assert failed.status == "failed" and "AssertionError" in failed.detail


def test_infinite_loop_is_stopped_by_the_cpu_limit() -> None:
    assert run_program("while True:\n    pass\n", limits=FAST).status == "timeout"


def test_sleeping_forever_is_stopped_by_the_wall_clock() -> None:
    out = run_program("import time\ntime.sleep(60)\n", limits=Limits(cpu_seconds=2, wall_seconds=1.5))
    assert out.status == "timeout" and out.seconds < 10


def test_fork_bomb_is_refused() -> None:
    out = run_program("import os\nwhile True:\n    os.fork()\n", limits=FAST)
    assert out.status == "failed" and "os.fork is not allowed" in out.detail
    out = run_program("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])\n", limits=FAST)
    assert out.status == "failed" and "not allowed" in out.detail


def test_huge_allocation_fails_inside_the_child() -> None:
    out = run_program("x = bytearray(8 << 30)\n", limits=FAST)
    assert out.status == "failed" and "MemoryError" in out.detail


def test_writing_outside_the_working_directory_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    program = (
        f"import os, shutil\n"
        f"for attempt in (lambda: open({str(victim)!r}, 'w').write('x'), lambda: os.remove({str(victim)!r}),\n"
        f"                lambda: shutil.rmtree({str(tmp_path)!r}), lambda: os.rename({str(victim)!r}, 'stolen')):\n"
        f"    try:\n        attempt()\n    except PermissionError as exc:\n        print('refused', exc)\n"
        f"open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n"
    )
    out = run_program(program, limits=FAST)
    assert out.status == "passed", out.detail
    assert out.detail.count("refused") == 4 and out.detail.endswith("fine")
    assert victim.read_text() == "keep me"


def test_big_files_and_output_floods_are_capped() -> None:
    out = run_program("open('big', 'wb').write(b'x' * (8 << 20))\n", limits=FAST)
    assert out.status == "failed" and "File too large" in out.detail
    out = run_program("import sys\nfor _ in range(10**6):\n    sys.stdout.write('y' * 100)\n", limits=FAST)
    assert len(out.detail) <= FAST.output_bytes


def test_no_network() -> None:
    out = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n", limits=FAST)
    assert out.status == "failed" and "not allowed" in out.detail
    if os.geteuid() == 0 and os.uname().sysname == "Linux":
        assert out.network_isolated  # a fresh network namespace as well, where the kernel allows
