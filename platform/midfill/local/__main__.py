"""Entry point of the local backend's background processes (started by `midfill apply`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m midfill.local")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("supervise-training", help="run and watch the attempts of a TrainingRun")
    tr.add_argument("--state-dir", type=Path, required=True)
    tr.add_argument("--name", required=True)
    mr = sub.add_parser("control-release", help="serve a ModelRelease on a local Ray and follow approvals")
    mr.add_argument("--state-dir", type=Path, required=True)
    mr.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    if args.command == "supervise-training":
        from midfill.local.training import supervise

        return supervise(args.state_dir, args.name)
    from midfill.local.serving import control

    return control(args.state_dir, args.name)


if __name__ == "__main__":
    sys.exit(main())
