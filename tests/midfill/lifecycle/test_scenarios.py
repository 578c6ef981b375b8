"""The scenario table against the pure state machines: a simulated world and a clock that ticks a
second per pass, the machine's actions applied to it as an adapter would."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from midfill.api import parse_resource
from midfill.api.modelrelease import ModelReleaseStatus
from midfill.api.trainingrun import TrainingRunStatus
from midfill.lifecycle import modelrelease as mr
from midfill.lifecycle import trainingrun as tr
from tests.midfill.lifecycle.scenarios import RELEASES, TRAINING, ReleaseScenario, TrainingScenario, condition, merge

SAMPLES = Path(__file__).resolve().parents[3] / "manifests" / "samples"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _doc(sample: str, spec: dict, generation: int = 1) -> dict:
    doc = yaml.safe_load((SAMPLES / sample).read_text())
    doc["metadata"] = {"name": "fim", "namespace": "team", "uid": "u1", "generation": generation}
    doc["spec"] = merge(doc["spec"], spec)
    return doc


@pytest.mark.parametrize("sc", TRAINING, ids=[s.id for s in TRAINING])
def test_training_scenario(sc: TrainingScenario) -> None:
    run = parse_resource(_doc("trainingrun-debug.yaml", sc.spec))
    status, jobs, now = TrainingRunStatus(), {}, T0
    for _ in range(60):
        plan = tr.reconcile(run, status=status, observed=tr.Observed(now=now, jobs=dict(jobs)), generation=1)
        status = plan.status
        for action in plan.actions:
            if isinstance(action, tr.StartAttempt):
                jobs[action.attempt] = tr.AttemptView(
                    action.attempt, tr.attempt_name("fim", action.attempt), created=now
                )
            else:
                n = next(k for k, v in jobs.items() if v.name == action.name)
                jobs[n] = _replace(jobs[n], deleting=True)
        for n, view in list(jobs.items()):  # the world moves: each attempt does what the scenario says
            if view.outcome is None and not view.deleting and view.created != now:
                jobs[n] = _behave(view, sc.attempts[n - 1])
        if status.phase in tr.TERMINAL_PHASES:
            break
        now += dt.timedelta(seconds=1)
    wire = status.to_wire()
    assert status.phase == sc.phase, status.message
    assert condition(wire, sc.condition[0]) == sc.condition
    assert len(jobs) == sc.started
    assert not [v for v in jobs.values() if v.outcome is None and not v.deleting]  # nothing left running


def _replace(view, **changes):
    from dataclasses import replace

    return replace(view, **changes)


def _behave(view: tr.AttemptView, what: str) -> tr.AttemptView:
    if what == "hang":
        return _replace(view, ready=1)
    code = 78 if what == "exit78" else 1
    return _replace(view, outcome="Failed", exit_code=code, message=f"exit code {code}")


@pytest.mark.parametrize("sc", RELEASES, ids=[s.id for s in RELEASES])
def test_release_scenario(sc: ReleaseScenario) -> None:
    generation, spec = 1, sc.spec
    release = parse_resource(_doc("modelrelease.yaml", spec))
    status, dep, now, deployed = ModelReleaseStatus(), None, T0, []

    def settle(release, generation, ticks: int = 25) -> None:
        nonlocal status, dep, now
        for _ in range(ticks):
            now += dt.timedelta(seconds=1)
            if dep is not None:  # the runtime reports health for what it was told to serve
                # ... and its endpoint reports the version once loaded; a broken one never loads.
                healthy = sc.versions[int(dep.version) - 1] == "healthy" and now > dep.rollout_start
                broken = sc.versions[int(dep.version) - 1] == "broken" and now > dep.rollout_start
                dep = _replace(
                    dep,
                    healthy=healthy,
                    health="RUNNING" if healthy else "DEPLOY_FAILED",
                    served=dep.version if healthy else None,
                    failed="DEPLOY_FAILED: the model failed to load" if broken else None,
                )
            plan = mr.reconcile(
                release, status=status, observed=mr.Observed(now, resolution, dep), generation=generation
            )
            status = plan.status
            for action in plan.actions:
                deployed.append((action.version, generation))
                dep = mr.DeploymentView(action.version, now, False, "deploying", url="http://x", generation=generation)

    for version in sc.approve:
        resolution = mr.Resolution(version=version)
        settle(release, generation)
    if sc.edit:
        generation += 1
        release = parse_resource(_doc("modelrelease.yaml", merge(spec, sc.edit), generation))
        settle(release, generation)
        assert deployed[-1] == (sc.serving, generation)  # redeployed with the edited spec
    assert status.phase == sc.phase, status.message
    assert status.stable_version == sc.stable
    assert dep is not None and dep.version == sc.serving
    assert condition(status.to_wire(), sc.condition[0]) == sc.condition
