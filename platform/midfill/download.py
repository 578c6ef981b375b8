"""Download a registry version (or any folder) once, so that a cut-short download is never taken
for a finished one.

The files go into a scratch folder beside the destination, a completion marker is written last, and
only then is the scratch renamed into place. A crash, a preempted pod or a killed replica leaves a
scratch folder or an unmarked destination, both redone on the next call; a marked destination is
never deleted (another process on the machine may be reading it). Used by the trainer (`model.init`,
composition parents), serving (the model a replica loads) and the composition loader (parents).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMPLETE = ".midfill-complete"
WHERE = ".midfill-where"  # the export folder inside the download, relative (MLflow nests by source name)


def is_complete(dst: Path) -> bool:
    return (Path(dst) / COMPLETE).is_file()


def fetch_into(dst: Path, fetch: Callable[[Path], Any], *, source: str) -> Path:
    """`fetch(folder)` fills a fresh folder with the files of `source`; returns `dst` once complete."""
    dst = Path(dst)
    if is_complete(dst):
        return dst
    scratch = dst.with_name(f"{dst.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s into %s", source, dst)
    fetch(scratch)  # creates the folder, as a copy into a new path does
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / COMPLETE).write_text(source + "\n")
    if not is_complete(dst):  # an incomplete one from an earlier attempt (a complete one is another's)
        shutil.rmtree(dst, ignore_errors=True)
    try:
        scratch.rename(dst)
    except OSError:  # another process fetched the same source at the same time
        if not is_complete(dst):
            raise
        shutil.rmtree(scratch, ignore_errors=True)
    return dst


def fetch_version(registry: Any, info: Any, dst: Path) -> Path:
    """The export folder of registry version `info` (a midfill.registry.VersionInfo), downloaded once
    into `dst` by `registry.download`."""

    def download(folder: Path) -> None:
        local = Path(registry.download(info, folder))
        (folder / WHERE).write_text(str(local.relative_to(folder)) if local.is_relative_to(folder) else ".")

    fetch_into(Path(dst), download, source=info.uri)
    where = Path(dst) / WHERE
    return (Path(dst) / where.read_text().strip()).resolve() if where.is_file() else Path(dst)
