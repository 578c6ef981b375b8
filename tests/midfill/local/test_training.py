"""The local TrainingRun backend: layout capping, the torchx job it submits, and (slow) a real run."""

from __future__ import annotations

from pathlib import Path

from midfill.api import TrainingRun, parse_resource
from midfill.local.state import StateStore
from midfill.local.training import build_app_def, local_layout, trainer_env
from midfill.settings import CoreSettings


def _run(tiny_run, nodes: int, procs: int) -> TrainingRun:
    doc = tiny_run("cap")
    doc["spec"]["parallelism"] = {"numNodes": nodes, "nprocPerNode": procs}
    run = parse_resource(doc)
    assert isinstance(run, TrainingRun)
    return run


def test_processes_are_capped_to_the_local_cpus_with_a_message(tiny_run) -> None:
    assert local_layout(_run(tiny_run, 1, 2), cpus=2) == (2, None)
    nproc, message = local_layout(_run(tiny_run, 2, 4), cpus=2)
    assert nproc == 2
    assert message is not None and "2x4 = 8 processes" in message and "1x2" in message and "2 CPUs" in message
    # Several nodes fit on one machine as one node with all the processes.
    assert local_layout(_run(tiny_run, 2, 1), cpus=4)[0] == 2


def test_torchx_job_runs_the_trainer_module_with_uid_and_attempt(tmp_path: Path, tiny_run) -> None:
    run = _run(tiny_run, 1, 2)
    store = StateStore(tmp_path)
    env = trainer_env(store, CoreSettings(state_dir=tmp_path), nproc=2, cpus=2)
    assert env["MIDFILL_STATE_DIR"] == str(tmp_path.resolve())
    assert env["MIDFILL_TRACKING_URI"].startswith("sqlite:///") and env["MIDFILL_TRACKING_URI"].endswith("mlflow.db")
    assert env["OMP_NUM_THREADS"] == "1"
    app = build_app_def(run=run, run_file=tmp_path / "run.yaml", uid="u-1", attempt=3, nproc=2, env=env)
    [role] = app.roles
    command = role.args[-1]
    assert "torchrun" in command and "--nproc_per_node 2" in command
    # --run-file: torchrun rejects `--run` in its script's arguments (ambiguous with its --run-path).
    assert f"-m trainer --run-file {tmp_path / 'run.yaml'} --uid u-1 --attempt 3" in command
    assert role.env["MIDFILL_STATE_DIR"] == str(tmp_path.resolve())
    assert app.name == "cap-a3"
    assert role.max_retries == 0  # restarts are new attempts, counted in the status


def test_a_config_the_trainer_cannot_run_fails_at_once_with_its_reason(
    cli, state_dir, tmp_path, tiny_run, write_yaml
) -> None:
    """Valid for the API but not for the recipe: the trainer's --check (exit 78) fails the run, no retries."""
    doc = tiny_run("nope")
    doc["spec"]["model"]["architecture"].pop("maxPositionEmbeddings")  # the debug recipe's context is 512
    doc["spec"]["training"].update(seqLength=1024, globalBatchTokens=4096)
    result = cli("apply", "-f", str(write_yaml(tmp_path / "nope.yaml", doc)), "--wait", "--timeout", "120")
    assert result.exit_code == 1
    status = StateStore(state_dir).get("TrainingRun", "nope").status()
    assert status.phase == "Failed" and status.attempt == 1 and status.restart_count == 0
    assert "seqLength" in (status.message or "") and "not retried" in (status.message or "")
    assert [c.reason for c in status.conditions if c.type == "Failed"] == ["NonRetryableExitCode"]
