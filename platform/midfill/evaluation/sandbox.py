"""Run untrusted generated code (a model's completion inside a test program) without letting it
hurt the evaluator.

Layers, each covering what the others might miss:
- a separate process per task, in its own session (the whole group is killed on timeout);
- rlimits: CPU seconds, address space, file size, process count, no core dumps;
- a throw-away working directory; as root, the child drops to an unprivileged uid (when that
  uid can read the Python installation);
- no network: a fresh network namespace when the kernel allows it (Linux, root), and in every
  case an audit hook that refuses sockets;
- a Python audit hook (PEP 578, cannot be removed) refusing process creation (fork, exec,
  subprocess, os.system), ctypes, and writes or deletions outside the working directory;
- stdout/stderr go to size-limited files, never to an unbounded pipe.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

NOBODY = 65534
Status = Literal["passed", "failed", "timeout"]


@dataclass(frozen=True)
class Limits:
    """Per-task resource limits."""

    cpu_seconds: int = 10
    wall_seconds: float = 15.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    max_processes: int = 64
    output_bytes: int = 4096  # of stdout/stderr kept in the outcome


@dataclass(frozen=True)
class Outcome:
    """What happened to one program."""

    status: Status
    exit_code: int | None
    detail: str
    seconds: float
    network_isolated: bool


# Runs inside the child before the untrusted program. Kept as source so the child needs nothing
# but the standard library (python -I -S: no site-packages, no PYTHON* variables).
_PRELUDE = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
work = os.path.realpath(cfg["work"])
for name, value in (("RLIMIT_CPU", cfg["cpu"]), ("RLIMIT_AS", cfg["mem"]), ("RLIMIT_FSIZE", cfg["fsize"]),
                    ("RLIMIT_NPROC", cfg["nproc"]), ("RLIMIT_CORE", 0)):
    if hasattr(resource, name):
        resource.setrlimit(getattr(resource, name), (value, value))
isolated = False
if sys.platform.startswith("linux") and os.geteuid() == 0:
    import ctypes
    CLONE_NEWNET = 0x40000000
    isolated = ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) == 0
    del sys.modules["ctypes"], ctypes
    if cfg["drop"]:
        os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
with open(os.path.join(work, ".network"), "w") as fh:
    fh.write("isolated" if isolated else "shared")
os.chdir(work)

def _inside(path):
    try:
        path = os.fsdecode(path) if not isinstance(path, int) else None
    except TypeError:
        return False
    if path is None:
        return True  # an already-open file descriptor
    real = os.path.realpath(os.path.join(work, path))
    return real == work or real.startswith(work + os.sep)

_BLOCKED = {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "subprocess.Popen",
            "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.__new__",
            "socket.connect", "socket.bind", "socket.getaddrinfo", "os.startfile", "pty.spawn", "sys.setprofile",
            "sys.settrace", "os.setuid", "resource.setrlimit", "resource.prlimit"}
_PATHS = {"os.remove": 1, "os.rename": 2, "os.rmdir": 1, "os.mkdir": 1, "os.symlink": 2, "os.link": 2,
          "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "shutil.rmtree": 1, "os.utime": 1, "os.chflags": 1}

def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0] in ("ctypes", "_ctypes"):
        raise PermissionError("sandbox: ctypes is not allowed")
    if event == "open":
        path, mode, flags = args
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT
        writing = (mode and any(c in mode for c in "wax+")) or (flags and flags & write_flags)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
    elif event in _PATHS:
        for path in args[: _PATHS[event]]:
            if not _inside(path):
                raise PermissionError(f"sandbox: {event} on {path!r} outside the working directory")

sys.addaudithook(_hook)
del _hook
source = open(os.path.join(work, "program.py")).read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""


def run_program(source: str, *, limits: Limits = Limits()) -> Outcome:
    """Run `source` (a whole program: prompt + completion + tests) in the sandbox.

    Passed means exit code 0 within the limits; anything else is failed or timeout, with the
    tail of stderr as detail. Never raises for anything the program does.
    """
    work = Path(tempfile.mkdtemp(prefix="midfill-sandbox-"))
    try:
        (work / "program.py").write_text(source)
        drop = os.geteuid() == 0 and _stdlib_readable_by_others()
        if drop:
            os.chown(work, NOBODY, NOBODY)
        cfg = {
            "work": str(work),
            "cpu": limits.cpu_seconds,
            "mem": limits.memory_bytes,
            "fsize": limits.file_bytes,
            "nproc": limits.max_processes,
            "uid": NOBODY,
            "drop": drop,
        }
        start = time.monotonic()
        with open(work.parent / f"{work.name}.out", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _PRELUDE, json.dumps(cfg)],
                cwd=work,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
            try:
                code: int | None = proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(proc)
        seconds = time.monotonic() - start
        output = _tail(work.parent / f"{work.name}.out", limits.output_bytes)
        isolated = (work / ".network").exists() and (work / ".network").read_text() == "isolated"
        if code is None or code == -signal.SIGXCPU or code == -signal.SIGKILL and seconds >= limits.cpu_seconds:
            return Outcome("timeout", code, output or "time limit exceeded", seconds, isolated)
        return Outcome("passed" if code == 0 else "failed", code, output, seconds, isolated)
    finally:
        (work.parent / f"{work.name}.out").unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _stdlib_readable_by_others() -> bool:
    """Dropping to `nobody` only works if that user can still import the standard library
    (a Python under /root, as with pyenv, is not readable by others: then the audit hook alone
    keeps writes inside the working directory)."""
    path = Path(os.__file__).resolve().parent
    for folder in (path, *path.parents):
        if not folder.stat().st_mode & 0o001:
            return False
    return bool(path.stat().st_mode & 0o004)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - limit))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
