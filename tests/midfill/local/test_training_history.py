"""The local backend, issue 22: truthful progress across a restart, the attempt history, the MLflow
runs of over attempts ended (FAILED when it died, KILLED when suspended), and `--check` refusing an
unwritable checkpoint folder. Real supervisor, torchrun and MLflow on SQLite; the crash is a kill
from outside."""

from __future__ import annotations

import time

import pytest

from midfill.local.state import StateStore
from midfill.registry import Registry
from midfill.settings import CoreSettings
from tests.midfill.local.test_scenarios import _alive, _killpg
from tests.midfill.local.waiting import wait_until


def _runs(state_dir, uid: str) -> dict[int, object]:
    """attempt -> MLflow run of this TrainingRun."""
    client = Registry(CoreSettings(state_dir=state_dir).resolved_tracking_uri()).client
    exp = client.get_experiment_by_name("midfill")
    runs = client.search_runs([exp.experiment_id], f"tags.`midfill.training_run_uid` = '{uid}'") if exp else []
    return {int(r.data.tags["midfill.attempt"]): r for r in runs}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_restart_keeps_progress_and_history_and_ends_the_mlflow_runs(cli, state_dir, tmp_path, tiny_run, write_yaml):
    doc = tiny_run("hist", steps=100_000)
    doc["spec"]["failurePolicy"] = {"maxRestarts": 2}
    path = write_yaml(tmp_path / "run.yaml", doc)
    store = StateStore(state_dir)
    try:
        cli("apply", "-f", str(path))
        record = wait_until(
            lambda: (
                (r := store.get("TrainingRun", "hist")).status().last_checkpoint is not None
                and r.status().phase == "Running"
                and r.local.child_pgids
                and r
            ),
            timeout=240,
            what="attempt 1 running with a checkpoint",
        )
        uid = record.resource["metadata"]["uid"]
        for pgid in record.local.child_pgids:  # attempt 1 dies hard: its trainer cannot end its MLflow run
            _killpg(pgid)
        # Until attempt 2 reports, and after, the step never falls below the checkpoint it resumes from.
        floor, lowest = None, None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            st = store.get("TrainingRun", "hist").status()
            if st.attempt == 2 and floor is None:
                floor = st.last_checkpoint.step
            if floor is not None and st.progress is not None:
                lowest = min(lowest if lowest is not None else st.progress.step, st.progress.step)
            if st.attempt == 2 and st.phase == "Running" and st.progress and st.progress.step > floor + 2:
                break
            time.sleep(0.3)
        assert floor is not None and lowest is not None and lowest >= floor, (floor, lowest)
        runs = wait_until(
            lambda: (r := _runs(state_dir, uid)).get(1) and r[1].info.status == "FAILED" and r,
            timeout=30,
            what="attempt 1's MLflow run ended FAILED",
        )
        st = store.get("TrainingRun", "hist").status()
        first = st.attempts[0]
        assert (first.attempt, first.job_name, first.outcome) == (1, "hist-a1", "Failed")
        assert first.mlflow_run_id == runs[1].info.run_id
        assert (state_dir / "logs" / "trainingruns" / "hist" / "a1").is_dir()  # its logs stay
        # Suspending stops attempt 2: its run is ended KILLED, not left RUNNING.
        doc["spec"]["suspend"] = True
        cli("apply", "-f", str(write_yaml(path, doc)))
        wait_until(lambda: store.get("TrainingRun", "hist").status().phase == "Suspended", timeout=60, what="Suspended")
        wait_until(lambda: _runs(state_dir, uid)[2].info.status == "KILLED", timeout=60, what="attempt 2's run KILLED")
        wait_until(lambda: not _alive(store.get("TrainingRun", "hist")), timeout=60, what="the supervisor to exit")
    finally:
        cli("delete", "tr", "hist")


def test_an_unwritable_checkpoint_folder_fails_at_once_naming_the_field(cli, state_dir, tmp_path, tiny_run, write_yaml):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    doc = tiny_run("ro")
    doc["spec"]["checkpoint"]["uri"] = str(blocker / "checkpoints")
    result = cli("apply", "-f", str(write_yaml(tmp_path / "ro.yaml", doc)), "--wait", "--timeout", "120")
    assert result.exit_code == 1
    status = StateStore(state_dir).get("TrainingRun", "ro").status()
    assert status.phase == "Failed" and status.restart_count == 0
    assert [c.reason for c in status.conditions if c.type == "Failed"] == ["NonRetryableExitCode"]
    assert "spec.checkpoint.uri" in (status.message or "") and "not writable" in (status.message or "")
