"""Reading a RayService into the lifecycle machine's terms (the operator's observe side)."""

from __future__ import annotations

from operators.modelrelease.handlers import rayservice_view


def test_rayservice_view_needs_status_for_the_current_generation():
    obj = {
        "metadata": {"generation": 3, "annotations": {"midfill.dev/model-version": "5"}},
        "status": {
            "observedGeneration": 2,
            "activeServiceStatus": {"applicationStatuses": {"infill": {"status": "RUNNING"}}},
        },
    }
    assert rayservice_view(obj).version == "5" and not rayservice_view(obj).healthy
    obj["status"]["observedGeneration"] = 3
    assert rayservice_view(obj).healthy

    assert rayservice_view(obj).generation is None  # built before the annotation existed: no redeploy
    obj["metadata"]["annotations"]["midfill.dev/release-generation"] = "7"
    assert rayservice_view(obj).generation == 7


def test_rayservice_view_reads_what_the_endpoint_serves_and_a_failed_deploy():
    from midfill.api import load_file
    from tests.operators.modelrelease.test_handlers import SAMPLE

    (rel,) = load_file(SAMPLE)
    obj = {
        "metadata": {"generation": 3, "annotations": {"midfill.dev/model-version": "5"}},
        "status": {
            "observedGeneration": 3,
            "activeServiceStatus": {"applicationStatuses": {"infill": {"status": "RUNNING"}}},
        },
    }
    name = rel.spec.model.registered_model_name
    ready = {"status": "ok", "ready": True, "registered_model": name, "version": "5"}
    assert rayservice_view(obj, rel, ready).served == "5"
    assert rayservice_view(obj, rel, {**ready, "version": "4"}).served == "4"  # old replicas still answer
    assert rayservice_view(obj, rel, {**ready, "registered_model": "other"}).served is None
    assert rayservice_view(obj, rel, {**ready, "ready": False}).served is None
    unreachable = rayservice_view(obj, rel, None)
    assert unreachable.served is None and "unreachable" in unreachable.health and unreachable.failed is None
    app = obj["status"]["activeServiceStatus"]["applicationStatuses"]["infill"]
    app.update(status="DEPLOY_FAILED", message="constructor failed: bad header")
    assert "bad header" in rayservice_view(obj, rel, None).failed
    obj["status"]["observedGeneration"] = 2  # KubeRay's verdict on an older spec is not this one's
    assert rayservice_view(obj, rel, None).failed is None
