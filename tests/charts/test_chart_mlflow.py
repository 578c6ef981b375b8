"""The chart's MLflow pod, run for real: the command, arguments and environment the chart renders
start the pinned `mlflow server` with SQLite, proxied artifacts on the volume, and a Host allowlist
that admits the in-cluster service name (what the operator and pods use) and nothing else; in front
of it the rendered `midfill mlflow-gate` (basic auth; only reviewers approve), with the Secrets'
values played by the test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chartutil import NAMESPACE, container_env, one

SERVICE_HOST = f"midfill-mlflow.{NAMESPACE}.svc:5000"
# What the Secrets mlflow.auth.{operator,trainer,reviewer}Secret hold in this test.
SECRETS = {
    "midfill-mlflow-operator": {"username": "operator", "password": "op-pw"},
    "midfill-mlflow-trainer": {"username": "trainer", "password": "tr-pw"},
    "midfill-mlflow-reviewer": {"username": "reviewer", "password": "rv-pw"},
}
TRAINER, REVIEWER = ("trainer", "tr-pw"), ("reviewer", "rv-pw")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(render: Any, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Start the rendered MLflow container's process with /mlflow mapped to tmp_path."""
    pod = one(render(), "Deployment", "midfill-mlflow")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    container = containers["mlflow"]
    data = tmp_path / "mlflow"
    data.mkdir()
    env = {k: v for k, v in container_env(container).items() if isinstance(v, str)}
    env = {k: v.replace("/mlflow/", f"{data}/", 1) for k, v in env.items()}  # the volume's mount path
    env["HOME"] = str(tmp_path)
    port = _free_port()
    args = []
    for arg in container["args"]:
        if arg.startswith("--host="):
            arg = "--host=127.0.0.1"
        elif arg.startswith("--port="):
            assert arg == "--port=5001"  # localhost only: the gate is the pod's port 5000
            arg = f"--port={port}"
        elif arg.startswith("--workers="):
            arg = "--workers=1"  # two shared cores
        args.append(arg)
    command = container["command"]
    assert command == ["mlflow", "server"]
    binary = Path(sys.executable).parent / "mlflow"
    log = (tmp_path / "mlflow.log").open("w")
    proc = subprocess.Popen(
        [str(binary), "server", *args],
        env={"PATH": os.environ["PATH"], **env},
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    gate = None
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not become healthy in 90 s"
            time.sleep(0.5)
        gate, base = _start_gate(containers["gate"], upstream_port=port, tmp_path=tmp_path)
        yield base, data
    finally:
        if gate is not None:
            gate.terminate()
            gate.wait(timeout=20)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _start_gate(container: dict[str, Any], *, upstream_port: int, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """The rendered gate container's process, with its Secrets' values from SECRETS."""
    assert container["command"] == ["midfill", "mlflow-gate"]
    env = {}
    for name, value in container_env(container).items():
        if isinstance(value, dict):
            ref = value["secretKeyRef"]
            value = SECRETS[ref["name"]][ref["key"]]
        env[name] = value
    port = _free_port()
    here = {
        "--upstream": f"--upstream=http://127.0.0.1:{upstream_port}",
        "--host": "--host=127.0.0.1",
        "--port": f"--port={port}",
    }
    assert "--upstream=http://127.0.0.1:5001" in container["args"]
    args = [here.get(arg.split("=")[0], arg) for arg in container["args"]]
    binary = Path(sys.executable).parent / "midfill"
    log = (tmp_path / "gate.log").open("w")
    proc = subprocess.Popen(
        [str(binary), "mlflow-gate", *args],
        env={"PATH": os.environ["PATH"], **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, (tmp_path / "gate.log").read_text()[-3000:]
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the gate did not become healthy in 60 s"
        time.sleep(0.3)


def test_rendered_mlflow_server_serves_the_cluster_and_refuses_other_hosts(server: tuple[str, Path]) -> None:
    base, data = server
    as_service = {"Host": SERVICE_HOST}
    # What the operator does first: registry calls by the service name.
    create = f"{base}/api/2.0/mlflow/registered-models/create"
    assert httpx.post(create, json={"name": "fim-7b"}, headers=as_service).status_code == 401  # no credentials
    created = httpx.post(create, json={"name": "fim-7b"}, headers=as_service, auth=TRAINER)
    assert created.status_code == 200, created.text
    got = httpx.get(f"{base}/api/2.0/mlflow/registered-models/get", params={"name": "fim-7b"}, headers=as_service)
    assert got.json()["registered_model"]["name"] == "fim-7b"
    # kubectl port-forward arrives as localhost:<port>.
    assert (
        httpx.get(f"{base}/api/2.0/mlflow/registered-models/search", headers={"Host": "localhost:5000"}).status_code
        == 200
    )
    # DNS-rebinding guard: any other Host is refused.
    refused = httpx.get(f"{base}/api/2.0/mlflow/registered-models/search", headers={"Host": "evil.example.com"})
    assert refused.status_code == 403
    # Artifacts are proxied by the server onto the volume (--serve-artifacts + MLFLOW_ARTIFACTS_DESTINATION).
    put = httpx.put(
        f"{base}/api/2.0/mlflow-artifacts/artifacts/1/abc/midfill.json", content=b"{}", headers=as_service, auth=TRAINER
    )
    assert put.status_code == 200, put.text
    assert (data / "artifacts" / "1" / "abc" / "midfill.json").read_bytes() == b"{}"
    # Only the reviewers' credentials may approve: the gate refuses the trainers' before MLflow sees it,
    # and lets the reviewers' through (MLflow then answers: there is no version 1 here).
    review = {"name": "fim-7b", "version": "1", "key": "review", "value": "approved"}
    set_tag = f"{base}/api/2.0/mlflow/model-versions/set-tag"
    assert httpx.post(set_tag, json=review, headers=as_service, auth=TRAINER).status_code == 403
    assert httpx.post(set_tag, json=review, headers=as_service, auth=REVIEWER).status_code not in (401, 403)
    alias = {"name": "fim-7b", "alias": "champion", "version": "1"}
    set_alias = f"{base}/api/2.0/mlflow/registered-models/alias"
    assert httpx.post(set_alias, json=alias, headers=as_service, auth=TRAINER).status_code == 403
    # Runs and the registry live in SQLite on the volume.
    assert (data / "mlflow.db").is_file()
