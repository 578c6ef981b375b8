"""The registry against a real `mlflow server` over HTTP, taken down from outside (SIGKILL) and
brought back: calls wait for it, an outage is never read as "nothing registered", and a
registration repeated after a lost answer converges on one version."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from midfill.registry import TAG_RUN_UID, Registry, RegistryError, RegistryUnavailable
from tests.mlflow_server import MlflowServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _one_http_try(monkeypatch, server):
    # MLflow's own HTTP client retries a refused connection for minutes (backoff 2^n); one try here
    # makes the waiting observable as midfill's (logged, bounded by retry_seconds).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    yield
    if not server.healthy():
        server.start()


def test_registration_waits_for_mlflow_and_registers_once(server, caplog):
    registry = Registry(server.uri, retry_seconds=120)
    server.kill()
    result: dict = {}

    def register() -> None:
        try:
            result["info"], result["created"] = registry.register(name="outage", source="s3://b/x", run_uid="uid-1")
        except Exception as exc:  # reported below
            result["error"] = exc

    with caplog.at_level(logging.WARNING, logger="midfill.registry"):
        thread = threading.Thread(target=register)
        thread.start()
        time.sleep(3)
        assert thread.is_alive(), result  # still waiting, not failed
        server.start()
        thread.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert result["created"] and result["info"].version == "1"
    assert any("waiting for MLflow" in r.getMessage() for r in caplog.records)
    again, created = registry.register(name="outage", source="s3://b/x", run_uid="uid-1")
    assert (again.version, created) == ("1", False)
    assert [v.version for v in registry.versions("outage")] == ["1"]


def test_an_outage_is_not_read_as_nothing_registered(server):
    registry = Registry(server.uri, retry_seconds=0)
    registry.register(name="lookup", source="s3://b/x", run_uid="uid-2")
    server.kill()
    with pytest.raises(RegistryUnavailable, match="unavailable while looking up"):
        registry.find_by_run_uid("lookup", "uid-2")
    with pytest.raises(RegistryUnavailable, match=f"MLflow at {server.uri} unavailable while resolving"):
        registry.get("lookup", alias="champion")


def test_a_registration_that_landed_twice_converges_on_the_first(server):
    registry = Registry(server.uri, retry_seconds=0)
    first, _ = registry.register(name="twice", source="s3://b/x", run_uid="uid-3")
    # What a create_model_version retried after a lost answer leaves behind: a second copy.
    registry.client.create_model_version("twice", source="s3://b/x", tags={TAG_RUN_UID: "uid-3"})
    assert [v.version for v in registry.versions("twice")] == ["1", "2"]
    info, created = registry.register(name="twice", source="s3://b/x", run_uid="uid-3")
    assert (info.version, created) == (first.version, False)
    assert [v.version for v in registry.versions("twice")] == ["1"]


def test_a_missing_model_is_still_an_error_not_an_outage(server):
    registry = Registry(server.uri, retry_seconds=0)
    with pytest.raises(RegistryError, match="does not exist") as caught:
        registry.get("never-registered", version=1)
    assert not isinstance(caught.value, RegistryUnavailable)
