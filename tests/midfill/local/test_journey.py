"""The local journey with real parts: torchrun via torchx, MLflow on SQLite, Ray Serve, the openai client.

Each test drives the real `midfill` command in subprocesses against a private state dir, so the
background supervisors, the state store and the registry are exercised as a user would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from midfill.local.state import StateStore
from midfill.progress import read_progress, read_result
from midfill.registry import TAG_RUN_UID, Registry

MIDFILL = str(Path(sys.executable).parent / "midfill")


def midfill(*args: str, env: dict[str, str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([MIDFILL, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"midfill {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def status_of(env: dict[str, str], kind: str, name: str) -> dict:
    return json.loads(midfill("get", kind, name, "-o", "json", env=env).stdout).get("status", {})


@pytest.fixture
def env(state_dir: Path) -> dict[str, str]:
    out = {**os.environ, "MIDFILL_STATE_DIR": str(state_dir)}
    out.pop("MIDFILL_TRACKING_URI", None)
    return out


@pytest.fixture
def cleanup(env):
    """Delete what a test applied even when it fails, so no supervisor or Ray outlives it."""
    applied: list[tuple[str, str]] = []
    yield applied
    for kind, name in reversed(applied):
        midfill("delete", kind, name, env=env, check=False, timeout=120)


def _release(name: str, model: str) -> dict:
    return {
        "apiVersion": "midfill.dev/v1alpha1",
        "kind": "ModelRelease",
        "metadata": {"name": name},
        "spec": {
            "model": {"registeredModelName": model, "alias": "champion"},
            "endpoint": {"resourcesPerReplica": {"requests": {"cpu": "1"}}},
            "serving": {"maxNewTokens": 16, "maxBatchSize": 4},
            "auth": {"apiKeySecretRef": {"name": f"{name}-keys"}},
        },
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_approve_release_infill_and_swap(tmp_path, env, cleanup, tiny_run, write_yaml, state_dir) -> None:
    # Train and register version 1 (the progress bar degrades to status lines without a terminal).
    run_file = write_yaml(tmp_path / "run.yaml", tiny_run("journey", steps=4))
    cleanup.append(("tr", "journey"))
    out = midfill("apply", "-f", str(run_file), "--wait", env=env).stdout
    assert "registered models:/journey/1" in out
    table = midfill("get", "tr", env=env).stdout
    assert "journey" in table and "Succeeded" in table and "4/4" in table

    # A release waits for approval and says so; approving serves it.
    rel_file = write_yaml(tmp_path / "rel.yaml", _release("journey", "journey"))
    cleanup.append(("mr", "journey"))
    out = midfill("apply", "-f", str(rel_file), "--wait", env=env, timeout=300).stdout
    assert "API key for journey" in out
    status = status_of(env, "mr", "journey")
    assert status["phase"] == "WaitingForApproval"
    assert "midfill approve journey --version" in status["message"]
    midfill("approve", "journey", "--version", "1", env=env)
    status = _wait_for(env, "journey", lambda s: s.get("phase") == "Available" and s.get("stableVersion") == "1")
    assert {c["type"]: c["status"] for c in status["conditions"]}["Approved"] == "True"

    # Real infill requests through the openai package (completions with `suffix`).
    from openai import OpenAI

    key = re.search(r"API key for journey.*: (mf-\S+)", out)[1]  # printed once; the file holds its digest only
    assert key not in (state_dir / "secrets" / "journey-keys" / "api-keys").read_text()
    client = OpenAI(base_url=status["url"] + "/v1", api_key=key, max_retries=0, timeout=120)
    completion = client.completions.create(
        model="journey", prompt="def add(a, b):\n    ", suffix="\n    return c\n", max_tokens=8, temperature=0
    )
    assert completion.choices[0].text == _reference_infill(
        state_dir, "models:/journey/1", "def add(a, b):\n    ", "\n    return c\n", 8
    )
    assert completion.usage is not None and completion.usage.completion_tokens >= 1
    assert _serving(status["url"]) == "models:/journey/1"

    # A second run registers version 2 of the same model; approving it swaps the model in place
    # while requests keep flowing, and none of them fails.
    second = tiny_run("journey-b", steps=4)
    second["spec"]["registry"]["registeredModelName"] = "journey"
    cleanup.append(("tr", "journey-b"))
    midfill("apply", "-f", str(write_yaml(tmp_path / "run-b.yaml", second)), "--wait", env=env)
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                client.completions.create(model="journey", prompt="x = ", suffix="\n", max_tokens=4)
                answered[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is a dropped request
                failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        midfill("approve", "journey", "--version", "2", env=env)
        status = _wait_for(env, "journey", lambda s: s.get("stableVersion") == "2" and s.get("phase") == "Available")
        time.sleep(3)  # requests keep going after the old replica is gone
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
    assert failures == []
    assert answered[0] > 0
    assert _serving(status["url"]) == "models:/journey/2"  # what answers now is version 2
    after = client.completions.create(model="journey", prompt="x = ", suffix="\n", max_tokens=6, temperature=0)
    assert after.choices[0].text == _reference_infill(state_dir, "models:/journey/2", "x = ", "\n", 6)
    assert status["previousStableVersion"] == "1"
    assert [v.version for v in Registry(f"sqlite:///{state_dir / 'mlflow.db'}").versions("journey")] == ["1", "2"]

    # Deleting the release stops its processes; the registry keeps both versions.
    record = StateStore(state_dir).get("ModelRelease", "journey")
    midfill("delete", "mr", "journey", env=env)
    assert not _alive(record.local.supervisor_pid)
    assert "No ModelRelease" in midfill("get", "mr", env=env).stdout


def _serving(url: str) -> str:
    """The model URI the endpoint's replica loaded, from its /health."""
    import httpx

    return httpx.get(f"{url}/health", timeout=30).json()["source"]


def _reference_infill(state_dir: Path, uri: str, prefix: str, suffix: str, max_tokens: int) -> str:
    """What that registered version says greedily, loaded here from the registry (not from the endpoint)."""
    from serving.engine import Engine, SamplingParams
    from serving.loading import locate_model
    from serving.settings import ServingSettings

    folder, _ = locate_model(
        uri, tracking_uri=f"sqlite:///{state_dir / 'mlflow.db'}", cache_dir=state_dir / "reference-cache"
    )
    engine = Engine.from_export(folder, dtype=ServingSettings().device_and_dtype()[1], max_batch_size=1)
    try:
        return engine.infill(prefix, suffix, SamplingParams(max_tokens=max_tokens)).text
    finally:
        engine.close()


def _wait_for(env, name: str, done, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = status_of(env, "mr", name)
        if done(status):
            return status
        time.sleep(1)
    raise AssertionError(f"modelrelease {name} did not get there: {status}")


def _alive(pid: int | None) -> bool:
    import psutil

    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killing_apply_during_training_resumes_from_checkpoint(
    tmp_path, env, cleanup, tiny_run, write_yaml, state_dir
) -> None:
    doc = tiny_run("resume", steps=120, logIntervalSteps=10)
    doc["spec"]["checkpoint"] = {"intervalSteps": 20, "keepLast": 2}
    run_file = write_yaml(tmp_path / "run.yaml", doc)
    cleanup.append(("tr", "resume"))
    apply = subprocess.Popen(
        [MIDFILL, "apply", "-f", str(run_file), "--wait"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    store = StateStore(state_dir)
    run_folder = store.run_folder("resume")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        prog = read_progress(run_folder)
        if prog is not None and (prog.checkpoint_step or 0) >= 20:
            break
        assert apply.poll() is None, apply.stdout.read() if apply.stdout else ""
        time.sleep(0.1)
    else:
        raise AssertionError("no checkpoint within the deadline")
    # Kill `midfill apply`, the training supervisor behind it and its torchrun workers, hard, as a
    # crash or a power cut would.
    record = store.get("TrainingRun", "resume")
    uid = record.resource["metadata"]["uid"]
    apply.kill()
    os.kill(record.local.supervisor_pid, signal.SIGKILL)
    for pgid in record.local.child_pgids:
        os.killpg(pgid, signal.SIGKILL)
    apply.wait()
    killed_at = read_progress(run_folder).checkpoint_step
    assert killed_at is not None and 20 <= killed_at < 120
    assert read_result(run_folder) is None  # it had not finished
    status = status_of(env, "tr", "resume")
    assert status["phase"] == "Failed" and "resume from the last checkpoint" in status["message"]

    out = midfill("apply", "-f", str(run_file), "--wait", env=env, timeout=300).stdout
    assert "attempt 2 starting, resuming from the last checkpoint" in out
    status = status_of(env, "tr", "resume")
    assert status["phase"] == "Succeeded" and status["attempt"] == 2
    assert status["registeredModel"]["version"] == "1"
    attempt2 = midfill("logs", "resume", env=env).stdout.split("/a2/", 1)[1]
    assert "resumed from" in attempt2
    resumed_step = int(attempt2.split("resumed from", 1)[1].split("(step ", 1)[1].split(")", 1)[0])
    assert resumed_step >= killed_at > 0  # it went on from a checkpoint, not from step 0
    # One version for the run, whatever was retried.
    versions = Registry(f"sqlite:///{state_dir / 'mlflow.db'}").versions("resume")
    assert [(v.version, v.tags[TAG_RUN_UID]) for v in versions] == [("1", uid)]
    # Applying again is a no-op for a finished run.
    assert "already succeeded" in midfill("apply", "-f", str(run_file), env=env).stdout
