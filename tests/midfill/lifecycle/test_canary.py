"""The canary part of the ModelRelease state machine, pure: every transition of a Canary rollout."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import pytest

from midfill.api import load_file
from midfill.api.modelrelease import CanaryNumbers, CanarySpec, CanaryStatus, ModelReleaseStatus
from midfill.lifecycle.canary import Split, breach, split_from_health
from midfill.lifecycle.clock import fmt_time
from midfill.lifecycle.modelrelease import Deploy, DeploymentView, Observed, Resolution, reconcile

SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "modelrelease.yaml"
NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
APPROVED_3 = Resolution(version="3")


def release(**canary):
    (rel,) = load_file(SAMPLE)
    rel.spec.rollout.strategy = "Canary"
    rel.spec.rollout.canary_steps = [10, 50, 100]
    rel.spec.rollout.canary = CanarySpec(
        step_seconds=60, min_requests=10, max_error_rate=0.05, max_p95_latency_ms=2000, **canary
    )
    return rel


def numbers(requests=50, errors=0, p95=300.0, stops=0.9, tokens=12.0):
    return {
        "requests": requests,
        "errors": errors,
        "p95_latency_ms": p95,
        "own_stop_rate": stops,
        "mean_completion_tokens": tokens,
    }


def dep(canary=None, weight=0, served_weight=None, ready=True, canary_numbers=None, age=5, failed=None):
    """The endpoint: stable 2 served, with `canary` at `weight` (the router reports served_weight)."""
    health = {
        "versions": {"2": numbers(), **({canary: canary_numbers or numbers()} if canary else {})},
        "canary": {"version": canary, "weight": weight if served_weight is None else served_weight, "ready": ready},
    }
    return DeploymentView(
        version="2",
        rollout_start=NOW - dt.timedelta(seconds=age),
        healthy=True,
        health="application infill: RUNNING",
        url="http://x:8000",
        served="2",
        failed=failed,
        canary=canary,
        canary_weight=weight,
        split=split_from_health(health),
    )


def running(step=0, weight=10, held=0):
    return CanaryStatus(version="3", step=step, weight=weight, step_started=fmt_time(NOW - dt.timedelta(seconds=held)))


def status(canary=None, **extra):
    return ModelReleaseStatus(stable_version="2", resolved_version="3", canary=canary, **extra)


def run(rel, st, view, res=APPROVED_3):
    return reconcile(rel, status=st, observed=Observed(now=NOW, resolution=res, deployment=view), generation=None)


def conditions(plan):
    return {c.type: c for c in plan.status.conditions}


def test_a_new_approved_version_starts_at_the_first_step_beside_the_stable_one():
    plan = run(release(), status(), dep())
    assert plan.actions == [Deploy("2", canary="3", weight=10, router=True)]
    assert plan.status.canary is not None
    assert (plan.status.canary.version, plan.status.canary.step, plan.status.canary.weight) == ("3", 0, 10)
    assert plan.status.canary.step_started == fmt_time(NOW)
    assert plan.status.phase == "Progressing" and plan.status.stable_version == "2"
    assert conditions(plan)["Progressing"].reason == "CanaryStarted"


def test_the_first_deployment_has_no_canary():
    plan = run(release(), ModelReleaseStatus(), None)
    assert plan.actions == [Deploy("3", router=True)] and plan.status.canary is None


def test_a_step_is_held_until_its_time_is_up_and_records_the_numbers():
    plan = run(release(), status(running(held=30)), dep("3", 10))
    assert plan.actions == [] and plan.status.phase == "Progressing"
    canary = plan.status.canary
    assert canary is not None and canary.canary_numbers is not None and canary.stable_numbers is not None
    assert (canary.canary_numbers.requests, canary.canary_numbers.error_rate) == (50, 0.0)
    assert "within thresholds after 30s of 60s" in (canary.verdict or "")


def test_a_step_within_thresholds_advances_after_its_hold_time():
    plan = run(release(), status(running(held=61)), dep("3", 10))
    assert plan.actions == [Deploy("2", canary="3", weight=50, router=True)]
    canary = plan.status.canary
    assert canary is not None and (canary.step, canary.weight, canary.state) == (1, 50, "Running")
    assert canary.step_started == fmt_time(NOW)
    assert conditions(plan)["Progressing"].reason == "CanaryStepped"


def test_a_step_with_too_few_canary_requests_is_held_past_its_time():
    plan = run(release(), status(running(held=600)), dep("3", 10, canary_numbers=numbers(requests=3)))
    assert plan.actions == [] and "3 of 10 canary requests" in (plan.status.canary.verdict or "")


def test_the_last_step_passed_promotes_the_canary_then_it_becomes_stable():
    plan = run(release(), status(running(step=2, weight=100, held=61)), dep("3", 100))
    # The stable slot rolls to 3 while the canary keeps 100%: no editor goes back to 2.
    assert plan.actions == [Deploy("3", canary="3", weight=100, router=True)]
    assert plan.status.canary is not None and plan.status.canary.state == "Promoted"
    assert conditions(plan)["Progressing"].reason == "CanaryPromoted"
    handing = DeploymentView(
        version="3",
        rollout_start=NOW,
        healthy=True,
        health="ok",
        url="http://x:8000",
        served="2",
        canary="3",
        canary_weight=100,
    )
    waiting = run(release(), plan.status, handing)
    assert waiting.actions == [] and waiting.status.phase == "Progressing" and waiting.status.stable_version == "2"
    draining = run(release(), waiting.status, replace(handing, served="3"))
    assert draining.actions == [Deploy("3", canary="3", weight=0, router=True)]  # the stable slot serves 3
    router_at_zero = replace(handing, served="3", canary_weight=0, split=Split(canary="3", weight=0))
    handed = run(release(), draining.status, router_at_zero)
    assert handed.actions == [Deploy("3", router=True)]  # the router sends nothing to the canary: it goes
    assert conditions(handed)["Progressing"].reason == "CanaryHandedOver"
    # The stable slot now serves 3 (no canary): it is the stable version, 2 the previous one.
    promoted = replace(handing, served="3", canary=None, canary_weight=0)
    done = run(release(), handed.status, promoted)
    assert done.actions == [] and done.status.phase == "Available"
    assert (done.status.stable_version, done.status.previous_stable_version) == ("3", "2")


@pytest.mark.parametrize(
    ("canary_numbers", "words"),
    [
        (numbers(errors=5), "error rate 0.1 > maxErrorRate 0.05 over 50 canary requests"),
        (numbers(p95=2500), "p95 latency (ms) 2500 > maxP95LatencyMs 2000"),
    ],
)
def test_a_breach_rolls_the_canary_back_to_zero_naming_the_number(canary_numbers, words):
    plan = run(release(), status(running(held=10)), dep("3", 10, canary_numbers=canary_numbers))
    assert plan.actions == [Deploy("2", canary="3", weight=0, router=True)]  # 0% first, 2 takes 100%
    canary = plan.status.canary
    assert canary is not None and (canary.state, canary.weight) == ("RolledBack", 0)
    assert plan.status.phase == "Degraded" and words in (plan.status.message or "")
    rolled = conditions(plan)["RolledBack"]
    assert (rolled.status, rolled.reason) == ("True", "CanaryThresholdBreached") and words in rolled.message
    # Once the router sends nothing to 3, its deployment goes.
    zero = run(release(), plan.status, dep("3", 0))
    assert zero.actions == [Deploy("2", router=True)]
    # The stable version serves alone again: Available, the canary version is not retried.
    back = run(release(), zero.status, dep())
    assert back.actions == [] and back.status.phase == "Available" and back.status.stable_version == "2"
    assert conditions(back)["RolledBack"].status == "True"


def test_own_stop_rate_and_completion_length_thresholds():
    spec = CanarySpec(min_requests=10, min_own_stop_rate=0.5, max_mean_completion_tokens=40)
    low_stops = CanaryNumbers(requests=20, own_stop_rate=0.2, mean_completion_tokens=10)
    assert "own-stop rate 0.2 < minOwnStopRate 0.5" in (breach(spec, low_stops) or "")
    long = CanaryNumbers(requests=20, own_stop_rate=0.9, mean_completion_tokens=90)
    assert "mean completion tokens 90 > maxMeanCompletionTokens 40" in (breach(spec, long) or "")
    assert breach(spec, CanaryNumbers(requests=5, own_stop_rate=0.0)) is None  # too few to judge


def test_a_canary_that_fails_to_load_rolls_back_at_once():
    plan = run(release(), status(running()), dep("3", 10, ready=False, failed="bad header"))
    assert plan.actions == [Deploy("2", canary="3", weight=0, router=True)]
    assert conditions(plan)["RolledBack"].reason == "LoadFailed"


def test_a_canary_not_served_within_the_deadline_rolls_back_and_waits_before():
    waiting = run(release(), status(running()), dep("3", 10, ready=False, age=30))
    assert waiting.actions == [] and waiting.status.phase == "Progressing"
    late = run(release(), status(running()), dep("3", 10, ready=False, age=601))
    assert late.actions == [Deploy("2", canary="3", weight=0, router=True)]
    assert conditions(late)["RolledBack"].reason == "HealthDeadlineExceeded"


def test_numbers_are_judged_only_once_the_endpoint_routes_the_current_weight():
    # The router still reports the previous step's 10%: its numbers belong to that step.
    plan = run(release(), status(running(step=1, weight=50, held=61)), dep("3", 50, served_weight=10))
    assert plan.actions == [] and plan.status.canary.canary_numbers is None


def test_a_deployment_that_lost_its_canary_is_redeployed_with_the_current_step():
    plan = run(release(), status(running(step=1, weight=50)), dep())
    assert plan.actions == [Deploy("2", canary="3", weight=50, router=True)]


def test_another_version_replaces_a_running_canary():
    plan = run(release(), status(running(step=1, weight=50)), dep("3", 50), res=Resolution(version="4"))
    assert plan.actions == [Deploy("2", canary="4", weight=10, router=True)]
    assert plan.status.canary is not None and plan.status.canary.version == "4"


def test_a_stale_canary_is_removed_when_the_target_is_the_stable_version():
    plan = run(release(), status(), dep("3", 10), res=Resolution(version="2"))
    assert plan.actions == [Deploy("2", canary="3", weight=0, router=True)]
    waiting = run(release(), status(), dep("3", 0, served_weight=10), res=Resolution(version="2"))
    assert waiting.actions == []  # the router still routes 10% there: wait
    assert run(release(), status(), dep("3", 0), res=Resolution(version="2")).actions == [Deploy("2", router=True)]


def test_in_place_keeps_rolling_the_whole_version():
    rel = release()
    rel.spec.rollout.strategy = "InPlace"
    plan = run(rel, status(), dep())
    assert plan.actions == [Deploy("3")] and plan.status.canary is None


def test_split_from_health_ignores_an_endpoint_without_a_split():
    assert split_from_health(None) is None
    assert split_from_health({"status": "ok", "version": "2"}) is None
    assert split_from_health({"versions": {}}) == Split()
