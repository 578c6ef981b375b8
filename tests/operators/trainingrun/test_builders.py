"""TrainingRun builders: the fields the issue asks for, and every object schema-valid on 1.30 and 1.35."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from torch.distributed.run import get_args_parser

from midfill.api import load_file
from operators.settings import OperatorSettings
from operators.trainingrun import builders
from tests.operators.validation import validate
from trainer.__main__ import parse_args as trainer_args

SAMPLES = Path(__file__).resolve().parents[3] / "manifests" / "samples"


@pytest.fixture
def big_run():
    (run,) = load_file(SAMPLES / "trainingrun-7b-flash.yaml")
    run.metadata.namespace, run.metadata.uid = "ml", "1234-uid"
    return run


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def env(job: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(job)["env"]}


def test_job_is_an_all_or_nothing_indexed_gang(big_run):
    settings = OperatorSettings(tracking_uri="http://mlflow:5000", checkpoint_claim_name="ckpt")
    job = builders.build_job(big_run, attempt=3, settings=settings, active_deadline_seconds=5000)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert job["metadata"]["name"] == "fim-7b-a3" and job["metadata"]["namespace"] == "ml"
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never" and pod["subdomain"] == "fim-7b"
    fail_check, fail, ignore = spec["podFailurePolicy"]["rules"]
    assert fail_check == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "check-config", "operator": "In", "values": [78]},
    }
    assert fail == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [78]}}
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    # Kueue: queue label, created suspended so the whole gang is admitted at once.
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-training" and spec["suspend"] is True
    assert spec["activeDeadlineSeconds"] == 5000
    assert pod["priorityClassName"] == "training-high"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == 8
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm == {"name": "dshm", "emptyDir": {"medium": "Memory"}}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(job)["volumeMounts"]
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "midfill.dev/v1alpha1",
            "kind": "TrainingRun",
            "name": "fim-7b",
            "uid": "1234-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def test_pods_run_torchrun_with_the_gang_environment(big_run):
    settings = OperatorSettings(tracking_uri="http://mlflow:5000")
    job = builders.build_job(big_run, attempt=2, settings=settings)
    c, e = container(job), env(job)
    assert c["command"] == ["python", "-m", "trainer.launch"]  # torchrun, keeping the trainer's exit 78
    assert c["args"] == [
        "-m",
        "trainer",
        "--run-file",
        "/etc/midfill/trainingrun.yaml",
        "--uid",
        "1234-uid",
        "--attempt",
        "2",
    ]
    # torchrun's own parser accepts them (an abbreviation such as --run is ambiguous to it and fails).
    parsed = get_args_parser().parse_args(c["args"])
    assert (
        parsed.module
        and parsed.training_script == "trainer"
        and parsed.training_script_args[:2] == ["--run-file", "/etc/midfill/trainingrun.yaml"]
    )
    # ... and the trainer's parser takes what torchrun hands on.
    assert trainer_args(parsed.training_script_args).run == "/etc/midfill/trainingrun.yaml"
    (check,) = job["spec"]["template"]["spec"]["initContainers"]
    assert check["name"] == "check-config" and check["image"] == c["image"]
    assert check["command"] == ["python"] and check["args"] == [
        "-m",
        "trainer",
        "--check",
        "--run-file",
        "/etc/midfill/trainingrun.yaml",
    ]
    assert {"name": "config", "mountPath": "/etc/midfill", "readOnly": True} in check["volumeMounts"]
    assert e["PET_NNODES"] == "4" and e["PET_NPROC_PER_NODE"] == "8"
    assert e["PET_NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert e["PET_MASTER_ADDR"] == "fim-7b-a2-0.fim-7b" and e["PET_MASTER_PORT"] == "29500"
    assert e["PET_RDZV_ID"] == "1234-uid-a2"
    assert (
        e["MIDFILL_TRACKING_URI"] == "http://mlflow:5000"
        and e["MIDFILL_RUN_UID"] == "1234-uid"
        and e["MIDFILL_ATTEMPT"] == "2"
    )
    assert "MIDFILL_CHECKPOINT_DIR" not in e  # spec.checkpoint.uri (s3://) is used by the trainer itself
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/midfill"
    assert (
        next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")["configMap"]["name"]
        == "fim-7b-a2"
    )


def test_config_map_holds_the_run_and_service_is_headless(big_run):
    cm = builders.build_config_map(big_run, attempt=1)
    doc = yaml.safe_load(cm["data"]["trainingrun.yaml"])
    assert doc["metadata"]["uid"] == "1234-uid" and doc["spec"]["parallelism"]["numNodes"] == 4
    (reloaded,) = [__import__("midfill.api", fromlist=["parse_resource"]).parse_resource(doc)]
    assert reloaded.spec == big_run.spec
    svc = builders.build_service(big_run, settings=OperatorSettings())
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"midfill.dev/training-run": "fim-7b"}


def test_checkpoints_on_a_shared_claim_are_the_same_for_every_attempt():
    (run,) = load_file(SAMPLES / "trainingrun-debug.yaml")
    run.metadata.namespace = "team"
    settings = OperatorSettings(checkpoint_claim_name="ckpt")
    dirs = {env(builders.build_job(run, attempt=n, settings=settings))["MIDFILL_CHECKPOINT_DIR"] for n in (1, 2, 3)}
    assert dirs == {"/checkpoints/team/fim-debug"}
    job = builders.build_job(run, attempt=1, settings=settings)
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt"}} in job["spec"]["template"]["spec"][
        "volumes"
    ]
    assert job["spec"]["suspend"] is False and "activeDeadlineSeconds" not in job["spec"]


@pytest.mark.parametrize("sample", ["trainingrun-debug.yaml", "trainingrun-7b-flash.yaml"])
def test_every_object_is_valid_kubernetes(sample):
    (run,) = load_file(SAMPLES / sample)
    run.metadata.namespace, run.metadata.uid = "team", "0f0e"
    settings = OperatorSettings(tracking_uri="http://mlflow:5000", checkpoint_claim_name="ckpt")
    for obj in builders.build_attempt(run, attempt=1, settings=settings, active_deadline_seconds=100):
        validate(obj)


def test_pod_template_reaches_every_container_of_every_trainer_pod(big_run):
    job = builders.build_job(big_run, attempt=1, settings=OperatorSettings())
    pod = job["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == "fim-trainer"
    assert pod["metadata"]["labels"]["team"] == "code-assist" and pod["metadata"]["annotations"] == {
        "cost-center": "ml-platform"
    }
    assert pod["metadata"]["labels"][builders.LABEL_RUN] == "fim-7b"  # the platform's labels stay
    assert {"name": "ca-bundle", "configMap": {"name": "corporate-ca"}} in pod["spec"]["volumes"]
    # The config check runs the same code against the same data, so it gets the same credentials.
    for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        assert c["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}], c["name"]
        assert {"name": "AWS_REGION", "value": "us-east-1"} in c["env"]
        assert {"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True} in c["volumeMounts"]
    validate(job)


def test_reserved_env_names_cover_every_variable_the_builder_sets(big_run):
    from midfill.api.pods import RESERVED_ENV, RESERVED_ENV_PREFIX, RESERVED_VOLUMES

    settings = OperatorSettings(tracking_uri="http://mlflow:5000", checkpoint_claim_name="ckpt")
    big_run.spec.checkpoint.uri = None
    job = builders.build_job(big_run, attempt=1, settings=settings)
    template_env = {e.name for e in big_run.spec.pod_template.env}
    set_by_us = {e["name"] for e in container(job)["env"]} - template_env
    assert {n for n in set_by_us if not n.startswith(RESERVED_ENV_PREFIX)} <= RESERVED_ENV
    template_volumes = {v.name for v in big_run.spec.pod_template.volumes}
    assert {v["name"] for v in job["spec"]["template"]["spec"]["volumes"]} - template_volumes <= RESERVED_VOLUMES


@pytest.mark.parametrize(
    ("uri", "claim", "mount", "refused"),
    [
        (None, None, None, True),  # pod-local default folder
        ("/data/ckpt", None, None, True),  # a plain path no volume provides
        ("file:///data/ckpt", None, None, True),
        (None, "ckpt", None, False),  # the operator's shared claim
        ("s3://bucket/ckpt", None, None, False),
        ("/shared/ckpt", None, "/shared", False),  # a shared volume the template mounts
    ],
)
def test_multi_node_needs_shared_checkpoint_storage(big_run, uri, claim, mount, refused):
    from midfill.api.pods import Volume, VolumeMount

    big_run.spec.checkpoint.uri = uri
    if mount:
        template = big_run.spec.pod_template
        template.volumes = [*template.volumes, Volume(name="shared", persistent_volume_claim={"claimName": "rwx"})]
        template.volume_mounts = [*template.volume_mounts, VolumeMount(name="shared", mount_path=mount)]
    problem = builders.shared_storage_problem(big_run, OperatorSettings(checkpoint_claim_name=claim))
    assert (problem is not None) == refused, problem
    if refused:
        assert "spec.checkpoint.uri" in problem and "spec.podTemplate.volumes" in problem and "claimName" in problem
    big_run.spec.parallelism.num_nodes = 1
    assert builders.shared_storage_problem(big_run, OperatorSettings(checkpoint_claim_name=claim)) is None


def test_trainer_pods_get_the_trainers_mlflow_credentials_from_the_named_secret(big_run):
    job = builders.build_job(big_run, attempt=1, settings=OperatorSettings(tracking_secret="midfill-mlflow-trainer"))
    for c in job["spec"]["template"]["spec"]["initContainers"] + job["spec"]["template"]["spec"]["containers"]:
        env = {e["name"]: e.get("valueFrom") for e in c["env"]}
        assert env["MLFLOW_TRACKING_USERNAME"] == {
            "secretKeyRef": {"name": "midfill-mlflow-trainer", "key": "username"}
        }
        assert env["MLFLOW_TRACKING_PASSWORD"] == {
            "secretKeyRef": {"name": "midfill-mlflow-trainer", "key": "password"}
        }
    plain = builders.build_job(big_run, attempt=1, settings=OperatorSettings())
    assert "MLFLOW_TRACKING_USERNAME" not in {
        e["name"] for e in plain["spec"]["template"]["spec"]["containers"][0]["env"]
    }
