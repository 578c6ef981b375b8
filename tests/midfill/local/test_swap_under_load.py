"""A model swap under 32 concurrent clients: the real local backend (`midfill apply`, its release
controller, a private Ray Serve), MLflow on SQLite, clients over HTTP all the while.

A release serves version 1; version 2 is approved and rolls in (Serve starts the new replica before
it stops the old one). No request may fail, and once the release reports the swap complete
(Available on version 2) every request that starts afterwards must be answered by version 2 -- the
`x-midfill-model-version` header of each answer says which one did."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from midfill.local.state import StateStore
from midfill.registry import Registry
from tests.midfill.local.load import Load
from tests.midfill.local.waiting import wait_until

pytestmark = pytest.mark.slow  # a private Ray Serve, two model loads, 32 clients on a small machine

CLIENTS = 32


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory) -> tuple[Path, Path]:
    from tests.serving.serving_exports import build_export

    one = build_export(tmp_path_factory.mktemp("v1") / "model", layers=1, hidden=32, heads=2, vocab_size=512)
    two = tmp_path_factory.mktemp("v2") / "model"
    shutil.copytree(one, two)  # same weights: the registry version is what tells them apart
    return one, two


@pytest.mark.timeout(900)
def test_a_swap_under_32_clients_fails_nothing_and_then_answers_only_from_version_2(
    cli, state_dir, tmp_path, write_yaml, two_versions
) -> None:
    one, two = two_versions
    state_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry(f"sqlite:///{state_dir / 'mlflow.db'}")
    registry.register(name="fim-swap", source=str(one), run_uid="run-1")
    registry.register(name="fim-swap", source=str(two), run_uid="run-2")
    registry.approve("fim-swap", 1)
    doc = {
        "apiVersion": "midfill.dev/v1alpha1",
        "kind": "ModelRelease",
        "metadata": {"name": "swap"},
        "spec": {
            "model": {"registeredModelName": "fim-swap", "alias": "champion"},
            "endpoint": {"resourcesPerReplica": {"requests": {"cpu": "1"}}},
            "serving": {"maxNewTokens": 8, "maxBatchSize": CLIENTS},
            "auth": {"disabled": True},
        },
    }
    store = StateStore(state_dir)

    def status():
        record = store.get("ModelRelease", "swap")
        return record.status() if record else None

    try:
        cli("apply", "-f", str(write_yaml(tmp_path / "rel.yaml", doc)))
        available = wait_until(
            lambda: (s := status()) and s.phase == "Available" and s, timeout=300, what="version 1 Available", poll=0.5
        )
        with Load(available.url, CLIENTS) as load:
            wait_until(lambda: len(load.answers) >= CLIENTS, timeout=120, poll=0.1, what="the clients' first answers")
            registry.approve("fim-swap", 2)
            wait_until(
                lambda: (s := status()) and s.phase == "Available" and s.stable_version == "2",
                timeout=420,
                poll=0.1,
                what="the swap to version 2 reported complete",
            )
            reported = time.monotonic()
            wait_until(
                lambda: sum(a.started > reported for a in load.answers) >= 4 * CLIENTS,
                timeout=120,
                poll=0.1,
                what="answers to requests sent after the swap was reported",
            )
    finally:
        cli("delete", "mr", "swap")

    assert load.errors == []
    assert {a.status for a in load.answers} == {200}, [a for a in load.answers if a.status != 200][:5]
    before = {a.version for a in load.answers if a.started < reported}
    after = [a.version for a in load.answers if a.started > reported]
    assert "fim-swap/1" in before  # the load did span the swap
    assert set(after) == {"fim-swap/2"}, f"{after.count('fim-swap/1')} of {len(after)} answered by version 1"
