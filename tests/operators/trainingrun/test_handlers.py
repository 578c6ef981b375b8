"""TrainingRun handlers end to end: kopf + the operator against the Kubernetes emulator, MLflow on SQLite.

The tests play the Job controller's part (they write Job status as it would) and the trainer's
(they log progress and register a version in MLflow, tagged as the trainer does).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from midfill.progress import RUN_TAG_ATTEMPT, RUN_TAG_UID
from midfill.registry import Registry
from tests.operators.emulator import eventually

SAMPLE = Path(__file__).resolve().parents[3] / "manifests" / "samples" / "trainingrun-debug.yaml"
SAMPLE_STEPS = yaml.safe_load(SAMPLE.read_text())["spec"]["training"]["steps"]


def training_run(name: str = "fim") -> dict:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"] = {"name": name}
    return doc


def env(job: dict) -> dict[str, str]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def phase(cluster, name: str = "fim") -> str | None:
    run = cluster.get("trainingruns", name)
    return (run.get("status") or {}).get("phase") if run else None


def condition(obj: dict, type: str) -> dict:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type)


async def test_attempts_restart_succeed_register_and_cleanup(cluster, operator, tracking_uri, tmp_path):
    async with operator():
        await cluster.create(training_run())
        await eventually(lambda: cluster.get("jobs", "fim-a1"), what="Job fim-a1")
        assert cluster.get("services", "fim")["spec"]["publishNotReadyAddresses"] is True
        assert "trainingrun.yaml" in cluster.get("configmaps", "fim-a1")["data"]
        run = await eventually(lambda: cluster.get("trainingruns", "fim") if phase(cluster) == "Starting" else None)
        uid = run["metadata"]["uid"]
        job1 = cluster.get("jobs", "fim-a1")
        assert job1["metadata"]["ownerReferences"][0]["uid"] == uid
        assert job1["spec"]["template"]["spec"]["containers"][0]["args"][-4:] == ["--uid", uid, "--attempt", "1"]
        assert run["status"]["attempt"] == 1 and run["status"]["activeJobName"] == "fim-a1"

        # The trainer reports progress to MLflow; the operator copies it into status.
        client = Registry(tracking_uri).client
        exp = client.create_experiment("midfill")
        mlflow_run = client.create_run(exp, tags={RUN_TAG_UID: uid, RUN_TAG_ATTEMPT: "1"})
        for key, value in {"step": 40, "loss": 3.5, "tokens_per_second": 1234.0}.items():
            client.log_metric(mlflow_run.info.run_id, key, value, step=40)
        await cluster.patch(
            "jobs",
            "fim-a1",
            {"status": {"active": 1, "ready": 1, "startTime": job1["metadata"]["creationTimestamp"]}},
            "status",
        )
        run = await eventually(
            lambda: (
                (r := cluster.get("trainingruns", "fim"))["status"].get("progress", {}).get("step") == 40
                and r["status"]["phase"] == "Running"
                and r
            ),
            what="progress and Running",
        )
        assert run["status"]["progress"]["loss"] == 3.5 and run["status"]["progress"]["totalSteps"] == SAMPLE_STEPS
        assert condition(run, "PodsReady")["status"] == "True"

        # Attempt 1 dies (a node went away): attempt 2 resumes the whole gang from the same checkpoints.
        await cluster.patch(
            "jobs",
            "fim-a1",
            {
                "status": {
                    "active": 0,
                    "ready": 0,
                    "failed": 1,
                    "conditions": [
                        {
                            "type": "Failed",
                            "status": "True",
                            "reason": "BackoffLimitExceeded",
                            "message": "Job has reached the specified backoff limit",
                        }
                    ],
                }
            },
            "status",
        )
        job2 = await eventually(lambda: cluster.get("jobs", "fim-a2"), what="Job fim-a2")
        assert (
            env(job2)["MIDFILL_ATTEMPT"] == "2" and job2["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "2"
        )
        assert env(job2)["MIDFILL_CHECKPOINT_DIR"] == env(job1)["MIDFILL_CHECKPOINT_DIR"]
        assert env(job2)["PET_MASTER_ADDR"] == "fim-a2-0.fim"
        run = await eventually(lambda: (r := cluster.get("trainingruns", "fim"))["status"]["attempt"] == 2 and r)
        assert run["status"]["restartCount"] == 1 and condition(run, "Restarting")["reason"] == "AttemptFailed"

    # The operator is down while attempt 2 finishes and the trainer registers the model.
    await cluster.patch(
        "jobs",
        "fim-a2",
        {
            "status": {
                "succeeded": 1,
                "conditions": [
                    {
                        "type": "Complete",
                        "status": "True",
                        "reason": "CompletionsReached",
                        "message": "Reached expected number of succeeded pods",
                    }
                ],
            }
        },
        "status",
    )
    export = tmp_path / "export"
    export.mkdir()
    Registry(tracking_uri).register(name="fim-debug", source=str(export), run_uid=uid)

    async with operator():  # a restart mid-way: picks up where it was, creates nothing twice
        run = await eventually(
            lambda: (
                (r := cluster.get("trainingruns", "fim"))["status"]["phase"] == "Succeeded"
                and r["status"].get("registeredModel")
                and r
            ),
            what="Succeeded + registeredModel",
        )
        assert run["status"]["registeredModel"] == {"name": "fim-debug", "version": "1", "uri": "models:/fim-debug/1"}
        assert condition(run, "ModelRegistered")["status"] == "True"
        assert cluster.names("jobs") == ["fim-a1", "fim-a2"]
        assert len(Registry(tracking_uri).versions("fim-debug")) == 1
        assert len(cluster.history("jobs", "fim-a2")) == 2  # created once, then our status patch; never re-created

        await cluster.delete("trainingruns", "fim")
        await eventually(
            lambda: not cluster.names("jobs") and not cluster.names("services") and not cluster.names("configmaps"),
            what="children deleted",
        )
        assert cluster.get("trainingruns", "fim") is None


async def test_invalid_spec_fails_with_field_and_operator_keeps_running(cluster, operator):
    bad = training_run("broken")
    bad["spec"]["parallelism"]["numNodes"] = 0
    bad["spec"]["training"]["globalBatchTokens"] = 1000
    async with operator():
        await cluster.create(bad)
        run = await eventually(lambda: phase(cluster, "broken") == "Failed" and cluster.get("trainingruns", "broken"))
        failed = condition(run, "Failed")
        assert failed["reason"] == "InvalidSpec"
        assert "spec.parallelism.numNodes" in failed["message"] and "globalBatchTokens" in failed["message"]
        assert cluster.names("jobs") == []
        # The operator is still working: a good run next to it gets its Job.
        await cluster.create(training_run("good"))
        await eventually(lambda: cluster.get("jobs", "good-a1"), what="Job good-a1")
        # Fixing the broken spec resumes it.
        fixed = copy.deepcopy(training_run("broken")["spec"])
        await cluster.patch("trainingruns", "broken", {"spec": fixed})
        await eventually(lambda: cluster.get("jobs", "broken-a1"), what="Job broken-a1 after the fix")


async def test_pod_template_reaches_the_created_job(cluster, operator):
    doc = training_run()
    doc["spec"]["podTemplate"] = {
        "serviceAccountName": "fim-trainer",
        "envFrom": [{"secretRef": {"name": "s3-credentials"}}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "labels": {"team": "a"},
    }
    async with operator():
        await cluster.create(doc)
        job = await eventually(lambda: cluster.get("jobs", "fim-a1"), what="Job fim-a1")
    pod = job["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == "fim-trainer" and pod["metadata"]["labels"]["team"] == "a"
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "shared"}} in pod["spec"]["volumes"]
    for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        assert c["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]


async def test_multi_node_without_shared_checkpoints_fails_once_naming_the_fields(cluster, operator):
    doc = training_run("gang")
    doc["spec"]["parallelism"]["numNodes"] = 2
    async with operator():  # no checkpoint claim, no spec.checkpoint.uri: each pod would have its own folder
        await cluster.create(doc)
        run = await eventually(lambda: phase(cluster, "gang") == "Failed" and cluster.get("trainingruns", "gang"))
        failed = condition(run, "Failed")
        assert failed["reason"] == "InvalidSpec"
        assert "spec.parallelism.numNodes" in failed["message"] and "spec.checkpoint.uri" in failed["message"]
        assert cluster.names("jobs") == []
        # Pointing the checkpoints at object storage fixes it.
        await cluster.patch("trainingruns", "gang", {"spec": {"checkpoint": {"uri": "s3://bucket/gang"}}})
        await eventually(lambda: cluster.get("jobs", "gang-a1"), what="Job gang-a1 after the fix")
    async with operator(checkpoint_claim_name="ckpt"):  # the same spec, but the operator has a shared claim
        doc["metadata"]["name"] = "gang2"
        await cluster.create(doc)
        job = await eventually(lambda: cluster.get("jobs", "gang2-a1"), what="Job gang2-a1 with a shared claim")
    assert job["spec"]["completions"] == 2
