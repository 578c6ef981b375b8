"""Sharded, atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout under the checkpoint root (a local/shared path or an fsspec URI):

    step-00000100/            model + optimizer + scheduler (DCP shards, one file per rank)
        rank-00000.pt         that rank's data position and RNG states
        COMPLETE              written last; a folder without it is torn and never loaded
    .tmp-step-00000200/       being written (or left behind by a crash; removed on the next save)
    tokenizer/                the run's tokenizer (see settings.RunPaths)

Writing goes to the temp folder, which is renamed into place and only then marked COMPLETE, so a
crash at any moment leaves either a complete checkpoint or one that `latest()` skips. Only the
newest `keep_last` complete checkpoints are kept.

`trainable_only` (composed models) saves and restores only the parameters that train, with their
optimizer state: the frozen parents are stored once, by reference, in the export, never per step.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from midfill.api import now_rfc3339
from trainer.parallel import Dist

log = logging.getLogger(__name__)
# A plain `python -m trainer` (world size 1) saves without a process group, which DCP supports.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    uri: str


class CheckpointManager:
    """Save and find checkpoints of one run; `save` and `load` are collective (all ranks call them)."""

    def __init__(self, root: str, *, keep_last: int, d: Dist, trainable_only: bool = False) -> None:
        self.root = root.rstrip("/")
        self.keep_last, self.d = keep_last, d
        # strict=False on load only lets the frozen parameters be absent; DCP still fails on any
        # trainable tensor the checkpoint lacks, since it loads exactly the keys of the template.
        self.options = StateDictOptions(ignore_frozen_params=True, strict=False) if trainable_only else None
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _p(self, name: str) -> str:
        return f"{self.path}/{name}"

    def complete(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first; torn and temporary folders are ignored."""
        if not self.fs.exists(self.path):
            return []
        out = []
        for entry in self.fs.ls(self.path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            m = _STEP_DIR.match(name)
            if not m:
                continue
            if self.fs.exists(self._p(f"{name}/{MARKER}")):
                out.append(CheckpointInfo(step=int(m.group(1)), uri=self._uri(name)))
            else:
                log.warning("skipping torn checkpoint %s (no %s marker)", self._uri(name), MARKER)
        return sorted(out, key=lambda c: c.step)

    def latest(self) -> CheckpointInfo | None:
        found = self.complete()
        return found[-1] if found else None

    def resolve(self, resume: str) -> CheckpointInfo | None:
        """What spec.checkpoint.resume asks for: latest, none, or a specific checkpoint URI."""
        if resume == "none":
            return None
        if resume == "latest":
            return self.latest()
        fs, path = fsspec.core.url_to_fs(resume)
        m = _STEP_DIR.match(path.rstrip("/").rsplit("/", 1)[-1])
        if not m or not fs.exists(f"{path.rstrip('/')}/{MARKER}"):
            raise ValueError(
                f"checkpoint.resume: {resume} is not a complete checkpoint (a step-NNNNNNNN folder with {MARKER})"
            )
        return CheckpointInfo(step=int(m.group(1)), uri=resume.rstrip("/"))

    # -- save / load ---------------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
        rank_state: dict[str, Any],
    ) -> CheckpointInfo:
        name = f"step-{step:08d}"
        tmp = f".tmp-{name}"
        if self.d.is_main:
            for leftover in (tmp, name):  # from a crash mid-save, or a torn folder of an earlier attempt
                if self.fs.exists(self._p(leftover)):
                    self.fs.rm(self._p(leftover), recursive=True)
            self.fs.makedirs(self._p(tmp), exist_ok=True)
        self.d.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        dcp.save({"model": model_sd, "optim": optim_sd, "extra": extra}, storage_writer=self._writer(tmp))
        with self.fs.open(self._p(f"{tmp}/rank-{self.d.rank:05d}.pt"), "wb") as fh:
            buf = io.BytesIO()
            torch.save(rank_state, buf)
            fh.write(buf.getvalue())
        self.d.barrier()
        if self.d.is_main:
            self.fs.mv(self._p(tmp), self._p(name), recursive=True)
            with self.fs.open(self._p(f"{name}/{MARKER}"), "w") as fh:
                fh.write(json.dumps({"step": step, "time": now_rfc3339(), "world_size": self.d.world_size}))
            self._prune()
        self.d.barrier()
        return CheckpointInfo(step=step, uri=self._uri(name))

    def load(
        self, info: CheckpointInfo, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restore model and optimizer in place; `extra` is a template of the saved extra (DCP loads
        exactly the keys asked for). Returns (extra, this rank's state or None if absent)."""
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        state = {"model": model_sd, "optim": optim_sd, "extra": extra}
        fs, path = fsspec.core.url_to_fs(info.uri)
        dcp.load(state, storage_reader=self._reader(info.uri))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=self.options
        )
        rank_file = f"{path}/rank-{self.d.rank:05d}.pt"
        rank_state = None
        if fs.exists(rank_file):
            with fs.open(rank_file, "rb") as fh:
                rank_state = torch.load(io.BytesIO(fh.read()), weights_only=False)
        return state["extra"], rank_state

    def _writer(self, name: str):
        if self.local:
            return dcp.FileSystemWriter(self._p(name))
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(self._uri(name))

    def _reader(self, uri: str):
        if self.local:
            return dcp.FileSystemReader(fsspec.core.url_to_fs(uri)[1])
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(uri)

    def _prune(self) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep_last)]:
            self.fs.rm(fsspec.core.url_to_fs(old.uri)[1], recursive=True)
        for entry in self.fs.ls(self.path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(".tmp-step-"):
                self.fs.rm(entry, recursive=True)
