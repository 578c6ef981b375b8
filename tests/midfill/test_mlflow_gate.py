"""`midfill mlflow-gate` in front of a real `mlflow server`: each role's credentials through the
MLflow client, as the operator, the trainer and a reviewer use it. Only a reviewer may approve."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.exceptions import MlflowException

from midfill.registry import Registry

USERS = {"operator": ("op", "op-secret"), "trainer": ("tr", "tr-secret"), "reviewer": ("rv", "rv-secret")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} never became healthy: {log.read_text()[-3000:]}")


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[str]:
    """mlflow server on a localhost port, the gate in front of it; yields the gate's URL."""
    bin_dir = Path(sys.executable).parent
    mlflow_port, gate_port = _free_port(), _free_port()
    procs = []
    try:
        log = tmp_path / "mlflow.log"
        procs.append(
            subprocess.Popen(
                [
                    str(bin_dir / "mlflow"),
                    "server",
                    "--host=127.0.0.1",
                    f"--port={mlflow_port}",
                    "--workers=1",
                    f"--backend-store-uri=sqlite:///{tmp_path / 'mlflow.db'}",
                    "--serve-artifacts",
                    f"--artifacts-destination={tmp_path / 'artifacts'}",
                ],
                cwd=tmp_path,
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
            )
        )
        _wait_healthy(f"http://127.0.0.1:{mlflow_port}/health", procs[0], log)
        env = {**os.environ}
        for role, (user, password) in USERS.items():
            env[f"MIDFILL_GATE_{role.upper()}_USERNAME"], env[f"MIDFILL_GATE_{role.upper()}_PASSWORD"] = user, password
        gate_log = tmp_path / "gate.log"
        procs.append(
            subprocess.Popen(
                [
                    str(bin_dir / "midfill"),
                    "mlflow-gate",
                    f"--upstream=http://127.0.0.1:{mlflow_port}",
                    "--host=127.0.0.1",
                    f"--port={gate_port}",
                ],
                env=env,
                stdout=gate_log.open("w"),
                stderr=subprocess.STDOUT,
            )
        )
        _wait_healthy(f"http://127.0.0.1:{gate_port}/health", procs[1], gate_log)
        yield f"http://127.0.0.1:{gate_port}"
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def as_role(monkeypatch: pytest.MonkeyPatch, url: str, role: str | None) -> Registry:
    """A registry client carrying a role's credentials (MLflow reads them from the environment)."""
    if role is None:
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USERS[role][0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USERS[role][1])
    return Registry(url)


@pytest.mark.slow
def test_only_reviewers_approve_and_each_role_does_its_part(gate, monkeypatch, tmp_path):
    trainer = as_role(monkeypatch, gate, "trainer")
    exp = trainer.experiment_id("midfill")
    run_id = trainer.client.create_run(exp, tags={"midfill.training_run_uid": "u1"}).info.run_id
    trainer.client.log_metric(run_id, "loss", 2.5, step=1)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "midfill.json").write_text("{}")
    trainer.client.log_artifacts(run_id, str(tmp_path / "model"), "model")  # the upload goes through the gate
    source = trainer.client.get_run(run_id).info.artifact_uri + "/model"
    version, _ = trainer.register(name="fim", source=source, run_uid="u1", run_id=run_id)
    trainer.client.set_model_version_tag("fim", version.version, "eval.line-em", "0.4")  # eval results: allowed
    with pytest.raises(MlflowException, match="only reviewers may approve"):
        trainer.approve("fim", version.version)
    with pytest.raises(MlflowException, match="only reviewers may approve"):
        trainer.client.set_registered_model_alias("fim", "champion", version.version)
    with pytest.raises(MlflowException, match="only reviewers"):
        trainer.client.create_model_version("fim", source=source, run_id=run_id, tags={"review": "approved"})
    assert "review" not in trainer.get("fim", version=version.version).tags

    operator = as_role(monkeypatch, gate, "operator")
    assert operator.run_progress("u1", experiment_name="midfill").mlflow_run_id == run_id
    with pytest.raises(MlflowException, match="may only read and end runs"):
        operator.client.create_run(exp)
    assert operator.end_run(run_id, "FAILED")  # an attempt that is over
    with pytest.raises(MlflowException, match="only read and end runs"):
        operator.approve("fim", version.version)

    anonymous = as_role(monkeypatch, gate, None)
    assert anonymous.get("fim", version=version.version).version == version.version  # serving pods read
    with pytest.raises(MlflowException):
        anonymous.client.create_experiment("nope")
    wrong = httpx.post(f"{gate}/api/2.0/mlflow/experiments/create", json={"name": "x"}, auth=("tr", "wrong"))
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"].startswith("Basic")

    reviewer = as_role(monkeypatch, gate, "reviewer")
    approved = reviewer.approve("fim", version.version, reviewer="alice")
    assert approved.tags["review"] == "approved" and "champion" in approved.aliases
