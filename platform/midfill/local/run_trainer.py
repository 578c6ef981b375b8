"""torchrun's entry point for the trainer in local jobs: `-m midfill.local.run_trainer FILE [ARGS...]`.

It runs the `trainer` module as `python -m trainer --run FILE ARGS...` would (by module name, with
runpy; midfill never imports the trainer). It exists because torchrun parses the whole command
line, its script's arguments included, with abbreviations allowed: `--run` is an ambiguous prefix
of torchrun's own `--run-path`/`--run_path`, so `torchrun -m trainer --run FILE` stops with
"ambiguous option". The run file is passed positionally here instead.
"""

from __future__ import annotations

import runpy
import sys

TRAINER_MODULE = "trainer"


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m midfill.local.run_trainer RUN_FILE [--uid UID] [--attempt N]")
    sys.argv = [TRAINER_MODULE, "--run", sys.argv[1], *sys.argv[2:]]
    runpy.run_module(TRAINER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
