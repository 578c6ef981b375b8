"""Background processes of the local backend: start detached, check, stop — by pid, never by name.

A supervisor (one per TrainingRun or ModelRelease) runs in its own session so that it outlives the
`midfill` command that started it, as a Kubernetes Job outlives `kubectl apply`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def spawn_detached(
    args: list[str], *, log_file: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, float]:
    """Start `args` in a new session with stdout/stderr appended to log_file; (pid, create_time)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    return proc.pid, _create_time(proc.pid) or time.time()


def python_module_args(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this interpreter (the project's venv)."""
    return [sys.executable, "-m", module, *args]


def spawn_backend(
    command: str, *, name: str, state_dir: Path, tracking_uri: str, log_file: Path, cwd: Path | None = None
) -> tuple[int, float]:
    """Start a local backend process, `python -m midfill.local COMMAND --state-dir DIR --name NAME`,
    detached, with the state dir and MLflow tracking URI in its environment; (pid, create_time)."""
    return spawn_detached(
        python_module_args("midfill.local", command, "--state-dir", str(state_dir), "--name", name),
        log_file=log_file,
        env={**os.environ, "MIDFILL_STATE_DIR": str(state_dir), "MIDFILL_TRACKING_URI": tracking_uri},
        cwd=cwd,
    )


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int | None, create_time: float | None = None) -> bool:
    """True if `pid` runs and is the process we started (same create time, not a zombie)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def group_alive(pgid: int) -> bool:
    """True if any process of process group `pgid` is still running."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # killpg also succeeds while only zombies are left (not yet reaped): look closer.
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
    return False


def stop(pid: int | None, create_time: float | None, *, pgids: list[int] = (), timeout: float = 20.0) -> None:
    """SIGTERM the process (its group) and the listed process groups; SIGKILL what is left after `timeout`."""
    targets: list[int] = []
    # Helpers that made process groups of their own (Ray's workers do) stay in the supervisor's
    # session: remember them now, and end any that outlive the supervisor.
    session = session_members(pid) if alive(pid, create_time) else []
    if alive(pid, create_time):
        assert pid is not None
        with contextlib.suppress(OSError):
            # The supervisor is its own session leader: its group holds it and its helpers.
            targets.append(os.getpgid(pid) if os.getpgid(pid) == pid else -pid)
    targets += [g for g in pgids if group_alive(g)]
    for target in targets:
        _signal(target, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_target_alive(t) for t in targets):
        time.sleep(0.2)
    for target in targets:
        if _target_alive(target):
            _signal(target, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p, t) for p, t in session):
        time.sleep(0.2)
    for member, ctime in session:
        if alive(member, ctime):
            _signal(-member, signal.SIGKILL)


def session_members(sid: int | None) -> list[tuple[int, float]]:
    """(pid, create_time) of the processes in session `sid` (a supervisor started by spawn_detached)."""
    out = []
    for proc in psutil.process_iter(["create_time"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid != sid and os.getsid(proc.pid) == sid:
                out.append((proc.pid, proc.info["create_time"]))
    return out


def _signal(target: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if target < 0:
            os.kill(-target, sig)  # a single process (not a group leader)
        else:
            os.killpg(target, sig)


def _target_alive(target: int) -> bool:
    return alive(-target) if target < 0 else group_alive(target)
