"""The TrainingRun state machine (midfill.lifecycle), table-driven and pure:
(spec, status, observed) -> phase, reason, actions."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from midfill.api import Condition, SpecError, TrainingRunStatus, load_file, parse_resource
from midfill.lifecycle.trainingrun import AttemptView, DeleteAttempt, Observed, StartAttempt, needs_resync, reconcile
from midfill.progress import ProgressRecord

SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "trainingrun-debug.yaml"
NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def run(**spec_changes):
    (r,) = load_file(SAMPLE)
    r.metadata.uid, r.metadata.generation = "u1", 1
    for path, value in spec_changes.items():
        obj = r.spec
        *parents, leaf = path.split("__")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    return r


def job(attempt=1, **kw) -> AttemptView:
    return AttemptView(attempt=attempt, name=f"fim-debug-a{attempt}", created=NOW - dt.timedelta(seconds=60), **kw)


def status(attempt=1, phase="Starting", restarts=0, conditions=(), **kw) -> TrainingRunStatus:
    return TrainingRunStatus(
        attempt=attempt,
        phase=phase,
        restart_count=restarts,
        conditions=list(conditions),
        start_time="2026-01-01T11:00:00Z" if attempt else None,
        **kw,
    )


def cond(type, value="True", reason="X"):
    return Condition(type=type, status=value, reason=reason)


FAILED = dict(outcome="Failed", reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit")
EXIT_78 = dict(
    outcome="Failed",
    exit_code=78,
    message="Container trainer for pod team/fim-debug-a1-0-x failed with exit code 78 matching FailJob rule at index 0",
)

CASES = [
    # id, run, status, jobs, expected phase, expected reason (condition type:reason) or None, actions
    ("new run starts attempt 1", run(), status(attempt=0, phase="Pending"), {}, "Starting", None, [StartAttempt(1)]),
    (
        "queued run starts as Queued",
        run(scheduling__queue_name="q"),
        status(attempt=0, phase="Pending"),
        {},
        "Queued",
        None,
        [StartAttempt(1)],
    ),
    (
        "Kueue has not admitted",
        run(scheduling__queue_name="q"),
        status(),
        {1: job(suspended=True)},
        "Queued",
        "Queued:WaitingForAdmission",
        [],
    ),
    ("pods not ready yet", run(), status(), {1: job(ready=0)}, "Starting", None, []),
    ("all pods ready", run(), status(), {1: job(ready=1)}, "Running", "PodsReady:AllPodsReady", []),
    (
        "failure within maxRestarts",
        run(),
        status(phase="Running"),
        {1: job(**FAILED)},
        "Restarting",
        "Restarting:AttemptFailed",
        [StartAttempt(2)],
    ),
    (
        "failure beyond maxRestarts",
        run(),
        status(attempt=4, restarts=3),
        {4: job(4, **FAILED)},
        "Failed",
        "Failed:MaxRestartsExceeded",
        [],
    ),
    (
        "non-retryable exit code",
        run(),
        status(phase="Running"),
        {1: job(**EXIT_78)},
        "Failed",
        "Failed:NonRetryableExitCode",
        [],
    ),
    (
        "job deadline",
        run(),
        status(phase="Running"),
        {1: job(outcome="Failed", reason="DeadlineExceeded")},
        "Failed",
        "Failed:DeadlineExceeded",
        [],
    ),
    (
        "startup timeout restarts",
        run(scheduling__startup_timeout_seconds=30),
        status(),
        {1: job(ready=0)},
        "Restarting",
        "Restarting:StartupTimeout",
        [DeleteAttempt("fim-debug-a1"), StartAttempt(2)],
    ),
    (
        "startup timeout does not apply once ready",
        run(scheduling__startup_timeout_seconds=30),
        status(conditions=[cond("PodsReady")]),
        {1: job(ready=0)},
        "Running",
        None,
        [],
    ),
    (
        "suspend deletes the active job",
        run(suspend=True),
        status(phase="Running"),
        {1: job(ready=1)},
        "Suspended",
        "Running:Suspended",
        [DeleteAttempt("fim-debug-a1")],
    ),
    (
        "resume starts a fresh attempt, not a restart",
        run(),
        status(phase="Suspended"),
        {1: job(deleting=True)},
        "Starting",
        None,
        [StartAttempt(2)],
    ),
    (
        "job deleted by someone counts as a failure",
        run(),
        status(phase="Running"),
        {},
        "Restarting",
        "Restarting:JobDeleted",
        [StartAttempt(2)],
    ),
    (
        "success",
        run(),
        status(phase="Running"),
        {1: job(outcome="Succeeded")},
        "Succeeded",
        "ModelRegistered:VersionNotFound",
        [],
    ),
    (
        "job created before a crash is adopted",
        run(),
        status(phase="Restarting", restarts=1, conditions=[cond("Restarting")]),
        {1: job(**FAILED), 2: job(2)},
        "Restarting",
        None,
        [],
    ),
    (
        "whole-run deadline",
        run(active_deadline_seconds=60),
        status(phase="Running"),
        {1: job(ready=1)},
        "Failed",
        "Failed:DeadlineExceeded",
        [DeleteAttempt("fim-debug-a1")],
    ),
    ("terminal runs stay put", run(), status(phase="Failed"), {1: job(**FAILED)}, "Failed", None, []),
]


@pytest.mark.parametrize("name,r,st,jobs,phase,reason,actions", CASES, ids=[c[0] for c in CASES])
def test_transitions(name, r, st, jobs, phase, reason, actions):
    plan = reconcile(r, status=st, observed=Observed(now=NOW, jobs=jobs), generation=1)
    assert plan.status.phase == phase, plan.status.message
    if reason:
        kind, want = reason.split(":")
        got = next(c for c in plan.status.conditions if c.type == kind)
        assert got.reason == want
    # Deadlines are recomputed per attempt; compare the kind and attempt only.
    assert [(type(a), getattr(a, "attempt", getattr(a, "name", None))) for a in plan.actions] == [
        (type(a), getattr(a, "attempt", getattr(a, "name", None))) for a in actions
    ]
    assert plan.status.observed_generation == 1


def test_restart_and_success_bookkeeping():
    plan = reconcile(
        run(), status=status(phase="Running"), observed=Observed(now=NOW, jobs={1: job(**FAILED)}), generation=1
    )
    assert plan.status.restart_count == 1 and plan.status.attempt == 2 and plan.status.active_job_name == "fim-debug-a2"
    assert "resumes from the latest checkpoint" in plan.status.message
    from midfill.api.trainingrun import RegisteredModelRef

    ref = RegisteredModelRef(name="fim-debug", version="7", uri="models:/fim-debug/7")
    done = reconcile(
        run(),
        status=plan.status,
        observed=Observed(now=NOW, jobs={2: job(2, outcome="Succeeded")}, registered=ref),
        generation=1,
    )
    assert done.status.phase == "Succeeded" and done.status.registered_model == ref and done.status.completion_time
    assert not needs_resync(done.status.to_wire())
    assert needs_resync(plan.status.to_wire())


def test_progress_and_remaining_deadline():
    rec = ProgressRecord(step=50, loss=2.5, tokens_per_second=900.0, checkpoint_uri="/ck/step-50", checkpoint_step=50)
    resource = run(active_deadline_seconds=7200)
    plan = reconcile(
        resource,
        status=status(phase="Running", restarts=0),
        observed=Observed(now=NOW, jobs={1: job(**FAILED)}, progress=rec),
        generation=1,
    )
    # total_steps comes from the spec when the record has none (the sample's training.steps)
    assert plan.status.progress.step == 50
    assert plan.status.progress.total_steps == resource.spec.training.total_steps()
    assert plan.status.last_checkpoint.step == 50
    (start,) = plan.actions
    assert start.active_deadline_seconds == 3600  # started 11:00, limit 2 h, now 12:00


def test_invalid_spec_fails_then_recovers_on_fix():
    doc = run().model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["parallelism"]["numNodes"] = 0
    with pytest.raises(SpecError) as err:
        parse_resource(doc)
    plan = reconcile(
        err.value, status=status(phase="Running"), observed=Observed(now=NOW, jobs={1: job()}), generation=2
    )
    assert plan.status.phase == "Failed" and "spec.parallelism.numNodes" in plan.status.message
    assert plan.actions == [DeleteAttempt("fim-debug-a1")]
    failed = next(c for c in plan.status.conditions if c.type == "Failed")
    assert failed.reason == "InvalidSpec"
    fixed = reconcile(run(), status=plan.status, observed=Observed(now=NOW, jobs={1: job(deleting=True)}), generation=3)
    assert fixed.status.phase == "Starting" and fixed.actions == [StartAttempt(2, None)]


def test_unchanged_world_gives_unchanged_status():
    first = reconcile(run(), status=status(), observed=Observed(now=NOW, jobs={1: job(ready=1)}), generation=1)
    later = reconcile(
        run(),
        status=first.status,
        observed=Observed(now=NOW + dt.timedelta(minutes=5), jobs={1: job(ready=1)}),
        generation=1,
    )
    assert later.status == first.status and later.actions == []


def test_a_restart_whose_status_was_lost_still_counts_against_the_budget():
    """A crash between starting attempt 2 (a restart) and writing the status leaves status at attempt 1
    with no restart counted. Adopting attempt 2 must count that restart, or attempt 2's failure
    would start an attempt 3 beyond failurePolicy.maxRestarts (found by the operator chaos test)."""
    lost = status(phase="Running", conditions=[cond("PodsReady", "True", "AllPodsReady")])
    r = run(failure_policy__max_restarts=1)
    adopted = reconcile(
        r, status=lost, observed=Observed(now=NOW, jobs={1: job(**FAILED), 2: job(2, ready=1)}), generation=1
    )
    assert adopted.status.attempt == 2 and adopted.status.restart_count == 1 and adopted.actions == []
    assert adopted.status.attempts[0].outcome == "Failed"
    failed = reconcile(r, status=adopted.status, observed=Observed(now=NOW, jobs={2: job(2, **FAILED)}), generation=1)
    assert failed.status.phase == "Failed" and not any(isinstance(a, StartAttempt) for a in failed.actions)
    assert next(c for c in failed.status.conditions if c.type == "Failed").reason == "MaxRestartsExceeded"


def test_an_attempt_started_by_a_resume_whose_status_was_lost_is_not_a_restart():
    suspended = status(phase="Suspended")
    adopted = reconcile(run(), status=suspended, observed=Observed(now=NOW, jobs={2: job(2)}), generation=1)
    assert adopted.status.attempt == 2 and adopted.status.restart_count == 0
