"""Fetch a model.init (or a composition parent) once per node, so that a cut-short download is never
taken for a finished one and a long one does not time out the other ranks.

Local rank 0 fetches with `midfill.download.fetch_into` (scratch folder, completion marker, rename into
place), so a download cut short by a crash or a preempted pod is redone, never reused. The other local ranks
wait for the marker on the node's filesystem, not in a collective: an NCCL barrier gives up after the process
group's 30-minute timeout, shorter than a 7B model's download can take. If local rank 0 fails, torchrun stops
the node's other workers."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from midfill.download import COMPLETE, fetch_into, is_complete
from midfill.registry import Registry
from trainer.parallel import Dist
from trainer.settings import TrainerSettings

log = logging.getLogger(__name__)
__all__ = ["COMPLETE", "fetch_init", "fetch_once", "is_complete"]


def fetch_once(dst: Path, fetch: Callable[[Path], object], d: Dist, *, source: str, poll_s: float = 2.0) -> Path:
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


def fetch_init(init: str, settings: TrainerSettings, d: Dist, *, field: str = "model.init") -> Path | None:
    """The local folder of a model.init (or a composition parent, `field` naming it): None for
    scratch; a registry version or an fsspec URI fetched once per node; a local export as it is."""
    if init == "scratch":
        return None
    if init.startswith("models:/"):
        registry = Registry(settings.resolved_tracking_uri())
        info = registry.resolve_uri(init)
        dst = Path(tempfile.gettempdir()) / f"midfill-init-{info.name}-{info.version}"
        fetch_once(dst, lambda folder: registry.download(info, folder), d, source=init)
        found = next(dst.rglob("config.json"), None)
        if found is None:
            raise ValueError(f"{field}: {init} has no config.json; it is not a Hugging Face export")
        return found.parent
    if "://" in init and not init.startswith("file://"):
        import fsspec

        dst = Path(tempfile.gettempdir()) / ("midfill-init-" + init.replace("/", "_").replace(":", "_"))
        fs, root = fsspec.core.url_to_fs(init)
        return fetch_once(
            dst, lambda folder: fs.get(root.rstrip("/") + "/", str(folder), recursive=True), d, source=init
        )
    path = Path(init.removeprefix("file://"))
    if not (path / "config.json").is_file():
        raise ValueError(f"{field}: {init} is not an exported model folder (no config.json)")
    return path
