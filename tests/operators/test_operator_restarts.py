"""The operator SIGKILLed at random moments while runs and releases go through their lifecycles
(the real `midfill operator` process, the Kubernetes emulator, a real `mlflow server`): nothing is
created twice and everything ends where its script says. The long version is bench/chaos_operator.py."""

from __future__ import annotations

import random

import pytest

from tests.mlflow_server import MlflowServer
from tests.operators.chaos import OperatorProcess, Plan, World, killing, play, verdict
from tests.operators.emulator import emulated_cluster


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_operator_killed_at_random_keeps_every_lifecycle_whole(tmp_path) -> None:
    rng = random.Random(18)
    plan = Plan.draw(runs=6, releases=2, rng=rng)
    with MlflowServer(tmp_path / "mlflow") as mlflow:
        async with emulated_cluster(tmp_path) as (cluster, kubeconfig):
            world = World(cluster, mlflow.uri, plan)
            op = OperatorProcess(
                kubeconfig, mlflow.uri, tmp_path / "operator.log", health_url=world.endpoints.url_template
            )
            with world.endpoints.running():
                async with killing(op, rng, after_ready=(0.2, 4), kills=4) as kills:
                    done = await play(
                        cluster, world, plan, timeout=420, waves=2, wave_seconds=10, kills_done=lambda: len(kills) >= 3
                    )
                op.kill()
            result = verdict(cluster, plan, world.registry)
    assert len(kills) >= 3, f"too few kills to mean anything: {kills}"
    assert done, f"not settled: {result}; log tail: {(tmp_path / 'operator.log').read_text()[-3000:]}"
    assert result["objects_created_twice"] == {}
    assert result["attempts_beyond_script"] == []
    assert result["runs_with_wrong_version_count"] == []
    assert result["wrong_final_phase"] == []
