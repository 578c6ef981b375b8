"""The ModelRelease state machine, table-driven and pure."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from midfill.api import load_file
from midfill.api.common import Condition
from midfill.api.modelrelease import ModelReleaseStatus
from midfill.lifecycle.modelrelease import Deploy, DeploymentView, Observed, Resolution, reconcile

SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "modelrelease.yaml"
NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def release(paused=False):
    (rel,) = load_file(SAMPLE)
    rel.metadata.namespace = "team"
    rel.spec.paused = paused
    return rel


def rs(version, healthy=True, age=5, generation=None, served="same", failed=None):
    """A deployment of `version`; `served` is what its endpoint's /health reports (default: that
    version once healthy, nothing before)."""
    return DeploymentView(
        version=version,
        rollout_start=NOW - dt.timedelta(seconds=age),
        healthy=healthy,
        health="x",
        url="http://fim-debug-serve-svc.team.svc.cluster.local:8000",
        generation=generation,
        served=(version if healthy else None) if served == "same" else served,
        failed=failed,
    )


APPROVED_3 = Resolution(version="3")
UNAPPROVED_3 = Resolution(version="3", unmet=("tag review=approved",))
ROLLED_BACK = [Condition(type="RolledBack", status="True", reason="HealthDeadlineExceeded")]

CASES = [
    (
        "unresolvable alias",
        release(),
        ModelReleaseStatus(),
        Resolution(error="registered model 'x' has no alias 'champion'"),
        None,
        "Pending",
        [],
    ),
    ("not approved, nothing served", release(), ModelReleaseStatus(), UNAPPROVED_3, None, "WaitingForApproval", []),
    ("approved, no RayService", release(), ModelReleaseStatus(), APPROVED_3, None, "Progressing", [Deploy("3")]),
    (
        "deployed, waiting for health",
        release(),
        ModelReleaseStatus(resolved_version="3"),
        APPROVED_3,
        rs("3", healthy=False),
        "Progressing",
        [],
    ),
    ("healthy", release(), ModelReleaseStatus(resolved_version="3"), APPROVED_3, rs("3"), "Available", []),
    (
        "new approved version rolls in place",
        release(),
        ModelReleaseStatus(stable_version="2"),
        APPROVED_3,
        rs("2"),
        "Progressing",
        [Deploy("3")],
    ),
    (
        "new unapproved version keeps stable",
        release(),
        ModelReleaseStatus(stable_version="2"),
        UNAPPROVED_3,
        rs("2"),
        "Available",
        [],
    ),
    (
        "unhealthy past deadline rolls back",
        release(),
        ModelReleaseStatus(stable_version="2", resolved_version="3"),
        APPROVED_3,
        rs("3", healthy=False, age=601),
        "Degraded",
        [Deploy("2")],
    ),
    (
        "Ray reports RUNNING but the endpoint still serves the old version: not Available",
        release(),
        ModelReleaseStatus(stable_version="2", resolved_version="3"),
        APPROVED_3,
        rs("3", served="2"),
        "Progressing",
        [],
    ),
    (
        "Ray reports RUNNING but the endpoint is still loading: not Available",
        release(),
        ModelReleaseStatus(resolved_version="3"),
        APPROVED_3,
        rs("3", served=None),
        "Progressing",
        [],
    ),
    (
        "a version that failed to load rolls back at once, before the deadline",
        release(),
        ModelReleaseStatus(stable_version="2", resolved_version="3"),
        APPROVED_3,
        rs("3", healthy=False, age=5, failed="SafetensorError: invalid header"),
        "Degraded",
        [Deploy("2")],
    ),
    (
        "a version that failed to load with nothing to roll back to",
        release(),
        ModelReleaseStatus(resolved_version="3"),
        APPROVED_3,
        rs("3", healthy=False, age=5, failed="SafetensorError: invalid header"),
        "Degraded",
        [],
    ),
    (
        "served but never reported by the endpoint past the deadline rolls back",
        release(),
        ModelReleaseStatus(stable_version="2", resolved_version="3"),
        APPROVED_3,
        rs("3", age=601, served=None),
        "Degraded",
        [Deploy("2")],
    ),
    (
        "rolled-back version is not retried",
        release(),
        ModelReleaseStatus(stable_version="2", resolved_version="3", conditions=ROLLED_BACK),
        APPROVED_3,
        rs("2"),
        "Available",
        [],
    ),
    (
        "a newer version after a rollback is tried",
        release(),
        ModelReleaseStatus(stable_version="2", resolved_version="3", conditions=ROLLED_BACK),
        Resolution(version="4"),
        rs("2"),
        "Progressing",
        [Deploy("4")],
    ),
    (
        "unhealthy with nothing to roll back to",
        release(),
        ModelReleaseStatus(resolved_version="3"),
        APPROVED_3,
        rs("3", healthy=False, age=601),
        "Degraded",
        [],
    ),
    (
        "paused changes nothing",
        release(paused=True),
        ModelReleaseStatus(stable_version="2"),
        APPROVED_3,
        rs("2"),
        "Paused",
        [],
    ),
]


@pytest.mark.parametrize("name,rel,st,res,view,phase,actions", CASES, ids=[c[0] for c in CASES])
def test_transitions(name, rel, st, res, view, phase, actions):
    st = st.model_copy(update={"observed_generation": 3})
    plan = reconcile(rel, status=st, observed=Observed(now=NOW, resolution=res, deployment=view), generation=4)
    assert plan.status.phase == phase, plan.status.message
    assert plan.actions == actions
    # Generation 4 is observed once it is applied: served, refused, or settled; not while rolling out.
    rolling = bool(actions) or phase == "Progressing"
    assert plan.status.observed_generation == (3 if rolling else 4)


def test_status_says_what_it_waits_for_and_tracks_stable_versions():
    plan = reconcile(
        release(), status=ModelReleaseStatus(), observed=Observed(now=NOW, resolution=UNAPPROVED_3), generation=1
    )
    assert "tag review=approved" in plan.status.message
    approved = next(c for c in plan.status.conditions if c.type == "Approved")
    assert approved.status == "False" and "review=approved" in approved.message
    healthy = reconcile(
        release(),
        status=ModelReleaseStatus(stable_version="2"),
        observed=Observed(now=NOW, resolution=APPROVED_3, deployment=rs("3")),
        generation=1,
    )
    assert (healthy.status.stable_version, healthy.status.previous_stable_version) == ("3", "2")
    assert healthy.status.url == "http://fim-debug-serve-svc.team.svc.cluster.local:8000"


def test_a_version_below_min_metrics_is_not_promoted_and_the_condition_names_the_metric():
    below = Resolution(version="3", unmet=("metric humaneval-single-line/pass@1 >= 0.05 (is 0.02)",))
    plan = reconcile(
        release(),
        status=ModelReleaseStatus(stable_version="2"),
        observed=Observed(now=NOW, resolution=below, deployment=rs("2")),
        generation=1,
    )
    assert plan.actions == []  # version 2 keeps serving
    approved = next(c for c in plan.status.conditions if c.type == "Approved")
    assert (approved.status, approved.reason) == ("False", "BelowMinMetrics")
    assert "humaneval-single-line/pass@1 >= 0.05 (is 0.02)" in approved.message
    above = reconcile(
        release(),
        status=ModelReleaseStatus(stable_version="2"),
        observed=Observed(now=NOW, resolution=APPROVED_3, deployment=rs("2")),
        generation=1,
    )
    assert above.actions == [Deploy("3")]


def test_a_failed_load_is_degraded_then_rolled_back_naming_why():
    failed = reconcile(
        release(),
        status=ModelReleaseStatus(stable_version="2", resolved_version="3", observed_generation=1),
        observed=Observed(now=NOW, resolution=APPROVED_3, deployment=rs("3", healthy=False, failed="bad header")),
        generation=2,
    )
    conditions = {c.type: c for c in failed.status.conditions}
    assert (conditions["Degraded"].status, conditions["Degraded"].reason) == ("True", "LoadFailed")
    assert (conditions["RolledBack"].status, conditions["RolledBack"].reason) == ("True", "LoadFailed")
    assert "version 3 failed to load: bad header" in failed.status.message
    assert "rolling back to version 2" in failed.status.message
    assert failed.status.observed_generation == 1  # the rollback still rolls
    # Version 2 is deployed again and its endpoint reports it: Available, RolledBack stays to say why.
    back = reconcile(
        release(),
        status=failed.status,
        observed=Observed(now=NOW, resolution=APPROVED_3, deployment=rs("2", generation=2)),
        generation=2,
    )
    conditions = {c.type: c for c in back.status.conditions}
    assert back.status.phase == "Available" and back.actions == []
    assert back.status.stable_version == "2" and back.status.observed_generation == 2
    assert conditions["RolledBack"].status == "True" and conditions["Degraded"].status == "False"


def test_a_spec_edit_is_observed_only_once_rolled_out():
    """observedGeneration stays at the served generation while the edit rolls; Progressing says what."""
    old = ModelReleaseStatus(stable_version="3", resolved_version="3", observed_generation=1)
    edited = reconcile(
        release(),
        status=old,
        observed=Observed(now=NOW, resolution=APPROVED_3, deployment=rs("3", generation=1)),
        generation=2,
    )
    progressing = next(c for c in edited.status.conditions if c.type == "Progressing")
    assert edited.actions == [Deploy("3")] and (progressing.status, progressing.reason) == ("True", "SpecChanged")
    assert edited.status.observed_generation == 1
    rolling = reconcile(
        release(),
        status=edited.status,
        observed=Observed(now=NOW, resolution=APPROVED_3, deployment=rs("3", generation=2, healthy=False)),
        generation=2,
    )
    assert rolling.status.phase == "Progressing" and rolling.status.observed_generation == 1
    done = reconcile(
        release(),
        status=rolling.status,
        observed=Observed(now=NOW, resolution=APPROVED_3, deployment=rs("3", generation=2)),
        generation=2,
    )
    progressing = next(c for c in done.status.conditions if c.type == "Progressing")
    assert done.status.phase == "Available" and done.status.observed_generation == 2
    assert (progressing.status, progressing.reason) == ("False", "Complete")
