"""TrainingRun handlers, issue 22: truthful progress, PodsReady after a Kueue re-suspension, old
attempts pruned with their pointers kept, and the MLflow runs of failed attempts ended.

The operator runs for real against the emulator over HTTP with MLflow on SQLite; the tests play the
Job controller (Job status), Kueue (Job spec.suspend) and the trainer (MLflow runs and metrics,
logged as trainer/job.py logs them).
"""

from __future__ import annotations

import datetime as dt

from midfill.progress import RUN_TAG_ATTEMPT, RUN_TAG_CHECKPOINT, RUN_TAG_UID
from midfill.registry import Registry
from tests.operators.emulator import eventually
from tests.operators.trainingrun.test_handlers import condition, phase, training_run

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z in MLflow's milliseconds
FAILED_JOB = {
    "status": {
        "active": 0,
        "ready": 0,
        "failed": 1,
        "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "backoff limit"}
        ],
    }
}


def status(cluster, name: str) -> dict:
    return (cluster.get("trainingruns", name) or {}).get("status") or {}


def mlflow_attempt(client, exp: str, uid: str, attempt: int) -> str:
    """The MLflow run the trainer creates for an attempt."""
    return client.create_run(exp, tags={RUN_TAG_UID: uid, RUN_TAG_ATTEMPT: str(attempt)}).info.run_id


async def test_progress_history_ended_runs_and_pruning(cluster, operator, tracking_uri):
    client = Registry(tracking_uri).client
    exp = client.create_experiment("midfill")
    async with operator(keep_attempts=1):
        await cluster.create(training_run("hist"))
        await eventually(lambda: cluster.get("jobs", "hist-a1"), what="Job hist-a1", timeout=60)
        uid = cluster.get("trainingruns", "hist")["metadata"]["uid"]
        await cluster.patch("jobs", "hist-a1", {"status": {"active": 1, "ready": 1}}, "status")
        # The trainer logs, then commits a checkpoint at step 40 (metric + tag), 5 s later.
        run1 = mlflow_attempt(client, exp, uid, 1)
        for key, value in {"step": 40, "loss": 3.5, "tokens_per_second": 1000.0}.items():
            client.log_metric(run1, key, value, timestamp=T0, step=40)
        client.set_tag(run1, RUN_TAG_CHECKPOINT, "/checkpoints/team/fim/step-00000040")
        client.log_metric(run1, "checkpoint_step", 40, timestamp=T0 + 5000, step=40)
        st = await eventually(
            lambda: (s := status(cluster, "hist")).get("lastCheckpoint") and s, what="lastCheckpoint", timeout=60
        )
        assert st["lastCheckpoint"] == {
            "uri": "/checkpoints/team/fim/step-00000040",
            "step": 40,
            "time": "2026-01-01T12:00:05Z",
        }
        assert st["progress"]["updateTime"] == "2026-01-01T12:00:05Z"  # the newest metric, not the run's start
        assert st["attempts"] == [{"attempt": 1, "jobName": "hist-a1", "mlflowRunId": run1}]

        # Attempt 1 fails: its MLflow run (left RUNNING by the killed trainer) is ended as FAILED.
        await cluster.patch("jobs", "hist-a1", FAILED_JOB, "status")
        await eventually(lambda: cluster.get("jobs", "hist-a2"), what="Job hist-a2", timeout=60)
        await eventually(
            lambda: client.get_run(run1).info.status == "FAILED", what="attempt 1's run FAILED", timeout=60
        )
        # Attempt 2 starts: its run exists but has logged nothing yet. The step stays at the
        # checkpoint it resumes from, not 0.
        run2 = mlflow_attempt(client, exp, uid, 2)
        await cluster.patch("jobs", "hist-a2", {"status": {"active": 1, "ready": 1}}, "status")
        st = await eventually(
            lambda: (s := status(cluster, "hist")).get("phase") == "Running" and len(s["attempts"]) == 2 and s,
            what="attempt 2 running",
        )
        await eventually(
            lambda: status(cluster, "hist")["attempts"][1].get("mlflowRunId") == run2,
            what="attempt 2's run",
            timeout=60,
        )
        assert status(cluster, "hist")["progress"]["step"] == 40

        # Attempt 2 fails too: with MIDFILL_KEEP_ATTEMPTS=1 only attempt 3's Job and ConfigMap stay,
        # and the status still says where attempts 1 and 2 logged.
        await cluster.patch("jobs", "hist-a2", FAILED_JOB, "status")
        await eventually(lambda: cluster.get("jobs", "hist-a3"), what="Job hist-a3", timeout=60)
        await eventually(
            lambda: cluster.names("jobs") == ["hist-a3"] and cluster.names("configmaps") == ["hist-a3"],
            what="attempts 1 and 2 pruned",
        )
        await eventually(
            lambda: client.get_run(run2).info.status == "FAILED", what="attempt 2's run FAILED", timeout=60
        )
        attempts = status(cluster, "hist")["attempts"]
        assert [(a["attempt"], a["jobName"], a.get("mlflowRunId"), a.get("outcome")) for a in attempts] == [
            (1, "hist-a1", run1, "Failed"),
            (2, "hist-a2", run2, "Failed"),
            (3, "hist-a3", None, None),
        ]


async def test_kueue_resuspension_resets_pods_ready_and_startup_timeout_applies(cluster, operator):
    doc = training_run("kueue")
    doc["spec"]["scheduling"] = {"queueName": "gpu", "startupTimeoutSeconds": 60}
    async with operator():
        await cluster.create(doc)
        job = await eventually(lambda: cluster.get("jobs", "kueue-a1"), what="Job kueue-a1", timeout=60)
        assert job["spec"]["suspend"] is True
        # Kueue admits the gang; all pods become ready.
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await cluster.patch("jobs", "kueue-a1", {"spec": {"suspend": False}})
        await cluster.patch("jobs", "kueue-a1", {"status": {"active": 1, "ready": 1, "startTime": now}}, "status")
        await eventually(lambda: phase(cluster, "kueue") == "Running", what="Running", timeout=60)
        # Kueue preempts the workload: the Job is suspended again and its pods are removed.
        await cluster.patch("jobs", "kueue-a1", {"spec": {"suspend": True}})
        await cluster.patch("jobs", "kueue-a1", {"status": {"active": 0, "ready": 0, "startTime": None}}, "status")
        run = await eventually(
            lambda: phase(cluster, "kueue") == "Queued" and cluster.get("trainingruns", "kueue"), what="Queued again"
        )
        assert condition(run, "PodsReady")["status"] == "False" and condition(run, "PodsReady")["reason"] == "Suspended"
        # Re-admitted two minutes ago, no pod ready since: the 60 s startup timeout applies again.
        earlier = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
        await cluster.patch("jobs", "kueue-a1", {"spec": {"suspend": False}})
        await cluster.patch("jobs", "kueue-a1", {"status": {"active": 1, "ready": 0, "startTime": earlier}}, "status")
        run = await eventually(
            lambda: (r := cluster.get("trainingruns", "kueue"))["status"]["attempt"] == 2 and r, what="attempt 2"
        )
        assert condition(run, "Restarting")["reason"] == "StartupTimeout"
