"""The acceptance load test of "Available means loaded": the real local backend (`midfill apply`,
its release controller, a private Ray Serve), MLflow on SQLite, concurrent clients over HTTP.

A release serves version 1; version 2 is approved, but its export is corrupt (the weights file is
garbage), so every replica constructor fails. The release must go Degraded, roll back to version 1
and end Available on it, while the clients' requests -- all the time -- are answered by version 1
without a single failure (the old replica keeps serving until a replacement is ready: Serve's
max_surge_percent, serving.app). Then `midfill eval --endpoint` refuses to score the alias's version 2
on an endpoint that serves version 1, and records a run of version 1 on version 1."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from midfill.local.state import StateStore
from midfill.registry import Registry
from tests.midfill.lifecycle.scenarios import condition
from tests.midfill.local.load import Load
from tests.midfill.local.waiting import wait_until

pytestmark = pytest.mark.slow  # a private Ray Serve and three model loads on a small machine


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[Path, Path]:
    from tests.serving.serving_exports import build_export

    good = build_export(tmp_path_factory.mktemp("good") / "model", layers=1, hidden=32, heads=2, vocab_size=512)
    corrupt = tmp_path_factory.mktemp("corrupt") / "model"
    shutil.copytree(good, corrupt)
    (weights,) = corrupt.glob("*.safetensors")
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + bytes(4096))  # a torn upload
    return good, corrupt


def _eval(*args: str):
    """`midfill eval ARGS` in-process (the state dir's MLflow, as the release controller uses)."""
    import typer
    from typer.testing import CliRunner

    from midfill.evaluation.cli import register as register_eval
    from midfill.local.cli import register

    app = typer.Typer()
    register(app)
    register_eval(app)
    return CliRunner().invoke(app, ["eval", *args])


@pytest.mark.timeout(900)
def test_a_corrupt_version_rolls_back_with_no_failed_request(cli, state_dir, tmp_path, write_yaml, exports) -> None:
    good, corrupt = exports
    state_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry(f"sqlite:///{state_dir / 'mlflow.db'}")
    registry.register(name="fim-debug", source=str(good), run_uid="run-good")
    registry.register(name="fim-debug", source=str(corrupt), run_uid="run-corrupt")
    registry.approve("fim-debug", 1)
    doc = {
        "apiVersion": "midfill.dev/v1alpha1",
        "kind": "ModelRelease",
        "metadata": {"name": "acc"},
        "spec": {
            "model": {"registeredModelName": "fim-debug", "alias": "champion"},
            "endpoint": {"resourcesPerReplica": {"requests": {"cpu": "1"}}},
            "serving": {"maxNewTokens": 8, "maxBatchSize": 4},
            "auth": {"disabled": True},
            "rollout": {"healthDeadlineSeconds": 600},  # a failed load is not waited out
        },
    }
    store = StateStore(state_dir)

    def status():
        record = store.get("ModelRelease", "acc")
        return record.status() if record else None

    try:
        cli("apply", "-f", str(write_yaml(tmp_path / "rel.yaml", doc)))
        available = wait_until(
            lambda: (s := status()) and s.phase == "Available" and s,
            timeout=300,
            what="version 1 Available",
        )
        assert available.stable_version == "1"
        health = httpx.get(f"{available.url}/health", timeout=10).json()  # what Available was based on
        assert (health["ready"], health["registered_model"], health["version"]) == (True, "fim-debug", "1")

        with Load(available.url) as clients:
            wait_until(lambda: len(clients.answers) >= 3, timeout=120, what="the clients' first answers")
            registry.approve("fim-debug", 2)
            wait_until(
                lambda: (s := status()) and "rolling version 1 -> 2" in (s.message or ""),
                timeout=120,
                what="version 2 rolling out",
            )
            during_attempt = len(clients.answers)
            wait_until(
                lambda: (s := status()) and condition(s.to_wire(), "RolledBack") is not None,
                timeout=420,
                what="the rollback decided",
            )
            # Version 1 kept answering while version 2 was being loaded (and failing), not only after
            # the rollback brought a replica of version 1 back.
            assert len(clients.answers) > during_attempt
            wait_until(
                lambda: (
                    (s := status())
                    and s.resolved_version == "2"
                    and s.phase == "Available"
                    and condition(s.to_wire(), "RolledBack") == ("RolledBack", "True", "LoadFailed")
                ),
                timeout=420,
                what="version 2 rolled back to version 1",
            )
            time.sleep(3)  # and still serving after the rollback settled
        final = status()
        assert final.stable_version == "1" and final.previous_stable_version is None
        events = store.get("ModelRelease", "acc").events
        degraded = [e for e in events if e.reason == "Degraded"]
        assert degraded and "version 2 failed to load" in degraded[0].message, [e.reason for e in events]
        assert [e.reason for e in events].index("Degraded") < len(events) - 1  # Available came after it
        assert clients.errors == []
        assert len(clients.answers) >= 10
        assert {(a.status, a.version) for a in clients.answers} == {(200, "fim-debug/1")}

        # The gate evaluates what is served: the alias points at version 2, the endpoint serves 1.
        refused = _eval("models:/fim-debug@champion", "--suite", "line-em", "--limit", "2", "--endpoint", final.url)
        assert refused.exit_code == 1, refused.output
        assert "serves fim-debug version 1, but MODEL is fim-debug version 2" in refused.output, refused.output
        assert not any(k.startswith("eval.") for k in registry.get("fim-debug", version="2").tags)
        heldout = tmp_path / "heldout"  # short files: the tiny model's context is 256 tokens
        heldout.mkdir()
        (heldout / "a.py").write_text(  # two statements inside a function body: line-em's two holes
            "def f(x):\n    y = x + 1\n    return y\n\n\nvalue = f(41)\nprint(value)\n"
        )
        scored = _eval(
            *("models:/fim-debug/1", "--suite", "line-em", "--limit", "2", "--max-new-tokens", "8"),
            *("--data", str(heldout), "--endpoint", final.url),
        )
        assert scored.exit_code == 0, scored.output
        assert registry.get("fim-debug", version="1").tags["eval.line-em.tasks"] == "2"
    finally:
        cli("delete", "mr", "acc")
