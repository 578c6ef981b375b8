"""Which files are held out from training: one rule for the trainer (validation loss) and the
evaluator (line-em, left-to-right on held-out files), so evaluation never scores training data."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

# Validation membership: sha1(relative path) mod this < fraction * this.
SPLIT_BUCKETS = 10_000
# Folders of the stdlib tree that are not "the standard library's sources".
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
DEFAULT_VALIDATION_FRACTION = 0.05


def is_validation(rel: str, fraction: float) -> bool:
    """Whether a file is held out; a pure function of its relative path (same on every rank and run)."""
    bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % SPLIT_BUCKETS
    return bucket < round(fraction * SPLIT_BUCKETS)


def stdlib_root() -> Path:
    """The Python standard library sources: a real code corpus on every machine."""
    return Path(sysconfig.get_paths()["stdlib"])
