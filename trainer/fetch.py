"""Fetch a model.init (or a composition parent) once per node, so that a cut-short download is never
taken for a finished one and a long one does not time out the other ranks.

Local rank 0 fetches with `midfill.download.fetch_into` (scratch folder, completion marker, rename into
place), so a download cut short by a crash or a preempted pod is redone, never reused. The other local ranks
wait for the marker on the node's filesystem, not in a collective: an NCCL barrier gives up after the process
group's 30-minute timeout, shorter than a 7B model's download can take. If local rank 0 fails, torchrun stops
the node's other workers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from midfill.download import COMPLETE, fetch_into, is_complete
from trainer.parallel import Dist

log = logging.getLogger(__name__)
__all__ = ["COMPLETE", "fetch_once", "is_complete"]


def fetch_once(dst: Path, fetch: Callable[[Path], None], d: Dist, *, source: str, poll_s: float = 2.0) -> Path:
    """`fetch(folder)` fills a fresh folder with the files of `source`; returns `dst` once complete."""
    if d.local_rank == 0:
        fetch_into(dst, fetch, source=source)  # scratch-then-rename, shared with serving and composition
    waited = 0.0
    while not is_complete(dst):
        if waited % 60 < poll_s:
            log.info("waiting for local rank 0 to fetch %s (%.0f s)", source, waited)
        time.sleep(poll_s)
        waited += poll_s
    return dst
