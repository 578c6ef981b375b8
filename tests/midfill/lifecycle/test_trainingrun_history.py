"""The TrainingRun machine's bookkeeping of attempts (issue 22): truthful progress across restarts,
PodsReady after a Kueue re-suspension, attempt history, ended MLflow runs, pruning old attempts."""

from __future__ import annotations

import datetime as dt

from midfill.api.trainingrun import AttemptRecord, CheckpointRef, Progress
from midfill.lifecycle.trainingrun import DeleteAttempt, EndRun, Observed, PruneAttempt, StartAttempt, reconcile
from midfill.progress import ProgressRecord
from tests.midfill.lifecycle.test_trainingrun import FAILED, NOW, cond, job, run, status


def test_new_attempt_reports_the_resumed_step_not_zero():
    before = status(
        attempt=2,
        phase="Running",
        conditions=[cond("PodsReady")],
        progress=Progress(step=140, loss=2.0, update_time="2026-01-01T11:50:00Z"),
        last_checkpoint=CheckpointRef(uri="/ck/step-00000100", step=100),
    )
    # Attempt 2's MLflow run exists but has logged nothing yet.
    fresh = ProgressRecord(step=0, attempt=2, mlflow_run_id="r2")
    plan = reconcile(
        run(), status=before, observed=Observed(now=NOW, jobs={2: job(2, ready=1)}, progress=fresh), generation=1
    )
    assert plan.status.progress.step == 100  # resumes from the checkpoint at 100
    assert plan.status.progress.loss == 2.0 and plan.status.progress.update_time == "2026-01-01T11:50:00Z"
    # With resume: none the attempt starts over: 0 is the truth then.
    plan = reconcile(
        run(checkpoint__resume="none"),
        status=before,
        observed=Observed(now=NOW, jobs={2: job(2, ready=1)}, progress=fresh),
        generation=1,
    )
    assert plan.status.progress.step == 0


def test_checkpoint_and_update_time_come_from_the_report():
    rec = ProgressRecord(
        step=60,
        attempt=1,
        mlflow_run_id="r1",
        update_time="2026-01-01T11:59:00Z",
        checkpoint_uri="s3://b/ck/step-00000050",
        checkpoint_step=50,
        checkpoint_time="2026-01-01T11:58:00Z",
    )
    plan = reconcile(
        run(),
        status=status(phase="Running"),
        observed=Observed(now=NOW, jobs={1: job(ready=1)}, progress=rec),
        generation=1,
    )
    assert plan.status.last_checkpoint == CheckpointRef(
        uri="s3://b/ck/step-00000050", step=50, time="2026-01-01T11:58:00Z"
    )
    assert plan.status.progress.update_time == "2026-01-01T11:59:00Z"
    assert plan.status.attempts == [AttemptRecord(attempt=1, job_name="fim-debug-a1", mlflow_run_id="r1")]


def test_kueue_resuspension_resets_pods_ready_and_the_startup_timeout_applies_again():
    queued = run(scheduling__queue_name="q", scheduling__startup_timeout_seconds=600)
    running = status(phase="Running", conditions=[cond("PodsReady", reason="AllPodsReady")])
    plan = reconcile(queued, status=running, observed=Observed(now=NOW, jobs={1: job(suspended=True)}), generation=1)
    assert plan.status.phase == "Queued"
    ready = next(c for c in plan.status.conditions if c.type == "PodsReady")
    assert (ready.status, ready.reason) == ("False", "Suspended")
    # Re-admitted 20 minutes ago and still no pod ready: the startup timeout fires again.
    readmitted = job(ready=0, start_time=NOW - dt.timedelta(minutes=20))
    plan = reconcile(queued, status=plan.status, observed=Observed(now=NOW, jobs={1: readmitted}), generation=1)
    assert plan.status.phase == "Restarting" and plan.actions[:2] == [
        DeleteAttempt("fim-debug-a1"),
        StartAttempt(2, None),
    ]
    assert plan.status.attempts[0].outcome == "Failed" and plan.status.attempts[0].reason == "StartupTimeout"


def test_failed_and_superseded_attempts_get_their_mlflow_runs_ended():
    plan = reconcile(
        run(),
        status=status(phase="Running", conditions=[cond("PodsReady")]),
        observed=Observed(now=NOW, jobs={1: job(**FAILED)}, open_runs={1: "r1"}),
        generation=1,
    )
    assert EndRun(1, "r1", "FAILED") in plan.actions and StartAttempt(2, None) in plan.actions
    assert [(r.attempt, r.outcome, r.mlflow_run_id) for r in plan.status.attempts] == [
        (1, "Failed", "r1"),
        (2, None, None),
    ]
    # The next sync: attempt 2 trains, attempt 1's run is still RUNNING (MLflow was down): ended again.
    later = reconcile(
        run(),
        status=plan.status,
        observed=Observed(now=NOW, jobs={2: job(2, ready=1)}, open_runs={1: "r1", 2: "r2"}),
        generation=1,
    )
    assert later.actions == [EndRun(1, "r1", "FAILED")]  # attempt 2 is training: its run stays open
    # Nothing open any more: nothing to do (idempotent).
    assert (
        reconcile(
            run(), status=later.status, observed=Observed(now=NOW, jobs={2: job(2, ready=1)}), generation=1
        ).actions
        == []
    )


def test_suspend_kills_the_attempts_run_and_unknown_older_attempts_count_as_superseded():
    plan = reconcile(
        run(suspend=True),
        status=status(attempt=3, phase="Running", conditions=[cond("PodsReady")]),
        observed=Observed(now=NOW, jobs={3: job(3, ready=1)}, open_runs={3: "r3", 1: "r1"}),
        generation=1,
    )
    assert plan.status.phase == "Suspended"
    assert set(plan.actions) == {DeleteAttempt("fim-debug-a3"), EndRun(3, "r3", "KILLED"), EndRun(1, "r1", "KILLED")}
    ready = next(c for c in plan.status.conditions if c.type == "PodsReady")
    assert ready.status == "False"


def test_only_the_newest_attempts_are_kept():
    st = status(attempt=5, phase="Running", conditions=[cond("PodsReady")])
    observed = Observed(now=NOW, jobs={5: job(5, ready=1)}, retained=(1, 2, 3, 4))
    plan = reconcile(run(), status=st, observed=observed, generation=1, keep_attempts=3)
    assert [a for a in plan.actions if isinstance(a, PruneAttempt)] == [
        PruneAttempt(1, "fim-debug-a1"),
        PruneAttempt(2, "fim-debug-a2"),
    ]
    plan = reconcile(run(), status=st, observed=observed, generation=1, keep_attempts=1)
    assert len([a for a in plan.actions if isinstance(a, PruneAttempt)]) == 4
