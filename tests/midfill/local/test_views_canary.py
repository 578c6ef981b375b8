"""`midfill describe mr` during a canary: the split and the numbers it was judged on."""

from __future__ import annotations

from midfill.local.views import _rollout_summary, canary_lines


def test_the_split_and_each_versions_numbers_are_shown():
    canary = {
        "version": "3",
        "state": "Running",
        "step": 0,
        "weight": 30,
        "stepStarted": "2026-01-01T12:00:00Z",
        "verdict": "within thresholds after 2s of 4s",
        "canaryNumbers": {"requests": 12, "errors": 0, "errorRate": 0.0, "p95LatencyMs": 41.5, "ownStopRate": 0.75},
        "stableNumbers": {"requests": 30, "errors": 0, "errorRate": 0.0, "p95LatencyMs": 40.1},
    }
    text = "\n".join(canary_lines(canary, "2"))
    assert "version 3 30% / version 2 70%" in text and "Running, step 1" in text
    assert "within thresholds after 2s of 4s" in text
    (canary_row,) = [line for line in text.splitlines() if line.strip().startswith("canary")]
    assert canary_row.split()[:5] == ["canary", "3", "12", "0.0", "41.5"]
    assert "stable" in text and "40.1" in text
    promoted = "\n".join(canary_lines({**canary, "state": "Promoted", "weight": 100}, "3"))
    assert "version 3 promoted" in promoted


def test_the_rollout_summary_names_the_steps_and_thresholds():
    assert _rollout_summary({}) == "InPlace"
    summary = _rollout_summary({"strategy": "Canary", "canarySteps": [30, 100], "canary": {"maxErrorRate": 0.05}})
    assert summary == "Canary 30%/100% (maxErrorRate 0.05)"
