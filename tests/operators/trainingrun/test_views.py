"""Reading a Job into the lifecycle machine's terms (the operator's observe side)."""

from __future__ import annotations

from midfill.lifecycle.trainingrun import NON_RETRYABLE
from operators.trainingrun.handlers import job_view


def test_job_view_reads_conditions_and_exit_code():
    raw = {
        "metadata": {
            "name": "r-a2",
            "labels": {"midfill.dev/attempt": "2"},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"suspend": False},
        "status": {
            "ready": 3,
            "startTime": "2026-01-01T00:00:05Z",
            "conditions": [
                {
                    "type": "FailureTarget",
                    "status": "True",
                    "reason": "PodFailurePolicy",
                    "message": "failed with exit code 78 matching",
                },
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PodFailurePolicy",
                    "message": "failed with exit code 78 matching",
                },
            ],
        },
    }
    view = job_view(raw)
    assert view.attempt == 2 and view.ready == 3 and view.outcome == "Failed" and view.exit_code == 78
    assert view.reason == NON_RETRYABLE  # a Pod failure policy only fails a Job for the non-retryable codes
    assert job_view({"metadata": {"name": "x", "labels": {}}}) is None
