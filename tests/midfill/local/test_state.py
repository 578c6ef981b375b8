"""The persisted resource store: uid/generation like an API server, atomic writes, status shape."""

from __future__ import annotations

import json
from pathlib import Path

from midfill.api import ModelRelease, TrainingRun, parse_resource, set_condition
from midfill.api.trainingrun import TrainingRunStatus
from midfill.local.state import MAX_EVENTS, StateStore


def _run(tiny_run, **training) -> TrainingRun:
    res = parse_resource(tiny_run("tiny", **training))
    assert isinstance(res, TrainingRun)
    return res


def test_apply_assigns_uid_once_and_counts_generations(tmp_path: Path, tiny_run) -> None:
    store = StateStore(tmp_path)
    record, outcome = store.apply(_run(tiny_run))
    assert outcome == "created"
    uid = record.resource["metadata"]["uid"]
    assert record.resource["metadata"]["generation"] == 1
    again, outcome = store.apply(_run(tiny_run))
    assert outcome == "unchanged"
    assert again.resource["metadata"]["uid"] == uid
    changed, outcome = store.apply(_run(tiny_run, steps=9))
    assert outcome == "configured"
    assert changed.resource["metadata"] == {**changed.resource["metadata"], "uid": uid, "generation": 2}
    assert [e.reason for e in changed.events] == ["Created", "SpecChanged"]


def test_state_survives_a_new_store_instance(tmp_path: Path, tiny_run) -> None:
    """What a CLI restart sees: a fresh StateStore on the same folder reads the same resources."""
    first = StateStore(tmp_path)
    first.apply(_run(tiny_run))

    def running(rec) -> None:
        status = rec.status()
        status.phase = "Running"
        status.attempt = 1
        status.conditions = set_condition(status.conditions, type="Running", status="True", reason="AttemptRunning")
        rec.set_status(status)

    first.update("TrainingRun", "tiny", running)
    second = StateStore(tmp_path)
    [record] = second.list("TrainingRun")
    status = record.status()
    assert isinstance(status, TrainingRunStatus)
    assert (status.phase, status.attempt) == ("Running", 1)
    assert status.conditions[0].type == "Running" and status.conditions[0].last_transition_time
    # The stored object is a valid TrainingRun with the operator's status shape (camelCase wire form).
    typed = record.typed()
    assert isinstance(typed, TrainingRun) and typed.status is not None and typed.status.phase == "Running"
    assert "lastTransitionTime" in json.dumps(record.resource["status"])


def test_reapply_keeps_status(tmp_path: Path, tiny_run) -> None:
    store = StateStore(tmp_path)
    store.apply(_run(tiny_run))
    store.update("TrainingRun", "tiny", lambda rec: rec.set_status(TrainingRunStatus(phase="Succeeded")))
    record, outcome = store.apply(_run(tiny_run, steps=5))
    assert outcome == "configured"
    assert record.status().phase == "Succeeded"


def test_update_writes_only_on_change_and_atomically(tmp_path: Path, tiny_run) -> None:
    store = StateStore(tmp_path)
    store.apply(_run(tiny_run))
    path = store.path("TrainingRun", "tiny")
    before = path.stat().st_mtime_ns
    store.update("TrainingRun", "tiny", lambda rec: None)
    assert path.stat().st_mtime_ns == before
    # No temp files are left behind.
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".tiny.lock")) == ["tiny.json"]
    assert store.update("TrainingRun", "missing", lambda rec: None) is None


def test_events_are_bounded_and_not_repeated(tmp_path: Path, tiny_run) -> None:
    store = StateStore(tmp_path)
    store.apply(_run(tiny_run))

    def many(rec) -> None:
        for i in range(MAX_EVENTS + 10):
            rec.add_event("Tick", str(i))
            rec.add_event("Tick", str(i))  # a repeat of the last event is dropped

    record = store.update("TrainingRun", "tiny", many)
    assert len(record.events) == MAX_EVENTS
    assert record.events[-1].message == str(MAX_EVENTS + 9)


def test_kinds_are_kept_apart_and_delete(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    release = parse_resource(
        {
            "apiVersion": "midfill.dev/v1alpha1",
            "kind": "ModelRelease",
            "metadata": {"name": "tiny"},
            "spec": {"model": {"registeredModelName": "tiny"}, "auth": {"disabled": True}},
        }
    )
    assert isinstance(release, ModelRelease)
    store.apply(release)
    assert store.list("TrainingRun") == []
    assert [r.name for r in store.list("ModelRelease")] == ["tiny"]
    assert store.delete("ModelRelease", "tiny") is True
    assert store.delete("ModelRelease", "tiny") is False
    assert store.get("ModelRelease", "tiny") is None
