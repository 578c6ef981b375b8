"""Fetch a model.init (or a composition parent) once per node, so that a cut-short download is never
taken for a finished one and a long one does not time out the other ranks.

Local rank 0 fetches into a scratch folder beside the destination, marks it complete and renames it
into place; before, it fetched into the destination itself and took any `config.json` there as
done, so a download cut short by a crash or a preempted pod (config.json comes first) was reused
half-written on the retry. The other local ranks wait for the marker on the node's filesystem, not
in a collective: an NCCL barrier gives up after the process group's 30-minute timeout, shorter than
a 7B model's download can take. If local rank 0 fails, torchrun stops the node's other workers.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from trainer.parallel import Dist

log = logging.getLogger(__name__)

COMPLETE = ".midfill-complete"


def is_complete(dst: Path) -> bool:
    return (dst / COMPLETE).is_file()


def fetch_once(dst: Path, fetch: Callable[[Path], None], d: Dist, *, source: str, poll_s: float = 2.0) -> Path:
    """`fetch(folder)` fills a fresh folder with the files of `source`; returns `dst` once complete."""
    if d.local_rank == 0 and not is_complete(dst):
        scratch = dst.with_name(f"{dst.name}.partial-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        log.info("fetching %s into %s", source, dst)
        fetch(scratch)  # creates the folder, as a copy into a new path does
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / COMPLETE).write_text(source + "\n")
        if not is_complete(dst):  # an incomplete one from an earlier attempt (a complete one is another job's)
            shutil.rmtree(dst, ignore_errors=True)
        try:
            scratch.rename(dst)
        except OSError:  # another job on this node fetched the same source at the same time
            if not is_complete(dst):
                raise
            shutil.rmtree(scratch, ignore_errors=True)
    waited = 0.0
    while not is_complete(dst):
        if waited % 60 < poll_s:
            log.info("waiting for local rank 0 to fetch %s (%.0f s)", source, waited)
        time.sleep(poll_s)
        waited += poll_s
    return dst
