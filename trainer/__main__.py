"""`python -m trainer --run FILE.yaml [--uid UID] [--attempt N] [--check]`, usually under torchrun:
`torchrun --nnodes N --nproc-per-node P ... -m trainer --run-file FILE.yaml --uid UID --attempt N`.

Exit codes: 0 done, 78 the config cannot run (one line on stderr naming the field), else a crash
(retryable: the next attempt resumes from the latest checkpoint). torchrun itself exits 1 when a
worker fails, whatever the worker's code; launchers that need the 78 run `--check` first (same
arguments, no torchrun): it validates the spec and lists the data for the planned world size.
"""

from __future__ import annotations

import argparse
import logging
import sys

from midfill.api import EXIT_CODE_INVALID_CONFIG, SpecError, TrainingRun, load_file
from trainer.launch import CONFIG_ERROR_ENV  # set by the launcher: where a worker says why the config cannot run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train a midfill TrainingRun.")
    # --run-file is the same option under a name torchrun's own parser leaves alone: torchrun
    # rejects `--run` after `-m trainer` as an ambiguous abbreviation of its --run-path.
    parser.add_argument("--run", "--run-file", dest="run", required=True, help="TrainingRun YAML file")
    parser.add_argument(
        "--uid", help="TrainingRun uid (default: env MIDFILL_RUN_UID, metadata.uid, or a hash of the name)"
    )
    parser.add_argument("--attempt", type=int, help="attempt number (default: env MIDFILL_ATTEMPT or 1)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config and list the data sources for the planned world size, then exit (0 or 78); "
        "run it before torchrun, which turns a worker's 78 into 1",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import os

    quiet = os.environ.get("RANK", "0") != "0"  # one log stream: rank 0's
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from pydantic import ValidationError

    from trainer.job import ConfigError, prepare, run_job
    from trainer.parallel import setup, teardown
    from trainer.settings import TrainerSettings

    try:
        docs = [r for r in load_file(args.run) if isinstance(r, TrainingRun)]
        if len(docs) != 1:
            raise SpecError([], source=f"{args.run}: expected exactly one TrainingRun, found {len(docs)}")
        overrides = {k: v for k, v in {"run_uid": args.uid, "attempt": args.attempt}.items() if v is not None}
        settings = TrainerSettings(**overrides)
    except (SpecError, ValidationError) as exc:
        return _config_error(_one_line(exc))
    d = setup()
    try:
        if args.check:
            prepare(docs[0], settings, d, check_only=True)
        else:
            run_job(docs[0], settings, d)
    except ConfigError as exc:
        return _config_error(str(exc))
    finally:
        teardown()
    return 0


def _config_error(reason: str) -> int:
    """Say why the config cannot run, and leave the reason where `trainer.launch` finds it: torchrun
    exits 1 whatever its worker's code, so the launcher turns torchrun's 1 back into 78 from this file."""
    import os

    line = f"invalid config: {reason}"
    print(line, file=sys.stderr)
    marker = os.environ.get(CONFIG_ERROR_ENV)
    if marker:
        try:
            with open(marker, "a") as fh:
                fh.write(line + "\n")
        except OSError as exc:
            print(f"could not write {CONFIG_ERROR_ENV}={marker}: {exc}", file=sys.stderr)
    return EXIT_CODE_INVALID_CONFIG


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
