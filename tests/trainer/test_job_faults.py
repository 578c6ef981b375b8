"""Faults injected from outside the trainer: SIGKILL one rank of a real 2-process gloo torchrun gang.

No hook in the product: the test finds rank 1 among torchrun's children by its RANK environment
variable and kills it mid-step, the way a node loss or the OOM killer would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tiny_runs import tiny_run, write_run

from midfill.progress import read_progress, read_result
from midfill.registry import Registry

INTERVAL = 10


def torchrun(root: Path, run_file: Path, *, uid: str, attempt: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "MIDFILL_STATE_DIR": str(root / "state"),
        "MIDFILL_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "trainer",
        "--run-file",
        str(run_file),
        "--uid",
        uid,
        "--attempt",
        str(attempt),
    ]
    return subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def rank_process(gang: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(gang.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise LookupError(f"no process of rank {rank} under torchrun {gang.pid}")


def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(
        int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").exists()
    )


def kill_rank_at(gang: subprocess.Popen, run_dir: Path, *, rank: int, step: int, timeout_s: float = 240) -> int:
    """SIGKILL `rank` once progress reaches `step`; returns the step progress showed at the kill."""
    deadline = time.monotonic() + timeout_s
    while True:
        progress = read_progress(run_dir)
        if progress is not None and progress.step >= step:
            rank_process(gang, rank).send_signal(signal.SIGKILL)
            return progress.step
        assert gang.poll() is None, f"the gang ended before step {step}: {gang.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout_s}s"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_of_one_rank_fails_the_attempt_and_the_next_resumes_from_the_last_checkpoint(tmp_path):
    run_file = write_run(tmp_path / "run.yaml", tiny_run("gang", steps=40, logIntervalSteps=1, evalIntervalSteps=40))
    run_dir = tmp_path / "state" / "runs" / "gang"
    gang = torchrun(tmp_path, run_file, uid="uid-gang", attempt=1)
    try:
        at = kill_rank_at(gang, run_dir, rank=1, step=INTERVAL + 4)
        _, err = gang.communicate(timeout=180)
    finally:
        if gang.poll() is None:
            os.killpg(gang.pid, signal.SIGKILL)
            gang.wait()
    assert gang.returncode != 0, err[-2000:]  # the attempt fails as a whole
    kept = complete_checkpoints(run_dir)
    assert kept and kept[-1] >= INTERVAL and at - kept[-1] <= INTERVAL + 1, (
        at,
        kept,
    )  # at most one interval lost (+ the step in flight)
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert registry.versions("gang") == []

    retry = torchrun(tmp_path, run_file, uid="uid-gang", attempt=2)
    _, err = retry.communicate(timeout=600)
    assert retry.returncode == 0, err[-3000:]
    assert f"step-{kept[-1]:08d}" in err and "resumed from" in err
    assert read_progress(run_dir).step == 40
    assert [v.version for v in registry.versions("gang")] == ["1"]
    assert read_result(run_dir).version == "1"
