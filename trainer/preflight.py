"""What `--check` can see that validation cannot: whether the folders a run writes to are writable
from inside this container (a read-only or foreign-owned mount, a path under a file).

Only local paths are probed: an object store (s3://...) answers with errors that do not tell a
missing permission from a passing network fault, and a wrong guess here would fail a run for good.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from midfill.api import TrainingRun
from trainer.settings import RunPaths


def _local(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None if "://" in uri else Path(uri)


def _probe(folder: Path) -> str | None:
    """Why `folder` cannot be written (created if missing, then a file written and removed), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".midfill-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{exc.strerror or exc.__class__.__name__}"
    return None


def unwritable(run: TrainingRun, paths: RunPaths) -> str | None:
    """The first location the run cannot write, as a one-line reason naming the setting, or None."""
    checkpoint_field = (
        "spec.checkpoint.uri"
        if run.spec.checkpoint.uri
        else "the checkpoint folder (MIDFILL_CHECKPOINT_DIR: the operator's checkpoint claim, or the run folder)"
    )
    places = [
        (checkpoint_field, _local(paths.checkpoint_dir)),
        ("the run folder (MIDFILL_RUN_DIR, else MIDFILL_STATE_DIR/runs/<name>)", paths.run_dir),
        ("the export folder (MIDFILL_EXPORT_DIR, else <run folder>/export)", paths.export_dir),
    ]
    for field, folder in places:
        if folder is None:
            continue
        problem = _probe(folder)
        if problem is not None:
            return (
                f"{field}: {folder} is not writable here ({problem}); mount it read-write for the trainer's user "
                "(spec.podTemplate.securityContext fsGroup, or a writable volume) or point it elsewhere"
            )
    return None
