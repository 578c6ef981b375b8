"""`python -m trainer.launch TORCHRUN-ARGS...`: torchrun, with the trainer's exit 78 kept.

torchrun exits 1 when a worker fails, whatever the worker's exit code, so a config error found
inside the workers (after `--check` passed: a model that does not fit its attention, a tokenizer
another node cannot see) would look like a crash and be retried up to failurePolicy.maxRestarts.
This launcher gives the workers a file to write their "invalid config" line to
(MIDFILL_CONFIG_ERROR_FILE), runs torchrun as its child, and exits 78 when torchrun failed and a
worker wrote there. The line also goes to the container's termination message
(/dev/termination-log), which `kubectl describe pod` shows.

Signals (SIGTERM from the kubelet) are passed on to torchrun, which stops its workers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from midfill.api import EXIT_CODE_INVALID_CONFIG

CONFIG_ERROR_ENV = "MIDFILL_CONFIG_ERROR_FILE"  # the same name trainer.__main__ writes to
TERMINATION_LOG = Path("/dev/termination-log")


def torchrun_command(args: list[str]) -> list[str]:
    exe = shutil.which("torchrun")
    return [exe, *args] if exe else [sys.executable, "-m", "torch.distributed.run", *args]


def _termination_message(text: str) -> None:
    try:
        with TERMINATION_LOG.open("w") as fh:
            fh.write(text[-4000:])  # the kubelet keeps at most 4096 bytes
    except OSError:
        pass  # not in a container, or no termination log: the message is on stderr anyway


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="midfill-launch-") as tmp:
        marker = Path(os.environ.get(CONFIG_ERROR_ENV) or Path(tmp) / "config-error")
        marker.unlink(missing_ok=True)  # a leftover of an earlier run in the same folder is not ours
        child = subprocess.Popen(torchrun_command(args), env={**os.environ, CONFIG_ERROR_ENV: str(marker)})

        def forward(signum: int, frame: object) -> None:  # noqa: ARG001 - signal handler signature
            child.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        code = child.wait()
        reasons = marker.read_text().strip() if marker.exists() else ""
    if code != 0 and reasons:
        first = reasons.splitlines()[0]
        print(f"trainer.launch: a worker found an invalid config; exiting {EXIT_CODE_INVALID_CONFIG}: {first}")
        _termination_message(first)
        return EXIT_CODE_INVALID_CONFIG
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


if __name__ == "__main__":
    sys.exit(main())
