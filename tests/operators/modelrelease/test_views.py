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
