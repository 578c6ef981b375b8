"""Training data: list the spec's sources, split train/validation by path hash, shard by rank,
and stream documents in a seeded, weighted, resumable order.

Sources are local paths, globs (``src/**/*.py``), fsspec URIs (``s3://bucket/code/*.py``) or
``stdlib://[subdir]`` = the Python standard library's own sources (site-packages and test folders
excluded), a real code corpus present on every machine.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec

from midfill.api.trainingrun import DataSource, DataSpec
from midfill.datasplit import STDLIB_SKIP_DIRS, is_validation  # one rule for trainer and evaluator

log = logging.getLogger(__name__)

STDLIB_SCHEME = "stdlib://"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class FileRef:
    """One input file."""

    source: int  # index in spec.data.sources
    kind: str  # code | text
    url: str  # what fsspec opens
    rel: str  # path relative to the source root (the split key)
    size: int
    identity: str = ""  # a remote store's content identity (ETag, generation, md5); "" for local files


def _stdlib_root(uri: str) -> str:
    sub = uri[len(STDLIB_SCHEME) :].strip("/")
    root = sysconfig.get_paths()["stdlib"]
    return f"{root}/{sub}" if sub else root


def list_source(index: int, src: DataSource, *, max_file_bytes: int) -> list[FileRef]:
    """Every file of one source that passes include/exclude and the size limit, sorted by path."""
    uri = src.uri
    is_stdlib = uri.startswith(STDLIB_SCHEME)
    target = _stdlib_root(uri) if is_stdlib else uri
    fs, path = fsspec.core.url_to_fs(target)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if any(c in path for c in _GLOB_CHARS):
        parts = PurePosixPath(path).parts
        root = str(PurePosixPath(*[p for p in _prefix(parts)])) if _prefix(parts) else ""
        found = fs.glob(path, detail=True)
    elif fs.isdir(path):
        root = path
        found = fs.find(path, detail=True)
    elif fs.isfile(path):
        root = str(PurePosixPath(path).parent)
        found = {path: fs.info(path)}
    else:
        raise ValueError(f"data.sources[{index}].uri: {uri} matches nothing; give an existing path, glob or URI")
    out = []
    for name, info in found.items():
        if info.get("type") not in (None, "file"):
            continue
        rel = name[len(root) :].lstrip("/") if root and name.startswith(root) else name
        if is_stdlib and STDLIB_SKIP_DIRS.intersection(PurePosixPath(rel).parts[:-1]):
            continue
        if src.include and not any(
            fnmatch.fnmatch(PurePosixPath(rel).name, g) or fnmatch.fnmatch(rel, g) for g in src.include
        ):
            continue
        if any(fnmatch.fnmatch(rel, g) for g in src.exclude):
            continue
        size = int(info.get("size") or 0)
        if size > max_file_bytes or size == 0:
            continue
        url = name if protocol in ("file", "local") else f"{protocol}://{name}"
        local = protocol in ("file", "local")
        out.append(
            FileRef(
                source=index,
                kind=src.kind,
                url=url,
                rel=rel,
                size=size,
                identity="" if local else remote_identity(info),
            )
        )
    out.sort(key=lambda f: f.rel)
    return out


# What object stores report about an object's content, most specific first: S3/Azure ETag, GCS
# generation and md5Hash, HTTP ETag. Size and mtime are the fallback when a store has none.
_IDENTITY_FIELDS = ("ETag", "etag", "generation", "md5Hash", "md5", "content_md5", "VersionId", "version_id")


def remote_identity(info: dict[str, Any]) -> str:
    """A remote file's content identity from its listing entry (no read of the data)."""
    found = [f"{k}={info[k]}" for k in _IDENTITY_FIELDS if info.get(k)]
    if not found:
        found = [f"mtime={info.get('mtime') or info.get('LastModified') or info.get('updated') or ''}"]
    return ";".join(found + [f"size={info.get('size')}"])


def file_digest(ref: FileRef) -> str:
    """sha256 of a local file's bytes (streamed), or the remote identity the listing gave."""
    if ref.identity:
        return ref.identity
    h = hashlib.sha256()
    with fsspec.open(ref.url, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _prefix(parts: tuple[str, ...]) -> list[str]:
    """The leading path parts before the first one with a glob character."""
    out = []
    for part in parts:
        if _GLOB_CHARS.intersection(part):
            break
        out.append(part)
    return out


@dataclass(frozen=True)
class Corpus:
    """The files of every source, split into train and validation."""

    train: list[list[FileRef]]  # per source
    validation: list[FileRef]
    weights: list[float]
    _hash: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_spec(cls, spec: DataSpec) -> Corpus:
        train, val = [], []
        for i, src in enumerate(spec.sources):
            files = list_source(i, src, max_file_bytes=spec.max_file_bytes)
            if not files:
                raise ValueError(
                    f"data.sources[{i}].uri: {src.uri} matched no files (check include/exclude and maxFileBytes)"
                )
            held = [f for f in files if is_validation(f.rel, spec.validation_fraction)]
            kept = [f for f in files if not is_validation(f.rel, spec.validation_fraction)]
            if not kept:
                raise ValueError(
                    f"data.validationFraction: every file of data.sources[{i}] was held out; lower it or add files"
                )
            train.append(kept)
            val.extend(held)
        return cls(train=train, validation=val, weights=[s.weight for s in spec.sources])

    def data_hash(self) -> str:
        """A short hash of what the model is trained and validated on: each file's source, relative
        path and content (local files: sha256 of their bytes; remote objects: the identity their store
        lists, so a large bucket is not re-read). Computed once per corpus."""
        if self._hash is None:
            h = hashlib.sha256()
            for f in sorted(
                [f for files in self.train for f in files] + self.validation, key=lambda f: (f.source, f.rel)
            ):
                h.update(f"{f.source}\0{f.rel}\0{file_digest(f)}\n".encode())
            object.__setattr__(self, "_hash", h.hexdigest()[:16])
        return self._hash


def read_text(ref: FileRef) -> str | None:
    """A file's text, or None for files that are not UTF-8 (binary data among the sources)."""
    try:
        with fsspec.open(ref.url, "rb") as fh:
            return fh.read().decode("utf-8")
    except UnicodeDecodeError:
        log.debug("skipping non-UTF-8 file %s", ref.url)
        return None


class DocumentStream:
    """An endless stream of (key, kind, text) for one rank, mixing sources by weight.

    Each source is read in epochs; each epoch shuffles its files with a seed derived from
    (seed, source, epoch) and gives this rank every world_size-th one, so ranks read disjoint
    files. The whole position is a few integers and an RNG state (`state_dict`), so a resumed
    job continues with the exact next document.
    """

    def __init__(
        self,
        sources: list[list[FileRef]],
        weights: list[float],
        *,
        seed: int,
        rank: int,
        world_size: int,
        epochs: int | None = None,
    ) -> None:
        assert len(sources) == len(weights) and sources
        self.sources, self.weights = sources, weights
        self.seed, self.rank, self.world_size, self.epochs = seed, rank, world_size, epochs
        self.rng = random.Random(f"{seed}-mix-{rank}")
        self.epoch = [0] * len(sources)
        self.index = [0] * len(sources)
        self._order_cache: dict[tuple[int, int], list[int]] = {}

    def _order(self, source: int, epoch: int) -> list[int]:
        key = (source, epoch)
        if key not in self._order_cache:
            n = len(self.sources[source])
            order = list(range(n))
            random.Random(f"{self.seed}-{source}-{epoch}").shuffle(order)
            mine = order[self.rank :: self.world_size] or [order[self.rank % n]]
            self._order_cache = {key: mine}  # one epoch of one source at a time is enough
        return self._order_cache[key]

    def _live(self) -> list[int]:
        return [s for s in range(len(self.sources)) if self.epochs is None or self.epoch[s] < self.epochs]

    def next(self) -> tuple[str, str, str] | None:
        """The next document, or None when a finite stream (epochs set) is exhausted."""
        while True:
            live = self._live()
            if not live:
                return None
            source = live[0] if len(live) == 1 else self.rng.choices(live, weights=[self.weights[s] for s in live])[0]
            order = self._order(source, self.epoch[source])
            ref = self.sources[source][order[self.index[source]]]
            self.index[source] += 1
            if self.index[source] >= len(order):
                self.epoch[source] += 1
                self.index[source] = 0
            text = read_text(ref)
            if text:
                return f"{ref.source}:{ref.rel}", ref.kind, text

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.getstate(),
            "epoch": list(self.epoch),
            "index": list(self.index),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size or len(state["epoch"]) != len(self.sources):
            raise ValueError("data position was saved with another world size or source list; cannot resume it exactly")
        self.rng.setstate(state["rng"])
        self.epoch, self.index = list(state["epoch"]), list(state["index"])
