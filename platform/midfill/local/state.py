"""The local backend's resource store: one JSON file per applied resource under the state dir.

It plays the API server's part on one machine: it keeps the applied spec, the uid (assigned at the
first apply and kept), a generation that moves only when the spec changes, the status (the same
TrainingRunStatus/ModelReleaseStatus the operator writes), an events-like history, and what the
local backend needs to find its processes again after the CLI exits.

Writes are atomic (temp file + rename) and read-modify-write goes through a per-resource file
lock, so the CLI and the background supervisors never see or leave half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from midfill.api import ModelRelease, Resource, TrainingRun, now_rfc3339, parse_resource
from midfill.api.modelrelease import ModelReleaseStatus
from midfill.api.trainingrun import TrainingRunStatus

KIND_FOLDERS = {"TrainingRun": "trainingruns", "ModelRelease": "modelreleases"}
MAX_EVENTS = 50  # an events-like history, not an audit log: keep the newest


class Event(BaseModel):
    """One line of history (what `describe` shows under Events)."""

    time: str
    type: Literal["Normal", "Warning"] = "Normal"
    reason: str
    message: str = ""


class LocalInfo(BaseModel):
    """Where the local backend's processes and files for a resource are."""

    supervisor_pid: int | None = None
    supervisor_create_time: float | None = Field(
        default=None, description="psutil create_time, guards against pid reuse."
    )
    child_pgids: list[int] = Field(default_factory=list, description="Process groups of the attempt's workers.")
    run_file: str | None = None
    log_file: str | None = None
    supervisor_log: str | None = None
    layout: str | None = Field(default=None, description="Local nodes x processes actually used, e.g. 1x2.")
    url: str | None = None
    api_keys_file: str | None = None
    stop_requested: bool = False


class StoredResource(BaseModel):
    """A resource as the store keeps it: the wire object plus local bookkeeping."""

    resource: dict[str, Any]
    local: LocalInfo = Field(default_factory=LocalInfo)
    events: list[Event] = Field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.resource["kind"]

    @property
    def name(self) -> str:
        return self.resource["metadata"]["name"]

    def typed(self) -> Resource:
        """The resource parsed into its pydantic type (status included)."""
        return parse_resource(self.resource)

    def status(self) -> TrainingRunStatus | ModelReleaseStatus:
        """The status (default when none was written yet)."""
        model = TrainingRunStatus if self.kind == "TrainingRun" else ModelReleaseStatus
        return model.model_validate(self.resource.get("status") or {})

    def set_status(self, status: TrainingRunStatus | ModelReleaseStatus) -> None:
        self.resource["status"] = status.to_wire()

    def add_event(self, reason: str, message: str = "", *, type: Literal["Normal", "Warning"] = "Normal") -> None:
        """Append to the history; a repeat of the last event is not added again."""
        last = self.events[-1] if self.events else None
        if last and (last.reason, last.message, last.type) == (reason, message, type):
            return
        self.events.append(Event(time=now_rfc3339(), type=type, reason=reason, message=message))
        del self.events[:-MAX_EVENTS]


class StateStore:
    """Persisted resources under `<state_dir>/resources/<kind>/<name>.json`."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir).resolve()

    # -- paths --------------------------------------------------------------------------------
    def folder(self, kind: str) -> Path:
        assert kind in KIND_FOLDERS, kind
        return self.state_dir / "resources" / KIND_FOLDERS[kind]

    def path(self, kind: str, name: str) -> Path:
        return self.folder(kind) / f"{name}.json"

    def run_folder(self, run_name: str) -> Path:
        """Where a TrainingRun's trainer writes progress.json/result.json (and checkpoints)."""
        return self.state_dir / "runs" / run_name

    def logs_folder(self) -> Path:
        return self.state_dir / "logs"

    # -- reading ------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> StoredResource | None:
        path = self.path(kind, name)
        try:
            return StoredResource.model_validate_json(path.read_text())
        except FileNotFoundError:
            return None

    def list(self, kind: str) -> list[StoredResource]:
        folder = self.folder(kind)
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob("*.json")):
            record = self.get(kind, path.stem)
            if record is not None:
                out.append(record)
        return out

    # -- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, kind: str, name: str) -> Iterator[None]:
        """An exclusive lock for read-modify-write of one resource (across processes)."""
        folder = self.folder(kind)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".{name}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write(self, record: StoredResource) -> None:
        path = self.path(record.kind, record.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(record.model_dump_json(indent=2))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def update(self, kind: str, name: str, change: Callable[[StoredResource], None]) -> StoredResource | None:
        """Apply `change` to the stored record under the lock; write only if something changed.

        Returns the new record, or None when the resource does not exist (e.g. deleted meanwhile).
        """
        with self.lock(kind, name):
            record = self.get(kind, name)
            if record is None:
                return None
            before = record.model_dump_json()
            change(record)
            if record.model_dump_json() != before:
                self._write(record)
            return record

    def apply(self, resource: Resource) -> tuple[StoredResource, str]:
        """Store a parsed resource as `kubectl apply` would.

        Returns (record, outcome) with outcome "created", "configured" (spec changed: generation
        +1) or "unchanged". The uid, creation time and status are kept across applies.
        """
        kind, name = resource.kind, resource.metadata.name
        wire = resource.to_wire()
        wire.pop("status", None)  # status is ours to write, never the user's
        with self.lock(kind, name):
            record = self.get(kind, name)
            if record is None:
                meta = wire["metadata"]
                meta["uid"] = str(uuid.uuid4())
                meta["generation"] = 1
                meta["creationTimestamp"] = now_rfc3339()
                record = StoredResource(resource=wire)
                record.add_event("Created", f"{kind} {name} applied (generation 1)")
                self._write(record)
                return record, "created"
            old = record.resource
            if old["spec"] == wire["spec"] and _user_meta(old) == _user_meta(wire):
                return record, "unchanged"
            meta = wire["metadata"]
            for key in ("uid", "creationTimestamp"):
                meta[key] = old["metadata"][key]
            spec_changed = old["spec"] != wire["spec"]
            meta["generation"] = old["metadata"]["generation"] + (1 if spec_changed else 0)
            if "status" in old:
                wire["status"] = old["status"]
            record.resource = wire
            if spec_changed:
                record.add_event("SpecChanged", f"spec updated (generation {meta['generation']})")
            self._write(record)
            return record, "configured"

    def delete(self, kind: str, name: str) -> bool:
        """Remove a resource's record (its processes must be stopped first). False if absent."""
        with self.lock(kind, name):
            try:
                self.path(kind, name).unlink()
            except FileNotFoundError:
                return False
        with contextlib.suppress(OSError):
            (self.folder(kind) / f".{name}.lock").unlink()
        return True


def _user_meta(wire: dict[str, Any]) -> dict[str, Any]:
    meta = wire["metadata"]
    return {k: meta.get(k) for k in ("labels", "annotations", "namespace")}


def typed_training_run(record: StoredResource) -> TrainingRun:
    res = record.typed()
    assert isinstance(res, TrainingRun)
    return res


def typed_model_release(record: StoredResource) -> ModelRelease:
    res = record.typed()
    assert isinstance(res, ModelRelease)
    return res


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False)
