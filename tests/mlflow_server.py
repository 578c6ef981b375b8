"""A real `mlflow server` for tests and bench runs: SQLite behind it, artifacts proxied over HTTP
(`--serve-artifacts`), as a cluster runs it. Faults come from outside: `kill()` takes it down
(SIGKILL, like a lost pod), `start()` brings it back on the same port and store.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    def __init__(self, work: Path, *, port: int | None = None) -> None:
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.work / "mlflow-server.log"

    def start(self, *, timeout: float = 180) -> MlflowServer:
        cmd = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.work / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            (self.work / "artifacts").resolve().as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with open(self.log, "a") as log:
            # Its own session: kill() reaches the server and its workers, nothing else.
            self.proc = subprocess.Popen(
                cmd, cwd=self.work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"mlflow server did not start; last lines:\n{self.log.read_text()[-2000:]}")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.uri}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.kill()
