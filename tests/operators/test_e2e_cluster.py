"""Against a real cluster (marker e2e; runs only with MIDFILL_E2E=1 and KUBECONFIG). See docs/operator.md for the setup:
the midfill CRDs installed, a namespace to play in (MIDFILL_E2E_NAMESPACE, default midfill-e2e).
The operator runs in this process; the cluster's own Job controller and garbage collector do the rest.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml

from operators.kube import JOBS, SERVICES, TRAININGRUNS, Kube
from tests.operators.emulator import running_operator

pytestmark = pytest.mark.e2e
SAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "samples" / "trainingrun-debug.yaml"


async def wait_for(check, timeout=120.0):
    for _ in range(int(timeout * 2)):
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s")


async def test_training_run_on_a_real_cluster(tmp_path):
    namespace = os.environ.get("MIDFILL_E2E_NAMESPACE", "midfill-e2e")
    kube = Kube()
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"] = {"name": "e2e-fim", "namespace": namespace}
    # Nothing pulls the trainer image in a short test: make it fail fast and visibly instead.
    doc["spec"]["image"] = os.environ.get("MIDFILL_E2E_TRAINER_IMAGE", "ghcr.io/midfill/trainer:0.1.0")
    doc["spec"]["failurePolicy"] = {"maxRestarts": 0}
    await kube.delete(TRAININGRUNS, namespace, "e2e-fim")
    async with running_operator(f"sqlite:///{tmp_path / 'mlflow.db'}", watch_namespaces=namespace):
        assert await kube.create(TRAININGRUNS, namespace, doc)
        job = await wait_for(lambda: kube.get(JOBS, namespace, "e2e-fim-a1"))
        # The API server accepted our Job (admission and schema), with the gang settings intact.
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["backoffLimit"] == 0
        assert await kube.get(SERVICES, namespace, "e2e-fim") is not None
        run = await wait_for(lambda: _with_phase(kube, namespace))
        assert run["status"]["attempt"] == 1
        await kube.delete(TRAININGRUNS, namespace, "e2e-fim")
        await wait_for(lambda: _gone(kube, namespace))


async def _with_phase(kube, namespace):
    run = await kube.get(TRAININGRUNS, namespace, "e2e-fim")
    return run if (run or {}).get("status", {}).get("phase") else None


async def _gone(kube, namespace):
    return (
        await kube.get(JOBS, namespace, "e2e-fim-a1") is None
        and await kube.get(TRAININGRUNS, namespace, "e2e-fim") is None
    )
