"""The lifecycle scenario table (tests/midfill/lifecycle/scenarios.py) against the local backend, with
real parts: `midfill apply` starts the real supervisor (torchrun through torchx) or release controller
(a private Ray Serve), MLflow on SQLite. Faults come from outside: an attempt "crashes" because the
test kills its processes; a version is "broken" because what it registered is not a model."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from midfill.local.state import StateStore
from midfill.registry import Registry
from tests.midfill.lifecycle.scenarios import RELEASES, TRAINING, ReleaseScenario, TrainingScenario, condition, merge
from tests.midfill.local.waiting import wait_until

pytestmark = pytest.mark.slow  # real torchrun and Ray Serve processes on a small machine


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("sc", TRAINING, ids=[s.id for s in TRAINING])
def test_training_scenario(sc: TrainingScenario, cli, state_dir, tmp_path, tiny_run, write_yaml) -> None:
    doc = tiny_run("sc", steps=100_000)
    doc["spec"] = merge(doc["spec"], sc.spec)
    if sc.attempts[0] == "exit78":  # valid for the API, not for the recipe: the trainer exits 78
        doc["spec"]["model"]["architecture"].pop("maxPositionEmbeddings")
        doc["spec"]["training"].update(seqLength=1024, globalBatchTokens=4096)
    store = StateStore(state_dir)
    try:
        cli("apply", "-f", str(write_yaml(tmp_path / "run.yaml", doc)))
        killed: set[int] = set()
        while True:
            record = wait_until(lambda: store.get("TrainingRun", "sc"), timeout=5, what="the run")
            status = record.status()
            if status.phase in ("Succeeded", "Failed"):
                break
            attempt = status.attempt
            if (
                status.phase == "Running"
                and attempt not in killed
                and attempt <= len(sc.attempts)
                and sc.attempts[attempt - 1] == "crash"
                and record.local.child_pgids
            ):
                for pgid in record.local.child_pgids:  # the attempt's torchrun and workers die
                    _killpg(pgid)
                killed.add(attempt)
            time.sleep(0.5)
        record = wait_until(
            lambda: (r := store.get("TrainingRun", "sc")) and not _alive(r) and r,
            timeout=60,
            what="the supervisor to exit",
        )
        status = record.status()
        assert status.phase == sc.phase, status.message
        assert condition(status.to_wire(), sc.condition[0]) == sc.condition
        assert status.attempt == sc.started
        assert not [p for p in record.local.child_pgids if _group_alive(p)]  # nothing left running
    finally:
        cli("delete", "tr", "sc")


def _alive(record) -> bool:
    from midfill.local import procs

    return procs.alive(record.local.supervisor_pid, record.local.supervisor_create_time)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    from tests.serving.serving_exports import build_export

    return build_export(tmp_path_factory.mktemp("export") / "model", layers=1, hidden=32, heads=2, vocab_size=512)


def _release(spec: dict) -> dict:
    base = {
        "model": {"registeredModelName": "fim-debug", "alias": "champion"},
        "endpoint": {"resourcesPerReplica": {"requests": {"cpu": "1"}}},
        "serving": {"maxNewTokens": 8, "maxBatchSize": 2},
        "auth": {"disabled": True},
    }
    return {
        "apiVersion": "midfill.dev/v1alpha1",
        "kind": "ModelRelease",
        "metadata": {"name": "sc"},
        "spec": merge(base, spec),
    }


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sc", RELEASES, ids=[s.id for s in RELEASES])
def test_release_scenario(sc: ReleaseScenario, cli, state_dir, tmp_path, write_yaml, export_dir) -> None:
    registry = Registry(f"sqlite:///{(state_dir / 'mlflow.db')}")
    state_dir.mkdir(parents=True, exist_ok=True)
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "README").write_text("no weights here\n")
    for i, what in enumerate(sc.versions):
        registry.register(name="fim-debug", source=str(export_dir if what == "healthy" else broken), run_uid=f"run-{i}")
    store = StateStore(state_dir)

    def settled(version: str, generation: int = 1, phases: tuple[str, ...] = ("Available", "Degraded")):
        record = store.get("ModelRelease", "sc")
        status = record.status() if record else None
        rolling = status is not None and condition(status.to_wire(), "Progressing") == (
            "Progressing",
            "True",
            "RollingBack",
        )
        ok = (
            status is not None
            and status.resolved_version == version
            and status.observed_generation == generation
            and status.phase in phases
            and not rolling
        )
        return ok and status

    try:
        for n, version in enumerate(sc.approve):
            registry.approve("fim-debug", int(version))
            if n == 0:
                cli("apply", "-f", str(write_yaml(tmp_path / "rel.yaml", _release(sc.spec))))
            # A version before the last is the healthy one others roll back to: wait until it serves (a
            # slow first start on a busy machine may pass the deadline first, then recover).
            last = n == len(sc.approve) - 1
            wait_until(
                lambda version=version, last=last: settled(version, phases=(sc.phase,) if last else ("Available",)),
                timeout=240,
                what=f"version {version} settled",
            )
        generation = 1
        if sc.edit:
            cli("apply", "-f", str(write_yaml(tmp_path / "rel.yaml", _release(merge(sc.spec, sc.edit)))))
            generation = 2
            wait_until(lambda: settled(sc.serving, generation), timeout=240, what="the edited spec deployed")
            events = [e.reason for e in store.get("ModelRelease", "sc").events]
            assert events.count("Deploying") == 2  # the same version, deployed again for the edit
        status = store.get("ModelRelease", "sc").status()
        assert status.phase == sc.phase, status.message
        assert status.stable_version == sc.stable
        assert condition(status.to_wire(), sc.condition[0]) == sc.condition
        deploys = [e.message for e in store.get("ModelRelease", "sc").events if e.reason == "Deploying"]
        assert f"models:/fim-debug/{sc.serving} " in deploys[-1] + " "  # what was deployed last serves now
    finally:
        cli("delete", "mr", "sc")
