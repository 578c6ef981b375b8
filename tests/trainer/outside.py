"""Kill a trainer from outside, the way a preempted pod or the OOM killer does (no hook in the trainer)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from midfill.progress import read_progress


def progress_reached(run_dir: Path, step: int) -> Callable[[], bool]:
    """True once the progress file says `step` (written every log interval: pick a multiple of it)."""
    return lambda: (p := read_progress(run_dir)) is not None and p.step >= step


def start(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(
    proc: subprocess.Popen, ready: Callable[[], bool], *, timeout_s: float = 240
) -> subprocess.CompletedProcess:
    """SIGKILL `proc` as soon as `ready()`; returns it finished (stdout/stderr read)."""
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"the trainer ended before the kill point: {proc.communicate()[1][-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"kill point not reached in {timeout_s}s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
