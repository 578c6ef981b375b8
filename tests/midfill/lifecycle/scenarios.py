"""The lifecycle scenarios every backend must agree on: one table, run against the pure state machine
(test_scenarios_machine.py), the operator on the Kubernetes emulator (tests/operators/test_scenarios.py)
and the local backend with real processes (tests/midfill/local/test_scenarios.py).

A scenario says how the world behaves (what each attempt does, whether each model version becomes
healthy, what the user edits) and what the resource must end with (phase, the condition that says
why, how many attempts or deployments it took).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Attempt = Literal["hang", "exit78", "crash"]
Version = Literal["healthy", "broken"]


@dataclass(frozen=True)
class TrainingScenario:
    id: str
    spec: dict  # merged into the TrainingRun's spec (wire names)
    attempts: tuple[Attempt, ...]  # what attempt 1, 2, ... does: runs on, exits 78, or dies
    phase: str
    condition: tuple[str, str, str]  # (type, status, reason) the run ends with
    started: int  # attempts started in all


@dataclass(frozen=True)
class ReleaseScenario:
    id: str
    spec: dict  # merged into the ModelRelease's spec (wire names)
    versions: tuple[Version, ...]  # registered versions 1, 2, ...: whether each can become healthy
    approve: tuple[str, ...]  # approved in this order, each one settling before the next
    phase: str
    stable: str | None
    serving: str
    condition: tuple[str, str, str]
    edit: dict = field(default_factory=dict)  # a spec change made at the end (merged into spec)


TRAINING = [
    TrainingScenario(
        "activeDeadlineSeconds ends a run that runs too long",
        {"activeDeadlineSeconds": 3},
        ("hang",),
        "Failed",
        ("Failed", "True", "DeadlineExceeded"),
        1,
    ),
    TrainingScenario(
        "a non-retryable exit code fails at once",
        {},
        ("exit78",),
        "Failed",
        ("Failed", "True", "NonRetryableExitCode"),
        1,
    ),
    TrainingScenario(
        "failures beyond failurePolicy.maxRestarts",
        {"failurePolicy": {"maxRestarts": 1}},
        ("crash", "crash"),
        "Failed",
        ("Failed", "True", "MaxRestartsExceeded"),
        2,
    ),
]

RELEASES = [
    ReleaseScenario(
        "an approved healthy version becomes Available",
        {},
        ("healthy",),
        ("1",),
        "Available",
        "1",
        "1",
        ("Available", "True", "Healthy"),
    ),
    ReleaseScenario(
        "a version that fails to load is rolled back to the stable one",
        {"rollout": {"healthDeadlineSeconds": 600}},  # at once: a failed load is not waited out
        ("healthy", "broken"),
        ("1", "2"),
        "Available",
        "1",
        "1",
        ("RolledBack", "True", "LoadFailed"),
    ),
    ReleaseScenario(
        "a version that fails to load with nothing to roll back to",
        {"rollout": {"healthDeadlineSeconds": 600}},
        ("broken",),
        ("1",),
        "Degraded",
        None,
        "1",
        ("Degraded", "True", "LoadFailed"),
    ),
    ReleaseScenario(
        "a spec edit redeploys the serving version",
        {},
        ("healthy",),
        ("1",),
        "Available",
        "1",
        "1",
        ("Progressing", "False", "Complete"),
        edit={"serving": {"maxNewTokens": 7}},
    ),
]


def merge(base: dict, extra: dict) -> dict:
    """`extra` merged into a copy of `base`, dicts recursively."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def condition(status: dict, type: str) -> tuple[str, str, str] | None:
    found = next((c for c in status.get("conditions") or [] if c["type"] == type), None)
    return (found["type"], found["status"], found["reason"]) if found else None
