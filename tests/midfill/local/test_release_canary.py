"""Canary rollouts on the real local backend (`midfill apply`, its release controller, a private Ray
Serve with the canary router), MLflow on SQLite, concurrent editors over HTTP (each with its `user`).

Version 1 serves; version 2 is approved and walks the canary steps to 100% and becomes stable. Then
the release asks for a p95 latency no real request meets (1 ms), version 3 is approved, and its
canary breaches at the first step: back to 0%, version 2 keeps serving everything. No request fails
during the whole run, and every answer names the version that produced it.
"""

from __future__ import annotations

import time

import pytest

from midfill.local.state import StateStore
from midfill.registry import Registry
from tests.midfill.lifecycle.scenarios import condition
from tests.midfill.local.load import Load
from tests.midfill.local.waiting import wait_until

pytestmark = pytest.mark.slow  # a private Ray Serve and several model loads on a small machine


def _release(**canary) -> dict:
    return {
        "apiVersion": "midfill.dev/v1alpha1",
        "kind": "ModelRelease",
        "metadata": {"name": "can"},
        "spec": {
            "model": {"registeredModelName": "fim-debug", "alias": "champion"},
            "endpoint": {"resourcesPerReplica": {"requests": {"cpu": "1"}}},
            "serving": {"maxNewTokens": 8, "maxBatchSize": 4},
            "auth": {"disabled": True},
            "rollout": {
                "strategy": "Canary",
                "canarySteps": [30, 100],
                "canary": {"stepSeconds": 4, "minRequests": 5, "maxErrorRate": 0.05, **canary},
            },
        },
    }


@pytest.mark.timeout(1200)
def test_a_canary_walks_to_stable_and_a_breaching_one_returns_to_zero(cli, state_dir, tmp_path, write_yaml):
    from tests.serving.serving_exports import build_export

    export = build_export(tmp_path / "model", layers=1, hidden=32, heads=2, vocab_size=512)
    state_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry(f"sqlite:///{state_dir / 'mlflow.db'}")
    for run in ("one", "two", "three"):
        registry.register(name="fim-debug", source=str(export), run_uid=f"run-{run}")
    registry.approve("fim-debug", 1)
    store = StateStore(state_dir)

    def status():
        record = store.get("ModelRelease", "can")
        return record.status() if record else None

    try:
        cli("apply", "-f", str(write_yaml(tmp_path / "rel.yaml", _release())))
        available = wait_until(
            lambda: (s := status()) and s.phase == "Available" and s, timeout=300, what="1 Available"
        )
        assert available.stable_version == "1"
        with Load(available.url, users_per_client=8) as editors:
            wait_until(lambda: len(editors.answers) >= 3, timeout=120, what="the editors' first answers")
            registry.approve("fim-debug", 2)
            weights = set()

            def promoted():
                s = status()
                if s and s.canary is not None:
                    weights.add(s.canary.weight)
                return s and s.stable_version == "2" and s.phase == "Available" and s

            done = wait_until(promoted, timeout=600, what="version 2 promoted")
            assert done.previous_stable_version == "1" and done.canary is not None
            assert done.canary.state == "Promoted" and {30, 100} <= weights
            assert done.canary.canary_numbers is not None and done.canary.canary_numbers.requests >= 5
            served = {a.version for a in editors.answers}
            assert {"fim-debug/1", "fim-debug/2"} <= served
            # Sticky and monotone: an editor once answered by the canary never goes back to version 1
            # (not at a later step, not while the promoted version moves into the stable slot).
            for user in {a.user for a in editors.answers}:
                seen = [a.version for a in list(editors.answers) if a.user == user]
                if "fim-debug/2" in seen:
                    assert "fim-debug/1" not in seen[seen.index("fim-debug/2") :], (user, seen)

            # A threshold no real request meets: version 3's canary breaches at its first step.
            cli("apply", "-f", str(write_yaml(tmp_path / "rel.yaml", _release(maxP95LatencyMs=1))))
            wait_until(
                lambda: (s := status()) and s.phase == "Available" and s.observed_generation == 2,
                timeout=300,
                what="the edited spec served",
            )
            registry.approve("fim-debug", 3)
            wait_until(
                lambda: (
                    (s := status())
                    and condition(s.to_wire(), "RolledBack") == ("RolledBack", "True", "CanaryThresholdBreached")
                ),
                timeout=420,
                what="version 3's canary rolled back",
            )
            back = wait_until(
                lambda: (s := status()) and s.phase == "Available" and s, timeout=300, what="2 serves alone"
            )
            after = len(editors.answers)
            time.sleep(4)
            later = {a.version for a in editors.answers[after:]}
        assert back.stable_version == "2" and back.canary is not None
        assert (back.canary.version, back.canary.state, back.canary.weight) == ("3", "RolledBack", 0)
        assert "maxP95LatencyMs 1" in (back.canary.verdict or "")
        assert later == {"fim-debug/2"}  # the stable version serves 100% after the rollback
        assert editors.errors == []
        assert {a.status for a in editors.answers} == {200}  # not one failed request, whole run
        events = store.get("ModelRelease", "can").events
        degraded = [e for e in events if e.reason == "Degraded"]
        assert degraded and "p95 latency (ms)" in degraded[-1].message
    finally:
        cli("delete", "mr", "can")
