"""Canary rollouts through the operator: registry approval in MLflow (SQLite) -> RayService in the
emulator, with the test playing KubeRay (the RayService status) and the canary router (the
endpoint's /health: the split the RayService asks for, and the numbers the test says each version has).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import yaml

from midfill.registry import Registry
from operators.modelrelease import builders
from tests.operators.emulator import eventually

SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "modelrelease.yaml"
HEALTHY = {"requests": 40, "errors": 0, "p95_latency_ms": 120.0, "own_stop_rate": 0.9, "mean_completion_tokens": 9}


def canary_release() -> dict:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"] = {"name": "fim"}
    doc["spec"]["rollout"] = {
        "strategy": "Canary",
        "canarySteps": [20, 60, 100],
        "canary": {"stepSeconds": 1, "minRequests": 10, "maxErrorRate": 0.05, "maxP95LatencyMs": 1000},
    }
    return doc


def status(cluster) -> dict:
    return (cluster.get("modelreleases", "fim") or {}).get("status") or {}


def served_uri(rayservice: dict) -> str:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]["model_uri"]


@contextlib.asynccontextmanager
async def kuberay_and_router(cluster, endpoint, canary_numbers: dict) -> AsyncIterator[list[int]]:
    """Play KubeRay (the app RUNNING for the current spec) and the canary router (/health: the
    stable version and the canary the RayService names, at its weight, with `canary_numbers`).
    Yields the canary weights seen, in order."""
    weights: list[int] = []

    async def play() -> None:
        while True:
            rs = cluster.get("rayservices", "fim")
            if rs is not None:
                annotations = rs["metadata"]["annotations"]
                stable = annotations[builders.ANNOTATION_VERSION]
                canary = annotations.get(builders.ANNOTATION_CANARY) or None
                weight = int(annotations.get(builders.ANNOTATION_CANARY_WEIGHT, "0"))
                if canary and (not weights or weights[-1] != weight):
                    weights.append(weight)
                numbers = {stable: HEALTHY, **({canary: canary_numbers} if canary else {})}
                endpoint.reports[(rs["metadata"]["namespace"], "fim-serve-svc")] = {
                    "status": "ok",
                    "ready": True,
                    "registered_model": "fim-debug",
                    "version": stable,
                    "canary": {"version": canary, "weight": weight, "ready": canary is not None},
                    "versions": numbers,
                }
                if (rs.get("status") or {}).get("observedGeneration") != rs["metadata"]["generation"]:
                    await cluster.patch(
                        "rayservices",
                        "fim",
                        {
                            "status": {
                                "observedGeneration": rs["metadata"]["generation"],
                                "activeServiceStatus": {"applicationStatuses": {"infill": {"status": "RUNNING"}}},
                            }
                        },
                        "status",
                    )
            await asyncio.sleep(0.2)

    task = asyncio.create_task(play())
    try:
        yield weights
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _stable_on_one(cluster, registry) -> None:
    await cluster.create(canary_release())
    await eventually(lambda: status(cluster).get("stableVersion") == "1", what="version 1 stable")
    registry.approve("fim-debug", 2)


async def test_a_healthy_canary_walks_every_step_then_becomes_stable(
    cluster, operator, tracking_uri, tmp_path, serve_endpoint
):
    registry = Registry(tracking_uri)
    for uid in ("a", "b"):
        registry.register(name="fim-debug", source=str(tmp_path), run_uid=uid)
    registry.approve("fim-debug", 1)
    async with operator(), kuberay_and_router(cluster, serve_endpoint, HEALTHY) as weights:
        await _stable_on_one(cluster, registry)
        first = await eventually(lambda: (s := status(cluster).get("canary")) and s, what="canary started")
        assert first["version"] == "2"
        await eventually(
            lambda: status(cluster).get("stableVersion") == "2" and status(cluster)["phase"] == "Available",
            timeout=60,
            what="version 2 promoted",
        )
        assert weights == [20, 60, 100, 0]  # 0% before the canary's deployment goes
        rs = cluster.get("rayservices", "fim")
        assert (
            served_uri(rs) == "models:/fim-debug/2" and rs["metadata"]["annotations"][builders.ANNOTATION_CANARY] == ""
        )
        canary = status(cluster)["canary"]
        assert (canary["state"], canary["weight"]) == ("Promoted", 100)
        assert canary["canaryNumbers"]["requests"] == 40 and canary["stableNumbers"]["requests"] == 40
        assert status(cluster)["previousStableVersion"] == "1"
        assert cluster.names("rayservices") == ["fim"]  # one RayService all along: no second cluster


async def test_a_breaching_canary_returns_to_zero_and_the_stable_version_keeps_serving(
    cluster, operator, tracking_uri, tmp_path, serve_endpoint
):
    registry = Registry(tracking_uri)
    for uid in ("a", "b"):
        registry.register(name="fim-debug", source=str(tmp_path), run_uid=uid)
    registry.approve("fim-debug", 1)
    erring = {**HEALTHY, "errors": 8}
    async with operator(), kuberay_and_router(cluster, serve_endpoint, erring) as weights:
        await _stable_on_one(cluster, registry)
        rolled = await eventually(
            lambda: next((c for c in status(cluster).get("conditions", []) if c["type"] == "RolledBack"), None),
            what="RolledBack condition",
        )
        assert rolled["status"] == "True" and rolled["reason"] == "CanaryThresholdBreached"
        assert "error rate 0.2 > maxErrorRate 0.05 over 40 canary requests" in rolled["message"]
        rs = await eventually(
            lambda: (
                (r := cluster.get("rayservices", "fim"))
                and r["metadata"]["annotations"][builders.ANNOTATION_CANARY] == ""
                and r
            ),
            what="canary removed",
        )
        assert served_uri(rs) == "models:/fim-debug/1"
        await eventually(lambda: status(cluster).get("phase") == "Available", what="Available on version 1")
        assert weights == [20, 0] and status(cluster)["stableVersion"] == "1"
        assert (status(cluster)["canary"]["state"], status(cluster)["canary"]["weight"]) == ("RolledBack", 0)
