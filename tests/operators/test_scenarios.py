"""The lifecycle scenario table (tests/midfill/lifecycle/scenarios.py) against the operator: kopf and
the handlers on the Kubernetes emulator, MLflow on SQLite. The test plays the Job controller and
KubeRay: it writes the Job and RayService status they would, as each scenario's world behaves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import yaml

from midfill.registry import Registry
from operators.modelrelease import builders as mr_builders
from operators.trainingrun import builders as tr_builders
from tests.midfill.lifecycle.scenarios import RELEASES, TRAINING, ReleaseScenario, TrainingScenario, condition, merge
from tests.operators.emulator import eventually

SAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "samples"
TERMINAL = ("Succeeded", "Failed")


def _doc(sample: str, spec: dict) -> dict:
    doc = yaml.safe_load((SAMPLES / sample).read_text())
    doc["metadata"] = {"name": "fim"}
    doc["spec"] = merge(doc["spec"], spec)
    return doc


@contextlib.asynccontextmanager
async def playing(step: Callable[[], Awaitable[None]]):
    """Run `step` every 0.2 s in the background: the cluster's own controllers, as the test plays them."""

    async def loop() -> None:
        while True:
            await step()
            await asyncio.sleep(0.2)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _ever_created(cluster, name: str) -> bool:
    try:
        return bool(cluster.history("jobs", name))
    except KeyError:
        return False


def _status(cluster, plural: str) -> dict:
    return (cluster.get(plural, "fim") or {}).get("status") or {}


@pytest.mark.parametrize("sc", TRAINING, ids=[s.id for s in TRAINING])
async def test_training_scenario(sc: TrainingScenario, cluster, operator) -> None:
    handled: set[str] = set()

    async def job_controller() -> None:
        for name in cluster.names("jobs"):
            job = cluster.get("jobs", name)
            if name in handled or job is None or job["metadata"].get("deletionTimestamp"):
                continue
            attempt = int(job["metadata"]["labels"][tr_builders.LABEL_ATTEMPT])
            handled.add(name)
            what = sc.attempts[attempt - 1]
            if what == "hang":
                status = {"active": 1, "ready": 1, "startTime": job["metadata"]["creationTimestamp"]}
            elif what == "exit78":
                message = (
                    f"Container trainer for pod team/{name}-0-x failed with exit code 78 matching "
                    "FailJob rule at index 0"
                )
                status = {
                    "failed": 1,
                    "conditions": [
                        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": message}
                    ],
                }
            else:
                status = {
                    "failed": 1,
                    "conditions": [
                        {
                            "type": "Failed",
                            "status": "True",
                            "reason": "BackoffLimitExceeded",
                            "message": "Job has reached the specified backoff limit",
                        }
                    ],
                }
            await cluster.patch("jobs", name, {"status": status}, "status")

    async with operator(), playing(job_controller):
        await cluster.create(_doc("trainingrun-debug.yaml", sc.spec))
        await eventually(
            lambda: _status(cluster, "trainingruns").get("phase") in TERMINAL, timeout=40, what="a final phase"
        )
        status = _status(cluster, "trainingruns")
        assert status["phase"] == sc.phase, status.get("message")
        assert condition(status, sc.condition[0]) == sc.condition
        started = [n for n in (tr_builders.job_name("fim", i) for i in range(1, 6)) if _ever_created(cluster, n)]
        assert len(started) == sc.started
        # Nothing left running: every Job still there has finished.
        await eventually(
            lambda: all(
                (cluster.get("jobs", n) or {}).get("status", {}).get("conditions") for n in cluster.names("jobs")
            ),
            what="no running Job",
        )


@pytest.mark.parametrize("sc", RELEASES, ids=[s.id for s in RELEASES])
async def test_release_scenario(sc: ReleaseScenario, cluster, operator, tracking_uri, tmp_path, serve_endpoint) -> None:
    registry = Registry(tracking_uri)
    for i, _ in enumerate(sc.versions):
        registry.register(name="fim-debug", source=str(tmp_path), run_uid=f"run-{i}")

    async def kuberay() -> None:
        rs = cluster.get("rayservices", "fim")
        if rs is None:
            return
        version = rs["metadata"]["annotations"][mr_builders.ANNOTATION_VERSION]
        healthy = sc.versions[int(version) - 1] == "healthy"
        app = "RUNNING" if healthy else "DEPLOY_FAILED"
        if healthy:  # the replicas load it and answer /health; a broken one never replaces the old ones
            serve_endpoint.serve(rs["metadata"]["namespace"], "fim-serve-svc", "fim-debug", version)
        want = {
            "observedGeneration": rs["metadata"]["generation"],
            "activeServiceStatus": {"applicationStatuses": {"infill": {"status": app}}},
        }
        if {k: (rs.get("status") or {}).get(k) for k in want} != want:
            await cluster.patch("rayservices", "fim", {"status": want}, "status")

    def settled(version: str) -> bool:
        status = _status(cluster, "modelreleases")
        rolling = (condition(status, "Progressing") or ("", ""))[1] == "True"
        settled_phase = status.get("phase") in ("Available", "Degraded")
        return status.get("resolvedVersion") == version and settled_phase and not rolling

    async with operator(), playing(kuberay):
        await cluster.create(_doc("modelrelease.yaml", sc.spec))
        for version in sc.approve:
            registry.approve("fim-debug", int(version))
            await eventually(lambda version=version: settled(version), timeout=45, what=f"version {version} settled")
        if sc.edit:
            release = cluster.get("modelreleases", "fim")
            await cluster.patch("modelreleases", "fim", {"spec": sc.edit})
            generation = str(release["metadata"]["generation"] + 1)
            await eventually(
                lambda: (
                    cluster.get("rayservices", "fim")["metadata"]["annotations"].get(mr_builders.ANNOTATION_GENERATION)
                    == generation
                ),
                what="the RayService rebuilt from the edited spec",
            )
            config = yaml.safe_load(cluster.get("rayservices", "fim")["spec"]["serveConfigV2"])
            # A limit travels in the deployment's user_config (reconfigured in place), not in the args.
            (deployment,) = config["applications"][0]["deployments"]
            assert deployment["user_config"]["max_new_tokens"] == sc.edit["serving"]["maxNewTokens"]
            await eventually(
                lambda: (
                    settled(sc.serving)
                    and _status(cluster, "modelreleases").get("observedGeneration") == int(generation)
                )
            )
        status = _status(cluster, "modelreleases")
        assert status["phase"] == sc.phase, status.get("message")
        assert status.get("stableVersion") == sc.stable
        assert (
            cluster.get("rayservices", "fim")["metadata"]["annotations"][mr_builders.ANNOTATION_VERSION] == sc.serving
        )
        assert condition(status, sc.condition[0]) == sc.condition
