"""MLflow down while a ModelRelease resolves its version: the shared lifecycle (what the operator and
the local backend run) against a real `mlflow server`, taken down from outside (SIGKILL) and brought
back. The status says it waits for the registry (condition reason RegistryUnavailable, naming the
server) instead of "not found"; nothing fails, the serving version keeps serving, and the next pass
after the server is back resolves and rolls out as usual."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from midfill.api import load_file
from midfill.api.modelrelease import ModelReleaseStatus
from midfill.lifecycle.modelrelease import Deploy, DeploymentView, Observed, Plan, reconcile, resolve
from midfill.registry import Registry
from tests.mlflow_server import MlflowServer

SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "modelrelease.yaml"
NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _one_http_try(monkeypatch):
    # MLflow's HTTP client would retry a refused connection for minutes on its own; the operator's
    # registry tries once per pass (retry_seconds=0) and its timer asks again.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _release():
    (rel,) = load_file(SAMPLE)
    rel.metadata.namespace = "team"
    return rel


def _served(version: str) -> DeploymentView:
    return DeploymentView(
        version=version, rollout_start=NOW, healthy=True, health="RUNNING", url="http://endpoint", served=version
    )


def _pass(registry: Registry, status: ModelReleaseStatus, deployment: DeploymentView | None) -> Plan:
    """One operator pass: resolve in the real registry, then the pure reconcile."""
    observed = Observed(now=NOW, resolution=resolve(registry, _release()), deployment=deployment)
    return reconcile(_release(), status=status, observed=observed, generation=1)


def _resolved(plan: Plan) -> tuple[str, str, str]:
    cond = next(c for c in plan.status.conditions if c.type == "ModelResolved")
    return cond.status, cond.reason, cond.message


def test_mlflow_down_during_resolution_is_waited_for_not_failed(server):
    registry = Registry(server.uri, retry_seconds=0)
    name = _release().spec.model.registered_model_name
    registry.register(name=name, source="s3://bucket/v1", run_uid="uid-1")
    registry.approve(name, 1)
    registered = _pass(registry, ModelReleaseStatus(), _served("1"))
    assert (registered.status.phase, registered.status.stable_version) == ("Available", "1")

    server.kill()
    # A release that serves: it keeps serving version 1 and says what it waits for.
    down = _pass(registry, registered.status, _served("1"))
    status, reason, message = _resolved(down)
    assert (status, reason) == ("Unknown", "RegistryUnavailable"), message
    assert f"MLflow at {server.uri}" in message and "alias 'champion'" in message
    assert down.actions == [] and down.status.phase == "Available"
    assert "waiting for the model registry" in down.status.message
    assert down.status.resolved_version == "1"  # what it knew is kept, not cleared
    # A new release: Pending (retried on the next pass), never Failed, saying why.
    fresh = _pass(registry, ModelReleaseStatus(), None)
    assert fresh.actions == [] and fresh.status.phase == "Pending"
    assert _resolved(fresh)[1] == "RegistryUnavailable" and server.uri in fresh.status.message

    server.start()
    registry.register(name=name, source="s3://bucket/v2", run_uid="uid-2")
    registry.approve(name, 2)
    back = _pass(registry, down.status, _served("1"))
    assert _resolved(back)[:2] == ("True", "Resolved")
    assert back.actions == [Deploy("2")]
    assert "waiting for the model registry" not in back.status.message
    assert _pass(registry, ModelReleaseStatus(), None).actions == [Deploy("2")]
